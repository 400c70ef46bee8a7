"""Checks that only make sense with the real upstream files (``GLMPORT_UPSTREAM_DIR``, one subfolder per
revision; skipped with that reason otherwise). The real files also run through every parametrized test
of this directory (plans, apply/undo, numerics, guard) as ``upstream-<revision>`` cases."""

from __future__ import annotations

import pytest
from patchkit import UPSTREAM_ENV, model_info, source_params, upstream_root, upstream_sources

from glmport.patching.manifest import (
    REMOTE_FILES,
    identify_file,
    load_manifest,
    sha256_normalized,
    sha256_raw,
)


@pytest.fixture(scope="module")
def root():
    found = upstream_sources()
    if isinstance(found, str):
        pytest.skip(found)
    broken = [s.problem for s in found if s.kind == "broken"]
    if broken:
        pytest.fail(broken[0])
    return upstream_root()


def _real_files(root):
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "derived"):
        for key, name in REMOTE_FILES.items():
            if (folder / name).is_file():
                yield folder, key, folder / name


def test_every_manifest_revision_has_a_folder(root):
    revisions = load_manifest()["revisions"]
    folders = {s.name for s in upstream_sources()}
    assert set(revisions) <= folders, f"{UPSTREAM_ENV} lacks {sorted(set(revisions) - folders)}"


def test_every_manifest_hash_is_backed_by_a_real_file(root):
    raw = {sha256_raw(path.read_bytes()) for _, _, path in _real_files(root)}
    normalized = {sha256_normalized(path.read_bytes()) for _, _, path in _real_files(root)}
    for file_name, entries in load_manifest()["files"].items():
        for digest, entry in entries.items():
            pool = raw if entry["hash"] == "raw" else normalized
            assert digest in pool, (file_name, entry)


def test_real_files_are_identified_with_lf_and_crlf_line_ends(root, tmp_path):
    revisions = load_manifest()["revisions"]
    for folder, key, path in _real_files(root):
        identity = identify_file(key, path)
        assert identity.known and identity.imitates is None, path
        # a file shared by two revisions is listed under the older one, across families too: ChatGLM3-6B ships
        # ChatGLM2-6B's configuration_chatglm.py unchanged
        assert identity.revision == folder.name or revisions[identity.revision]["date"] <= revisions[folder.name]["date"]
        if key != "configuration":
            assert revisions[identity.revision]["family"] == revisions[folder.name]["family"]
        crlf = tmp_path / f"{folder.name}-{path.name}"
        crlf.write_bytes(path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        assert identify_file(key, crlf).revision == identity.revision, crlf


def test_modified_third_party_files_are_not_identified(root):
    derived = root / "derived"
    if not derived.is_dir():
        pytest.skip(f"no derived/ folder under {root}")
    files = sorted(derived.rglob("modeling_chatglm.py"))
    assert files
    for path in files:
        assert identify_file("modeling", path).revision is None, path


@pytest.mark.parametrize("source", source_params(fixtures=False))
def test_tiny_upstream_folder_is_built_as_described(source, model_dir):
    folder = model_dir(source)
    names = {p.name for p in folder.iterdir()}
    assert {"modeling_chatglm.py", "configuration_chatglm.py", "config.json", "model.safetensors"} <= names
    assert "tokenizer_config.json" not in names
    if source.family == "chatglm3":
        assert "quantization.py" in names  # transformers follows its lazy import in the modeling file
    assert (folder / "modeling_chatglm.py").read_bytes() == (source.folder / "modeling_chatglm.py").read_bytes()
    info = model_info(folder)
    assert (info.kind, info.family) == ("remote", source.family)
