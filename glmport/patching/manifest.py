"""Which revision of the upstream remote code a model folder holds, from file hashes.

``patches/manifest.json`` maps the sha256 of every known upstream file (``modeling_chatglm.py``,
``configuration_chatglm.py``, ``tokenization_chatglm.py``) to the revision it belongs to. Each file is
identified on its own: users mix revisions (re-downloading only the tokenizer was the official fix for
one transformers upgrade). A second, normalized hash (LF line ends, no trailing blanks) recognizes a file
whose line endings a checkout changed.

glmport's own from-scratch test modules (``glmport/tiny/remote``) are identified by hashing them at run
time; each declares which upstream revision it imitates, and patches accept it where they accept that
revision. Native GLM classes are identified by the installed transformers version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

REMOTE_FILES = {
    "modeling": "modeling_chatglm.py",
    "configuration": "configuration_chatglm.py",
    "tokenization": "tokenization_chatglm.py",
}


@dataclass(frozen=True)
class FileIdentity:
    key: str  # modeling | configuration | tokenization | transformers
    path: Path | None
    sha256: str | None
    revision: str | None  # None: unknown
    imitates: str | None = None  # for glmport's fixtures: the upstream revision it stands in for
    detail: str = ""

    @property
    def effective_revision(self) -> str | None:
        return self.imitates or self.revision

    @property
    def known(self) -> bool:
        return self.revision is not None


def sha256_raw(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_normalized(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip(" \t\r\f\v") for line in text.split("\n")]
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def load_manifest() -> dict:
    text = resources.files("glmport.patches").joinpath("manifest.json").read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def _fixture_hashes() -> dict[str, dict[str, tuple[str, str]]]:
    """{file_key: {sha256: (fixture revision, imitated upstream revision)}} for glmport's test modules."""
    from glmport.tiny.remote import FIXTURE_REVISIONS, fixture_files, imitated_revision

    table: dict[str, dict[str, tuple[str, str]]] = {key: {} for key in REMOTE_FILES}
    for family, revisions in FIXTURE_REVISIONS.items():
        for revision in revisions:
            for name, path in fixture_files(family, revision).items():
                key = next((k for k, v in REMOTE_FILES.items() if v == name), None)
                if key:  # a file shared by two revisions belongs to the older one, as in manifest.json
                    table[key].setdefault(sha256_normalized(path.read_bytes()),
                                          (f"glmport-fixture-{revision}", imitated_revision(revision)))
    return table


def known_revisions(key: str) -> list[str]:
    manifest = load_manifest()
    return sorted({entry["revision"] for entry in manifest["files"].get(REMOTE_FILES.get(key, key), {}).values()})


def identify_file(key: str, path: Path) -> FileIdentity:
    if not path.is_file():
        return FileIdentity(key, path, None, None, detail="file missing")
    data = path.read_bytes()
    raw, normalized = sha256_raw(data), sha256_normalized(data)
    entries = load_manifest()["files"].get(REMOTE_FILES[key], {})
    for digest in (raw, normalized):
        if digest in entries:
            return FileIdentity(key, path, raw, entries[digest]["revision"])
    fixture = _fixture_hashes()[key].get(normalized)
    if fixture:
        return FileIdentity(key, path, raw, fixture[0], imitates=fixture[1])
    return FileIdentity(key, path, raw, None, detail="not in the manifest")


def identify_remote_folder(model_dir: Path) -> dict[str, FileIdentity]:
    return {key: identify_file(key, Path(model_dir) / name) for key, name in REMOTE_FILES.items()}


def describe_files(files: dict[str, FileIdentity]) -> str:
    """One line naming each file present, its sha256 prefix and the revision it matched:
    ``modeling_chatglm.py sha256 440d89faea5c = chatglm3-6b-2023-12, ...``."""
    parts = []
    for identity in files.values():
        if identity.path is None or identity.sha256 is None:
            continue
        revision = identity.revision or "NOT IN THE MANIFEST"
        if identity.imitates:
            revision += f" (imitates {identity.imitates})"
        parts.append(f"{identity.path.name} sha256 {identity.sha256[:12]} = {revision}")
    return ", ".join(parts)


def identify_transformers() -> FileIdentity:
    """Native GLM: the code is transformers' own; its version is the revision."""
    from importlib.metadata import version

    installed = version("transformers")
    major = int(installed.split(".")[0])
    tested = load_manifest().get("native", {})
    revision = next((rev for rev, spec in tested.items() if major in spec["transformers_major"]), None)
    return FileIdentity("transformers", None, None, revision, detail=f"transformers {installed}")
