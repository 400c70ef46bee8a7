"""docker/install.sh, the install step and smoke check of every image, run the way a Dockerfile runs it:
from a copy of exactly what the Dockerfiles COPY, with a Python whose torch is already there.

The full run builds and installs glmport into a fresh virtual environment that sees this environment's
packages (torch among them), keeps that torch, and runs ``glmport env``; the refusals stop before pip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COPIED = ("pyproject.toml", "README.md", "glmport", "backends", "patches", "configs", "docker/install.sh")


@pytest.fixture()
def context(tmp_path):
    """The image's /opt/glmport after the Dockerfile's COPY lines."""
    root = tmp_path / "opt-glmport"
    for name in COPIED:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    return root


def install(context: Path, extras: str, *, python: str, env: dict | None = None, path_prefix: str = ""):
    full_env = {**os.environ, "PYTHON": python, "BUILD_ENV_FILE": str(context.parent / "build-env.json"),
                **(env or {})}
    if path_prefix:
        full_env["PATH"] = path_prefix + os.pathsep + full_env["PATH"]
    return subprocess.run(["bash", "docker/install.sh", extras], cwd=context, env=full_env, capture_output=True,
                          text=True, timeout=900)


def test_a_python_without_torch_is_refused(context, tmp_path):
    no_site = tmp_path / "python-without-site"
    no_site.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n', encoding="utf-8")  # no site-packages: no torch
    no_site.chmod(0o755)
    done = install(context, "all", python=str(no_site))
    assert done.returncode == 1
    assert "cannot import torch: the base image must provide the device's torch" in done.stderr


def test_the_vendor_deepspeed_is_not_overwritten(context, tmp_path):
    vendor = tmp_path / "site"
    (vendor / "deepspeed_mlu-0.9.0.dist-info").mkdir(parents=True)
    (vendor / "deepspeed_mlu-0.9.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: deepspeed_mlu\nVersion: 0.9.0\n", encoding="utf-8")
    done = install(context, "all,deepspeed", python=sys.executable, env={"PYTHONPATH": str(vendor)})
    assert done.returncode == 1
    assert "the base image has the vendor DeepSpeed (deepspeed-mlu 0.9.0)" in done.stderr
    assert "--build-arg EXTRAS=all" in done.stderr


@pytest.mark.slow
def test_install_keeps_the_images_torch_and_runs_glmport_env(context, tmp_path):
    import torch

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # The "image": this environment's packages (torch, already installed) seen by the new interpreter.
    (site / "_image_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    done = install(context, "all", python=str(venv / "bin" / "python"), path_prefix=str(venv / "bin"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"keeping the image's torch {torch.__version__}" in done.stdout
    assert "Backend\n  selected: cpu" in done.stdout  # the smoke check's report
    report = json.loads((tmp_path / "build-env.json").read_text(encoding="utf-8"))
    assert report["versions"]["torch"] == torch.__version__
    installed = subprocess.run([str(venv / "bin" / "python"), "-c", "import glmport, torch; print(glmport.__file__, torch.__version__)"],
                               capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert installed[0].startswith(str(site)) and installed[1] == torch.__version__
