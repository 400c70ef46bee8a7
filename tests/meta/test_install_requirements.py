"""``pip install glmport`` brings every package a supported model folder's remote code imports.

transformers refuses to run a folder's ``tokenization_chatglm.py`` while one of its imports is missing
("This modeling file requires the following packages ..."), so the family table in glmport/families.py
must be covered by the install requirements: read from the INSTALLED distribution's metadata, as pip
sees them (extras left out), so a stale ``pip install -e .`` fails here instead of on a user's machine.

``GLMPORT_REMOTE_CODE_DIRS`` (optional): ``family=folder`` pairs separated by ``os.pathsep``, e.g.
``chatglm3=/models/chatglm3-6b:glm4=/models/glm-4-9b-chat``, checks the table against real downloads with
transformers' own import scan.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from glmport.families import FAMILIES, remote_code_distributions

ALWAYS_THERE = {"torch", "transformers"}  # the table lists what remote code needs beyond these


def installed_requirements() -> set[str]:
    """Canonical names of glmport's install requirements (no extras), from the installed metadata."""
    try:
        specs = requires("glmport") or []
    except PackageNotFoundError:
        pytest.fail("glmport is not installed: pip install -e .")
    names = set()
    for spec in specs:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.add(canonicalize_name(req.name))
    return names


def test_the_table_names_the_families_glmport_supports():
    assert set(FAMILIES) == {"chatglm", "chatglm2", "chatglm3", "glm4"}
    for family in FAMILIES.values():
        assert family.imports, f"{family.name}: say what its remote code imports (sentencepiece, tiktoken...)"
        for imp in family.imports:
            assert imp.module not in ALWAYS_THERE and imp.module not in sys.stdlib_module_names, imp
            assert imp.file.endswith(".py"), imp


def test_every_remote_code_import_is_an_install_requirement():
    missing = sorted(dist for dist in remote_code_distributions()
                     if canonicalize_name(dist) not in installed_requirements())
    assert not missing, (
        f"glmport's install requirements lack {missing}, which the remote code of "
        + ", ".join(f.name for f in FAMILIES.values() if f.distributions & set(missing))
        + " imports: add them to `dependencies` in pyproject.toml (and docker/mlu/Dockerfile), "
        "then pip install -e ."
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_remote_code_imports_resolve_here(family):
    """What transformers' check_imports does before it runs the folder's code."""
    for imp in FAMILIES[family].imports:
        try:
            importlib.import_module(imp.module)
        except ImportError as exc:
            pytest.fail(f"{family}: {imp.file} imports {imp.module}, which fails here ({exc}): "
                        f"pip install -e . (it requires {imp.distribution})")


def _real_folders() -> list[tuple[str, Path]]:
    pairs = []
    for item in filter(None, os.environ.get("GLMPORT_REMOTE_CODE_DIRS", "").split(os.pathsep)):
        family, _, folder = item.partition("=")
        pairs.append((family, Path(folder)))
    return pairs


@pytest.mark.parametrize("family, folder", _real_folders() or [pytest.param(None, None, marks=pytest.mark.skip(
    reason="set GLMPORT_REMOTE_CODE_DIRS=family=folder[:...] to check real model folders"))])
def test_table_matches_a_real_folder(family, folder):
    from transformers.dynamic_module_utils import get_imports

    assert family in FAMILIES, f"GLMPORT_REMOTE_CODE_DIRS: unknown family {family!r} (one of {sorted(FAMILIES)})"
    found = {}
    for path in sorted(folder.glob("*.py")):
        for module in get_imports(path):
            if module not in ALWAYS_THERE and module not in sys.stdlib_module_names:
                found.setdefault(module, path.name)
    listed = {imp.module for imp in FAMILIES[family].imports}
    assert set(found) <= listed, f"{folder}: imports {found} beyond the {family} entry in glmport/families.py"
