"""glmport's from-scratch remote-code modules for tiny test models (see glmport.tiny)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

# family -> fixture revisions, oldest first. Filled as fixture modules are added.
FIXTURE_REVISIONS: dict[str, list[str]] = {}


def fixture_files(family: str, revision: str) -> dict[str, Path]:
    raise KeyError(f"no fixture for {family}/{revision}")


def imitated_revision(revision: str) -> str:
    raise KeyError(revision)


def write_remote_tokenizer(target, layout, seed_text: str = "") -> None:
    raise NotImplementedError
