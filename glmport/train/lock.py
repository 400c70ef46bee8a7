"""One run at a time in an output folder: an exclusive lock on ``OUTPUT_DIR/.glmport.lock``.

Two runs writing into one folder interleave their checkpoints and one of the results is silently lost, so a
run holds the folder from before it touches anything there (the resume plan renames and moves old runs)
until it ends, however it ends. A second run is refused at once with the holder's pid, host, start time
and command line.

The lock is ``flock`` on the file: the kernel releases it when its process dies, so a killed run never
blocks the next one. The file's content only *names* the holder. A run that ends removes the file; one
killed outright (SIGKILL, the OOM killer, a lost node) leaves it behind, and the next run takes it over with
a note saying whose it was. Where the file system has no ``flock`` (some network file systems), the content
is all there is: a live process on this host, or any process on another host, holds the folder.

Taking the lock is also the first check that the folder can be created and written: the lock file is
created, written and removed by the run, so a read-only or missing-permission folder fails here, before
any model is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

from glmport import __version__
from glmport.errors import GlmportError
from glmport.train.outputs import LOCK_FILE

HOLDER_WAIT_S = 1.0  # how long a refused run waits for a new holder to finish writing its details


def command_line(argv: list[str] | None = None) -> str:
    """This process's command line, as the user would type it (``glmport train ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    program = Path(argv[0])
    if program.name == "__main__.py" and program.parent.name == "glmport":
        return shlex.join(["python", "-m", "glmport", *argv[1:]])
    if program.name == "glmport":
        return shlex.join(["glmport", *argv[1:]])
    return shlex.join(argv)


def now_text() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def describe_holder(holder: dict, *, inline: bool = False) -> str:
    """``pid 123 on host h, since 2026-01-02 03:04:05 (5 min ago)``, then its command line (on the next line,
    or in parentheses when ``inline``)."""
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    started = holder.get("started")
    if started:
        try:
            when = datetime.fromisoformat(started)
            ago = max((datetime.now().astimezone() - when).total_seconds(), 0)
            text += f", since {when.strftime('%Y-%m-%d %H:%M:%S')} ({_ago(ago)} ago)"
        except (TypeError, ValueError):
            text += f", since {started}"
    if holder.get("command"):
        where = f" (in {holder['cwd']})" if holder.get("cwd") else ""
        text += f" (command: {holder['command']})" if inline else f"\n    its command: {holder['command']}{where}"
    return text


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def not_writable(folder: Path, exc: OSError, what: str) -> GlmportError:
    """The error for an output folder that cannot be created or written, before any model is loaded."""
    reason = exc.strerror or str(exc)
    if exc.filename and str(exc.filename) != str(folder):
        reason += f": {exc.filename}"
    fix = "free some space on it" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable for this user"
    return GlmportError(f"{folder}: {what} ({reason})\n"
                        f"    -> {fix}, or set training_args.output_dir to a folder this run can write")


class OutputLock:
    """``with OutputLock(output_dir, command):`` holds ``output_dir`` for this process; ``notes`` says what
    it found (a lock file left by a run that was killed), for the run to announce."""

    def __init__(self, output_dir: Path, command: str | None = None):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self.command = command_line() if command is None else command
        self.notes: list[str] = []
        self._fd: int | None = None
        self._created_folder = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    # --- taking it --------------------------------------------------------------------------------------------
    def acquire(self) -> OutputLock:
        existed = self.output_dir.is_dir()
        self._mkdir()
        self._created_folder = not existed
        for _ in range(20):  # another run may remove the file (it ended) between our open and our flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder went with a run that created it and ended: make it again
                self._mkdir()
                continue
            except OSError as exc:
                raise not_writable(self.output_dir, exc, "cannot write into the output folder") from exc
            try:
                flock_works = self._flock(fd)
                if _same_file(fd, self.path):
                    self._take_over(fd, flock_works)
                    self._fd, fd = fd, None
                    return self
                # else we locked a file that is no longer the lock file (its holder removed it): try the new one
            finally:
                if fd is not None:
                    os.close(fd)
        raise GlmportError(f"{self.path}: could not take the lock (the file kept being replaced by other runs)")

    def _mkdir(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise not_writable(self.output_dir, exc, "cannot create the output folder") from exc

    def _flock(self, fd: int) -> bool:
        """True once we hold the flock; False where the file system has none; refusal when another run holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            raise self._busy(_read_holder(fd, wait=HOLDER_WAIT_S), "") from None
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise not_writable(self.output_dir, exc, "cannot lock the output folder") from exc

    def _busy(self, holder: dict, why: str) -> GlmportError:
        who = describe_holder(holder) if holder else "(it has not written its details yet)"
        return GlmportError(
            f"{self.output_dir} is in use by another glmport run: {who}{why}\n"
            "    -> wait for it to finish, or stop it, or give this run another training_args.output_dir"
        )

    def _take_over(self, fd: int, flock_works: bool) -> None:
        """Judge what the lock file says about an earlier holder, then write ourselves into it."""
        previous = _read_holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        if previous and {k: previous.get(k) for k in me} != me:
            pid, host = previous.get("pid"), previous.get("host")
            here = host == me["host"]
            alive = here and isinstance(pid, int) and _alive(pid)
            if not flock_works and (alive or not here):
                why = "" if here else (f"\n    glmport cannot see processes on {host}, and this file system has no "
                                       f"file locks; if that run has ended, delete {self.path}")
                raise self._busy(previous, why)
            if not here:
                state = (f"glmport cannot see processes on {host}; its file lock was free, so that run has ended "
                         "(as far as this file system's locks reach across hosts)")
            elif alive:
                state = f"process {pid} exists but does not hold the lock (its pid was reused)"
            else:
                state = "that process no longer exists (the run was killed)"
            self.notes.append(f"WARNING: took over the lock file left by {describe_holder(previous, inline=True)}: "
                              f"{state}")
        if not flock_works:
            self.notes.append(f"WARNING: {self.output_dir} is on a file system without file locks; the lock file "
                              "alone keeps other runs out")
        content = {**me, "started": now_text(), "command": self.command, "cwd": os.getcwd(), "glmport": __version__}
        data = (json.dumps(content, indent=2) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as exc:
            raise not_writable(self.output_dir, exc, "cannot write into the output folder") from exc

    # --- giving it back ---------------------------------------------------------------------------------------
    def release(self) -> None:
        """Remove the lock file (while still holding it), then let go; an output folder this lock created and
        that stayed empty (the run failed its input checks) goes too."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                with contextlib.suppress(OSError):
                    self.path.unlink()
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created_folder:
            with contextlib.suppress(OSError):
                self.output_dir.rmdir()  # only if empty


def _same_file(fd: int, path: Path) -> bool:
    try:
        ours, theirs = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


def _read_holder(fd: int, wait: float = 0.0) -> dict:
    """The holder's details from the lock file; a new holder may take a moment to write them."""
    deadline = time.monotonic() + wait
    while True:
        try:
            text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
            holder = json.loads(text) if text.strip() else {}
            if isinstance(holder, dict) and holder:
                return holder
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)
