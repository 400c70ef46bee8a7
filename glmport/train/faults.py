"""A write into the output folder that fails (a full disk, a quota, a read-only remount, lost permission)
ends the run with one clear error instead of a traceback: what could not be written and where, why, what is
left on disk, and the last complete checkpoint to resume from (or that there is none).

The libraries do not all raise ``OSError`` for it. On a full disk (measured on a small tmpfs) ``safetensors``
raises ``SafetensorError`` ("I/O error: No space left on device (os error 28)"), ``tokenizers`` a bare
``Exception`` ("No space left on device (os error 28)"): both are Rust I/O errors. ``torch.save`` raises a
``RuntimeError`` from its zip writer ("[enforce fail at inline_container.cc:...] . unexpected pos 576 vs 534")
that names no cause at all. :func:`write_fault_reason` recognises each, and the message adds the free space
left, which says the rest.
Anything else raised while saving is not a write fault and goes on as it is (a bug is a bug).

What is left is always correct: a checkpoint cut short has no ``glmport_checkpoint.json`` (a resumed run
renames it ``checkpoint-N.incomplete``), the result folder is published by one rename or not at all, and
each file is written under a temporary name first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from glmport.errors import GlmportError
from glmport.train.outputs import CHECKPOINT, checkpoint_name
from glmport.train.resume import is_complete

_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)\s*$")  # how Rust's std::io::Error ends (safetensors, tokenizers)
_TORCH_ZIP_WRITER = ("inline_container.cc", "PytorchStreamWriter")
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def write_fault_reason(exc: BaseException) -> str | None:
    """Why a write failed (``"No space left on device"``), or None when ``exc`` is not a failed write."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    code = _OS_ERROR_CODE.search(text)
    if code:
        return os.strerror(int(code.group(1)))
    if isinstance(exc, RuntimeError) and any(mark in text for mark in _TORCH_ZIP_WRITER):
        return f"torch.save failed ({text.strip().splitlines()[0]})"
    return None


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    code = _OS_ERROR_CODE.search(str(exc))
    return int(code.group(1)) if code else None


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_space(folder: Path) -> int | None:
    """Free bytes on the file system holding ``folder`` (or its nearest existing parent), None if unknown."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint a resumed run would start from; renames nothing (unlike the resume plan)."""
    if not output_dir.is_dir():
        return None
    steps = {int(m.group(1)): c for c in output_dir.iterdir()
             if (m := CHECKPOINT.match(c.name)) and c.is_dir() and is_complete(c)}
    return steps[max(steps)] if steps else None


def write_fault_message(what: str, path: Path, exc: BaseException, output_dir: Path, *,
                        resume_flag: str = "--resume", left: str = "") -> str:
    reason = write_fault_reason(exc) or str(exc)
    code = _errno(exc)
    free = free_space(Path(path))
    if code is None and free is not None and free < 1 << 20:  # torch.save says nothing: the free space does
        code = errno.ENOSPC
    where = getattr(exc, "filename", None) or path
    lines = [f"could not write {what} ({where}): {reason}"
             + (f"; {size_text(free)} free on that file system" if free is not None else "")]
    if left:
        lines.append(f"    {left}")
    if code in SPACE_ERRNOS:
        fix = "free some space"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {output_dir} writable again"
    else:
        fix = "fix the cause"
    latest = last_complete_checkpoint(output_dir)
    if latest is not None:
        step = CHECKPOINT.match(latest.name).group(1)
        lines.append(f"    -> the last complete checkpoint is {checkpoint_name(int(step))}: {fix}, then run the same "
                     f"command with {resume_flag} yes to continue from it (or {resume_flag} {step})")
    else:
        lines.append(f"    -> there is no complete checkpoint to resume from: {fix}, then run the same command with "
                     f"{resume_flag} yes, which starts from the beginning")
    return "\n".join(lines)


@contextlib.contextmanager
def write_faults(what: str, path: Path, output_dir: Path, *, resume_flag: str = "--resume", left: str = "",
                 cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Writes inside the block that fail become one :class:`GlmportError` about ``what`` at ``path``;
    ``left`` says what the failure leaves on disk, ``cleanup`` removes what must not stay (best effort)."""
    try:
        yield
    except GlmportError:
        raise
    except Exception as exc:
        if write_fault_reason(exc) is None:
            raise
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        raise GlmportError(write_fault_message(what, path, exc, output_dir, resume_flag=resume_flag,
                                               left=left)) from exc
