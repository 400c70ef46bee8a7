"""Which revision a folder's code is: patches/manifest.json, fixture identities, CRLF checkouts, edited
files (refused with the list of known revisions, or patched as UNVERIFIED when the user allows it)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from patchkit import (
    ATOL,
    copy_folder_linking_weights,
    fixture_sources,
    make_plan,
    model_info,
    native_reference,
    patched_model,
    plan_rows,
    token_batch,
)

from glmport.errors import PatchError
from glmport.patching.manifest import (
    REMOTE_FILES,
    identify_file,
    identify_remote_folder,
    identify_transformers,
    known_revisions,
    load_manifest,
    sha256_normalized,
    sha256_raw,
)
from glmport.tiny.remote import FIXTURE_REVISIONS, fixture_files, imitated_revision

SOURCES = {s.name: s for s in fixture_sources()}
# This file pins the ChatGLM3 and GLM-4 revisions; other families' revisions are pinned by their own tests.
FAMILIES = ("chatglm3", "glm4")
KNOWN_MODELING = ["chatglm3-6b-2023-10", "chatglm3-6b-2023-11", "chatglm3-6b-2023-12", "chatglm3-6b-2024-06",
                  "chatglm3-6b-2024-08", "glm-4-9b-chat-2024-07"]
NAME_PREFIX = {"chatglm": "chatglm-6b-", "chatglm2": "chatglm2-6b-", "chatglm3": "chatglm3-6b-", "glm4": "glm-4-9b-"}


def of_families(names: list[str]) -> list[str]:
    revisions = load_manifest()["revisions"]
    return [name for name in names if revisions[name]["family"] in FAMILIES]


def test_manifest_entries_are_consistent():
    manifest = load_manifest()
    revisions = manifest["revisions"]
    assert set(of_families(list(revisions))) == {
        "chatglm3-6b-2023-10", "chatglm3-6b-2023-11", "chatglm3-6b-2023-12", "chatglm3-6b-2024-01",
        "chatglm3-6b-2024-06", "chatglm3-6b-2024-08", "glm-4-9b-chat-2024-07", "glm-4-9b-chat-2024-07-jinja"}
    for name, meta in revisions.items():
        assert name.startswith(NAME_PREFIX[meta["family"]]), name
        assert re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", meta["date"]) and meta["note"], name  # month, or the day
    assert set(manifest["files"]) == set(REMOTE_FILES.values())
    used = set()
    for file_name, entries in manifest["files"].items():
        for digest, entry in entries.items():
            assert re.fullmatch(r"[0-9a-f]{64}", digest), (file_name, digest)
            assert entry["revision"] in revisions, (file_name, entry)
            assert entry["hash"] in ("raw", "normalized") and "@" in entry["source"], (file_name, entry)
            used.add(entry["revision"])
            if entry["hash"] == "normalized":  # a normalized entry stands beside the raw one of the same file
                assert any(other["hash"] == "raw" and other["revision"] == entry["revision"]
                           and other["source"] == entry["source"] for other in entries.values()), (file_name, digest)
    assert used == set(revisions)  # every revision is identified by at least one file
    assert of_families(known_revisions("modeling")) == KNOWN_MODELING
    # ChatGLM3 ships one configuration file from its release on, and it is ChatGLM2-6B's (listed under the
    # older revision), so no ChatGLM3 revision is named for it
    assert of_families(known_revisions("configuration")) == ["glm-4-9b-chat-2024-07"]
    assert of_families(known_revisions("tokenization")) == [
        "chatglm3-6b-2023-10", "chatglm3-6b-2023-11", "chatglm3-6b-2023-12", "chatglm3-6b-2024-01",
        "chatglm3-6b-2024-06", "glm-4-9b-chat-2024-07", "glm-4-9b-chat-2024-07-jinja"]


def test_patch_revision_rules_name_manifest_revisions():
    from glmport.patches import builtin_patch_sets

    revisions = set(load_manifest()["revisions"])
    for patch_set in builtin_patch_sets():
        for patch in patch_set.patches:
            assert set(patch.revisions) <= revisions, (patch_set.name, patch.id, patch.revisions)
    for family, fixture_revisions in FIXTURE_REVISIONS.items():
        for revision in fixture_revisions:
            assert imitated_revision(revision) in revisions
            assert load_manifest()["revisions"][imitated_revision(revision)]["family"] == family


def test_native_revision_is_the_installed_transformers_major(monkeypatch, native_dir):
    identity = identify_transformers()
    assert identity.revision == "glm-native-transformers-5" and identity.key == "transformers"
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "6.0.0" if name == "transformers" else real_version(name))
    assert identify_transformers().revision is None
    from glmport.patching.session import make_plan as engine_plan
    from glmport.plugins import PluginManager

    info = model_info(native_dir("chatglm3"))
    manager = PluginManager(autoload=False)
    registry, mlu = manager.patch_sets, manager.backends.get("mlu")
    refused = engine_plan(info, mlu, "train", registry)
    assert [str(p) for p in refused.problems] == [
        "transformers: transformers 6.0.0 is outside the versions the native GLM patches were written for\n"
        "    -> install transformers 5.x, or pass --allow-unverified-patches"]
    allowed = engine_plan(info, mlu, "train", registry, allow_unverified=True)
    assert not allowed.problems and all(e.reason.startswith("UNVERIFIED revision") for e in allowed.to_apply)


# (fixture revision, file) -> (identified revision, imitated upstream revision). A file two fixture
# revisions share belongs to the older one, as in manifest.json (ChatGLM3's configuration).
FIXTURE_IDENTITY = {
    ("chatglm3-2023-12", "modeling"): ("glmport-fixture-chatglm3-2023-12", "chatglm3-6b-2023-12"),
    ("chatglm3-2023-12", "configuration"): ("glmport-fixture-chatglm3-2023-12", "chatglm3-6b-2023-12"),
    ("chatglm3-2023-12", "tokenization"): ("glmport-fixture-chatglm3-2023-12", "chatglm3-6b-2023-12"),
    ("chatglm3-2024-06", "modeling"): ("glmport-fixture-chatglm3-2024-06", "chatglm3-6b-2024-06"),
    ("chatglm3-2024-06", "configuration"): ("glmport-fixture-chatglm3-2023-12", "chatglm3-6b-2023-12"),
    ("chatglm3-2024-06", "tokenization"): ("glmport-fixture-chatglm3-2024-06", "chatglm3-6b-2024-06"),
    ("chatglm2-2023-07", "modeling"): ("glmport-fixture-chatglm2-2023-07", "chatglm2-6b-2023-07"),
    ("chatglm2-2023-07", "configuration"): ("glmport-fixture-chatglm2-2023-07", "chatglm2-6b-2023-07"),
    ("chatglm2-2023-07", "tokenization"): ("glmport-fixture-chatglm2-2023-07", "chatglm2-6b-2023-07"),
    ("chatglm2-2023-10", "modeling"): ("glmport-fixture-chatglm2-2023-10", "chatglm2-6b-2023-10"),
    # rendered from the same source as ChatGLM3's (upstream ships it unchanged); the chatglm3 fixture claims it
    ("chatglm2-2023-10", "configuration"): ("glmport-fixture-chatglm3-2023-12", "chatglm3-6b-2023-12"),
    ("chatglm2-2023-10", "tokenization"): ("glmport-fixture-chatglm2-2023-10", "chatglm2-6b-2023-10"),
    ("glm4-2024-07", "modeling"): ("glmport-fixture-glm4-2024-07", "glm-4-9b-chat-2024-07"),
    ("glm4-2024-07", "configuration"): ("glmport-fixture-glm4-2024-07", "glm-4-9b-chat-2024-07"),
    ("glm4-2024-07", "tokenization"): ("glmport-fixture-glm4-2024-07", "glm-4-9b-chat-2024-07"),
    ("chatglm-2023-05", "modeling"): ("glmport-fixture-chatglm-2023-05", "chatglm-6b-2023-05"),
    ("chatglm-2023-05", "configuration"): ("glmport-fixture-chatglm-2023-05", "chatglm-6b-2023-05"),
    ("chatglm-2023-05", "tokenization"): ("glmport-fixture-chatglm-2023-05", "chatglm-6b-2023-05"),
}


@pytest.mark.parametrize("revision", [r for revs in FIXTURE_REVISIONS.values() for r in revs])
def test_fixture_files_are_identified_as_glmport_fixtures(revision):
    family = next(f for f, revs in FIXTURE_REVISIONS.items() if revision in revs)
    files = fixture_files(family, revision)
    for key, name in REMOTE_FILES.items():
        identity = identify_file(key, files[name])
        assert (identity.revision, identity.imitates) == FIXTURE_IDENTITY[(revision, key)], (revision, key)
        assert identity.known and identity.effective_revision == identity.imitates
        assert identity.sha256 == sha256_raw(files[name].read_bytes())


def test_crlf_checkout_is_identified_by_its_normalized_hash(model_dir, tmp_path):
    source = SOURCES["chatglm3-2024-06"]
    original = model_dir(source)
    folder = copy_folder_linking_weights(original, tmp_path / "crlf-checkout")
    for name in REMOTE_FILES.values():
        data = (folder / name).read_bytes()
        assert b"\r\n" not in data
        crlf = data.replace(b"\n", b"\r\n").replace(b"\r\n\r\n", b"\r\n  \r\n", 1)  # plus a trailing blank
        (folder / name).write_bytes(crlf)
        assert sha256_raw(crlf) != sha256_raw(data) and sha256_normalized(crlf) == sha256_normalized(data)
    for key, identity in identify_remote_folder(folder).items():
        assert (identity.revision, identity.imitates) == FIXTURE_IDENTITY[(source.name, key)]
    plan = make_plan(folder, "mlu", "train")
    assert not plan.problems
    assert plan_rows(plan) == plan_rows(make_plan(original, "mlu", "train"))


def _edited_copy(model_dir, tmp_path, *files: str):
    folder = copy_folder_linking_weights(model_dir(SOURCES["chatglm3-2024-06"]), tmp_path / "edited")
    for name in files:
        with open(folder / name, "a", encoding="utf-8") as handle:
            handle.write("\n# edited locally\n")
    return folder


def test_edited_file_is_refused_with_the_known_revisions(model_dir, tmp_path, fresh_plugin_manager, capsys):
    folder = _edited_copy(model_dir, tmp_path, "modeling_chatglm.py")
    identity = identify_remote_folder(folder)["modeling"]
    assert identity.revision is None and identity.detail == "not in the manifest"
    plan = make_plan(folder, "mlu", "train")
    assert len(plan.problems) == 1
    problem = plan.problems[0]
    assert problem.where.endswith("modeling_chatglm.py")
    assert problem.what == (f"unknown revision (sha256 {identity.sha256[:12]}...); known revisions of this file: "
                            + ", ".join(known_revisions("modeling")))
    assert "--allow-unverified-patches" in problem.fix
    statuses = {(e.patch.file, e.status) for e in plan.entries}
    assert ("modeling", "refused") in statuses and ("modeling", "apply") not in statuses
    assert ("configuration", "apply") in statuses  # every file is identified on its own

    from glmport.cli import main

    rc = main(["patch", "plan", str(folder), "--backend", "mlu", "--mode", "train"])
    out = capsys.readouterr().out
    assert rc == 2
    assert "UNKNOWN REVISION" in out and "REFUSED:" in out and ", ".join(known_revisions("modeling")) in out
    rc = main(["patch", "plan", str(folder), "--backend", "mlu", "--mode", "train", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 2 and len(data["problems"]) == 1 and data["files"]["modeling"]["revision"] is None


def test_every_mismatch_is_reported_in_one_error(model_dir, tmp_path):
    folder = _edited_copy(model_dir, tmp_path, "modeling_chatglm.py", "tokenization_chatglm.py")
    from glmport.patching.session import patch_session
    from glmport.plugins import PluginManager

    with pytest.raises(PatchError) as refused:
        manager = PluginManager(autoload=False)
        patch_session(model_info(folder), manager.backends.get("cpu"), "infer", registry=manager.patch_sets)
    problems = refused.value.problems
    assert [p.where.rsplit("/", 1)[-1] for p in problems] == ["modeling_chatglm.py", "tokenization_chatglm.py"]
    assert problems[1].what.endswith("known revisions of this file: " + ", ".join(known_revisions("tokenization")))


def test_allow_unverified_patches_an_edited_file_and_says_so(model_dir, tmp_path, fresh_plugin_manager, capsys):
    folder = _edited_copy(model_dir, tmp_path, "modeling_chatglm.py")
    plan = make_plan(folder, "mlu", "train", allow_unverified=True)
    assert not plan.problems
    modeling = [e for e in plan.entries if e.patch.file == "modeling"]
    assert modeling and all(e.status == "apply" and e.reason.startswith("UNVERIFIED revision: ") for e in modeling)
    # with the revision unknown, both revision-specific checkpointing patches are planned (neither rule excludes it)
    assert {"compat-gradient-checkpointing", "compat-checkpointing-hook"} <= {e.patch.id for e in modeling}
    assert all(not e.reason.startswith("UNVERIFIED") for e in plan.entries if e.patch.file != "modeling")

    from glmport.cli import main

    rc = main(["patch", "plan", str(folder), "--backend", "mlu", "--mode", "train", "--allow-unverified-patches"])
    out = capsys.readouterr().out
    assert rc == 0 and "UNVERIFIED revision" in out and "REFUSED" not in out

    ids = token_batch("chatglm3")
    with patched_model(folder, "cpu", "infer", allow_unverified=True) as (model, session):
        assert "modeling=UNVERIFIED" in session.summary()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, native_reference("chatglm3")(input_ids=ids).logits,
                                       atol=ATOL, rtol=0)
