"""docker/ stays in step with the project: what the images copy and send to the daemon is what the package
is built from, their torch and Python satisfy pyproject.toml, the extras they install exist, the CUDA image's
torch wheel matches its CUDA base image and the cuda backend's install hint, and the images and launch
script cover exactly the builtin backends."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from glmport.plugins import PluginManager

try:
    import tomllib
except ImportError:  # Python 3.10: the TOML reader pip vendors
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
DOCKERFILES = sorted((REPO / "docker").glob("*/Dockerfile"))


def parsed(dockerfile: Path) -> DockerfileParser:
    return DockerfileParser(fileobj=dockerfile.open("rb"))


def args_of(dockerfile: Path) -> dict[str, str]:
    """``ARG NAME=default`` lines (after FROM: the build stage's)."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile.read_text(encoding="utf-8"), re.M))


def build_inputs() -> set[str]:
    """What building the package reads: pyproject.toml, the readme, each package-dir source folder and the
    configs the images keep for relative DeepSpeed paths, plus the install script."""
    folders = {src.split("/")[0] for src in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    return {"pyproject.toml", PYPROJECT["project"]["readme"], *folders, "configs", "docker/install.sh"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_copy_what_the_package_is_built_from(dockerfile):
    copied = set()
    for instruction in parsed(dockerfile).structure:
        if instruction["instruction"] == "COPY":
            copied.update(instruction["value"].split()[:-1])
    assert copied == build_inputs()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_the_build_context_sends_only_what_is_copied(dockerfile):
    ignore = Path(f"{dockerfile}.dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*", "an allow-list: everything else (.venv, outputs, models) stays behind"
    assert {r[1:] for r in rules if r.startswith("!")} == build_inputs()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_the_extras_installed_exist(dockerfile):
    extras = args_of(dockerfile)["EXTRAS"].split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"]), extras
    assert "all" in extras


def test_the_torch_installed_satisfies_glmport():
    torch = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch"))
    for name in ("cpu", "cuda"):
        version = args_of(REPO / "docker" / name / "Dockerfile")["TORCH_VERSION"]
        assert torch.specifier.contains(version), f"docker/{name}: torch {version} is outside {torch.specifier}"
    # The CPU image's torch is the README's quick-start pin.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"torch=={args_of(REPO / 'docker' / 'cpu' / 'Dockerfile')['TORCH_VERSION']} -e" in readme


# Python of the base images: python:X.Y images have X.Y, Ubuntu's python3 package per release.
UBUNTU_PYTHON = {"20.04": "3.8", "22.04": "3.10", "24.04": "3.12"}


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_the_base_images_python_satisfies_requires_python(name):
    base = parsed(REPO / "docker" / name / "Dockerfile").baseimage
    python = re.match(r"python:(\d+\.\d+)", base)
    ubuntu = re.search(r"ubuntu(\d+\.\d+)", base)
    version = python.group(1) if python else UBUNTU_PYTHON[ubuntu.group(1)]
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(version), (base, version)


def test_the_cuda_wheel_matches_the_base_image_and_the_backends_hint():
    dockerfile = REPO / "docker" / "cuda" / "Dockerfile"
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", parsed(dockerfile).baseimage)
    index = args_of(dockerfile)["TORCH_INDEX_URL"]
    assert index.endswith(f"/cu{cuda.group(1)}{cuda.group(2)}"), (parsed(dockerfile).baseimage, index)
    assert index in (REPO / "backends" / "cuda.py").read_text(encoding="utf-8"), \
        "the cuda backend's install hint names the same wheel index"


def test_images_and_launch_script_cover_the_builtin_backends():
    builtin = sorted(PluginManager(autoload=False).backends.names())
    assert [p.parent.name for p in DOCKERFILES] == builtin
    launch = (REPO / "docker" / "launch.sh").read_text(encoding="utf-8")
    assert re.search(r"^\s+" + re.escape("|".join(sorted(builtin, key=["cuda", "mlu", "cpu"].index))) + r"\) ;;$",
                     launch, re.M), "launch.sh accepts exactly the builtin backends"
    readme = (REPO / "docker" / "README.md").read_text(encoding="utf-8")
    for name in builtin:
        assert f"docker build -f docker/{name}/Dockerfile" in readme


def test_a_non_editable_install_has_every_package():
    """The images install glmport from a copy (not editable): a package missing from pyproject's list is
    missing there, and `glmport env`, the images' smoke check, fails to import it."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = {"glmport": "glmport", **PYPROJECT["tool"]["setuptools"]["package-dir"]}
    present = set()
    for package, folder in folders.items():
        # every folder holding Python files: packages, and the fixture folders (no __init__) whose files
        # are written into tiny model folders
        for source in (REPO / folder).rglob("*.py"):
            relative = source.parent.relative_to(REPO / folder).parts
            if "__pycache__" not in relative:
                present.add(".".join((package, *relative)))
    assert sorted(present - listed) == [], "add them to [tool.setuptools] packages in pyproject.toml"
