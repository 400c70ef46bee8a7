"""Rules of the code base that keep glmport portable and its contract honest."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glmport import hookspecs

REPO = Path(__file__).resolve().parents[2]

# Only backends/ may touch device APIs, collective backends or visible-devices variables.
DEVICE_SPECIFIC = re.compile(
    r"torch\.cuda|torch\.mlu|torch_mlu|\bnccl\b|\bcncl\b|\b[A-Z][A-Z_]*_VISIBLE_DEVICES\b", re.IGNORECASE
)
CHECKED_TREES = ("glmport", "patches")


def _python_files(*trees: str):
    for tree in trees:
        yield from sorted((REPO / tree).rglob("*.py"))


def test_only_backends_touch_device_apis():
    offenders = []
    for path in _python_files(*CHECKED_TREES):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if DEVICE_SPECIFIC.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "device-specific names outside backends/:\n" + "\n".join(offenders)


def test_the_rule_itself_catches_what_it_should():
    for sample in ("torch.cuda.synchronize()", "import torch_mlu", "backend='nccl'", "os.environ['MLU_VISIBLE_DEVICES']"):
        assert DEVICE_SPECIFIC.search(sample), sample
    assert not DEVICE_SPECIFIC.search("backend.collective_backend")


def _hook_specs():
    return {name: getattr(hookspecs, name) for name in dir(hookspecs) if name.startswith("glmport_")}


def test_every_hook_is_documented():
    for name, spec in _hook_specs().items():
        doc = (spec.__doc__ or "").strip()
        assert len(doc) > 40, f"hook {name} needs a docstring that states its contract"
        assert name in (hookspecs.__doc__ or ""), f"hook {name} is missing from the lifecycle list in hookspecs.py"


def test_every_hook_has_a_test():
    test_sources = "\n".join(
        p.read_text(encoding="utf-8") for p in (REPO / "tests").rglob("test_*.py") if "meta" not in p.parts
    )
    untested = [name for name in _hook_specs() if name not in test_sources]
    assert not untested, f"hooks without a test: {untested}"


def test_importing_glmport_does_not_import_torch():
    code = (
        "import sys, glmport, glmport.cli, glmport.plugins, glmport.backend, glmport.hookspecs;"
        "glmport.cli.build_parser();"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing glmport imported: {out.stdout.strip()}"


def test_help_is_fast_and_complete():
    out = subprocess.run([sys.executable, "-m", "glmport", "--help"], capture_output=True, text=True, check=True)
    for command in ("backends", "env", "plugins"):
        assert command in out.stdout


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    result = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_line_runs_copied_from_upstream():
    tool = REPO.parent / "shared" / "tools" / "upstream_overlap.py"
    if not tool.exists():
        pytest.skip(f"{tool} not present (it lives in ../shared beside the repository)")
    result = subprocess.run([sys.executable, str(tool), str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
