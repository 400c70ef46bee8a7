"""Shared test settings: offline, deterministic, quiet, and safe to run in parallel (pytest-xdist).

Parallel safety: every test writes under its own ``tmp_path`` (pytest gives each xdist worker its own base
folder), and the one cache that is keyed by folder *name* rather than path, transformers' copy of remote
code (``HF_MODULES_CACHE/transformers_modules/<folder name>/``), is private to each test process and the
commands it starts; otherwise two workers, or two test runs, with a ``chatglm3-2024-06`` folder each
would overwrite each other's modules.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Nothing may reach a model hub at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Vendor extensions that autoload with torch must not change what the tests see.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
# Set before anything imports transformers, which reads it once.
_MODULES_CACHE = tempfile.mkdtemp(prefix="glmport-test-hf-modules-")
os.environ["HF_MODULES_CACHE"] = _MODULES_CACHE
atexit.register(shutil.rmtree, _MODULES_CACHE, ignore_errors=True)
# Under pytest-xdist each worker gets its share of the cores for torch's threads (read when torch is
# imported): N workers of N threads each spin against one another. Measured on 2 cores, fast tier:
# 190 s of CPU and wall time with the default, 41 s wall (70 s CPU) with one thread per worker.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, str(max(1, (os.cpu_count() or 1) // _WORKERS)))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (they live in ../shared/data beside the repository)")
    return SHARED_DATA
