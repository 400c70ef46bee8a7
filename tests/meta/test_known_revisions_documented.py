"""The README's "Known model revisions" table lists exactly the revisions in patches/manifest.json, with the
family, date and files the manifest gives them: a folder is refused unless its files are in the manifest, so
users must be able to read which revisions those are (and ``glmport patch revisions`` prints the same)."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FILE_KEYS = {"modeling_chatglm.py": "modeling", "configuration_chatglm.py": "configuration",
             "tokenization_chatglm.py": "tokenization"}


def readme_revisions() -> dict[str, tuple[str, str, str]]:
    """``{revision: (family, date, files)}`` from the rows ``| `revision` | family | date | files | ... |``."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    patches = readme.split("\n## Patch sets for `modeling_chatglm.py`\n", 1)[1].split("\n## ", 1)[0]
    assert "\n### Known model revisions\n" in patches, "the README's patch section lost its Known model revisions table"
    section = patches.split("\n### Known model revisions\n", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+?) \| (\d{4}-\d{2}(?:-\d{2})?) \| ([^|]+?) \|", section, re.M)
    names = [name for name, *_ in rows]
    assert len(names) == len(set(names)), f"listed twice: {sorted({n for n in names if names.count(n) > 1})}"
    return {name: (family, date, files) for name, family, date, files in rows}


def manifest_revisions() -> dict[str, tuple[str, str, str]]:
    manifest = json.loads((REPO / "patches" / "manifest.json").read_text(encoding="utf-8"))
    files: dict[str, set[str]] = {name: set() for name in manifest["revisions"]}
    for file_name, entries in manifest["files"].items():
        for entry in entries.values():
            files[entry["revision"]].add(FILE_KEYS[file_name])
    return {name: (meta["family"], meta["date"], ", ".join(k for k in FILE_KEYS.values() if k in files[name]))
            for name, meta in manifest["revisions"].items()}


def test_every_manifest_revision_is_in_the_readme():
    missing = sorted(set(manifest_revisions()) - set(readme_revisions()))
    assert not missing, f"add these revisions to the README's Known model revisions table: {missing}"


def test_the_readme_lists_no_revision_the_manifest_lacks():
    stale = sorted(set(readme_revisions()) - set(manifest_revisions()))
    assert not stale, f"the README's Known model revisions table names revisions not in patches/manifest.json: {stale}"


def test_family_date_and_files_match_the_manifest():
    documented, known = readme_revisions(), manifest_revisions()
    wrong = {name: (documented[name], known[name]) for name in set(documented) & set(known)
             if documented[name] != known[name]}
    assert not wrong, f"README (family, date, files) vs manifest: {wrong}"
