"""``glmport patch revisions``: the upstream revisions the manifest knows, with the files that identify them."""

from __future__ import annotations

import json

from glmport.patching.manifest import REMOTE_FILES, load_manifest
from glmport.testing import ok, run_cli


def test_json_lists_every_revision_once_with_every_manifest_hash(fresh_plugin_manager, capsys):
    from glmport.cli import main

    assert main(["patch", "revisions", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    manifest = load_manifest()
    assert [r["revision"] for r in listed] == sorted(
        manifest["revisions"], key=lambda n: (manifest["revisions"][n]["family"], manifest["revisions"][n]["date"], n))
    by_hash = {}
    for row in listed:
        assert {k: row[k] for k in ("family", "date", "note")} == manifest["revisions"][row["revision"]]
        assert row["files"], row["revision"]  # every revision is recognized by at least one file
        for key, entries in row["files"].items():
            for entry in entries:
                by_hash[(REMOTE_FILES[key], entry["sha256"])] = (row["revision"], entry["hash"], entry["source"])
    expected = {(name, digest): (e["revision"], e["hash"], e["source"])
                for name, entries in manifest["files"].items() for digest, e in entries.items()}
    assert by_hash == expected


def test_table_and_family_filter(fresh_plugin_manager, capsys):
    from glmport.cli import main

    revisions = load_manifest()["revisions"]
    assert main(["patch", "revisions", "--family", "glm4"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.strip().startswith(tuple(revisions))]
    assert {line[0] for line in lines} == {n for n, meta in revisions.items() if meta["family"] == "glm4"}
    assert all(line[1] == "glm4" and line[2] == revisions[line[0]]["date"] for line in lines)
    jinja = next(line for line in lines if line[0] == "glm-4-9b-chat-2024-07-jinja")
    assert jinja[3] == "tokenization"  # its modeling and configuration files are the 2024-07 ones


def test_unknown_family_is_an_error_naming_the_known_ones():
    out = ok(run_cli("patch", "revisions", "--family", "chatglm9"), exit_code=2)
    assert "--family 'chatglm9': no revision of that family in the manifest" in out.stderr
    assert "chatglm3" in out.stderr and "glm4" in out.stderr


def test_in_a_subprocess():
    out = ok(run_cli("patch", "revisions", "--family", "chatglm3", in_process=False))
    assert "chatglm3-6b-2023-10" in out.stdout and "glm-4-9b-chat" not in out.stdout
