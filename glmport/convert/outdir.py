"""The output folder of ``glmport export`` and ``glmport convert``: refused when taken, written beside it as
``OUT.partial`` and renamed into place when complete, so OUT is whole or not there."""

from __future__ import annotations

import shutil
from pathlib import Path

from glmport.errors import GlmportError, ModelError, Problem


def check_out_dir(out: Path, force: bool, sources: list[Path], flag: str = "--force") -> None:
    """Refuse an OUT that holds something (unless ``force``) or that is, or contains, one of ``sources``."""
    out = out.resolve()
    for source in sources:
        source = source.resolve()
        if out == source or out in source.parents:
            raise ModelError(f"{out}: the output folder would replace what it is made from", [Problem(
                "OUT", f"it is, or contains, {source}", "choose a new folder for the output")])
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: a file is in the way", [Problem("OUT", "not a folder", "choose a new folder")])
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ModelError(f"{out}: folder is not empty", [Problem(
            "OUT", "it already holds files", f"choose a new folder, or pass {flag} to replace it")])


def staging_dir(out: Path) -> Path:
    staging = out.with_name(out.name + ".partial")
    if staging.exists():  # left by an export that was killed: never part of a result
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def write_failed(exc: OSError, out: Path) -> GlmportError:
    """A write that failed (full disk, no permission): exit status 2, what and where, nothing left behind."""
    where = exc.filename or out
    return GlmportError(f"cannot write {out}: {exc.strerror or exc}", [Problem(
        str(where), f"{type(exc).__name__}: {exc.strerror or exc}",
        "free space or choose a writable folder, then run the command again (nothing was written)")])


def publish(staging: Path, out: Path) -> None:
    """Put the finished ``staging`` folder at ``out`` with renames (an old ``out`` goes only once it is there)."""
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    if old.exists():
        shutil.rmtree(old)
