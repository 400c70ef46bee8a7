"""The launched side: what a process started by a launcher does differently.

It recognises that it was launched (``LOCAL_RANK`` is set: torchrun and the DeepSpeed launcher set it,
a job controller's pod variables alone do not), and when it fails it records the error in the file the
elastic agent names (``TORCHELASTIC_ERROR_FILE``), with torchrun's own error handler, so that the
launcher can say which rank failed and why. The ``record`` decorator does the same for an exception that
escapes a function; glmport's command line turns errors into exit statuses instead, so it records them
itself before it does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def launched(environ=None) -> bool:
    """True in a process a launcher started (torchrun, the ``deepspeed`` launcher, ``glmport train
    --nproc-per-node``)."""
    return "LOCAL_RANK" in (os.environ if environ is None else environ)


def record_failure(exc: BaseException) -> None:
    """Leave ``exc`` where the elastic agent looks for this rank's error (no-op outside a launch)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE") or not isinstance(exc, Exception):
        return  # a signal: the agent knows, it sent it
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(exc)


def stop_with_launcher() -> None:
    """Ask the kernel to send this rank SIGHUP when the process that started it dies (Linux).

    A launcher that is killed outright (SIGKILL, the OOM killer, a node agent) cannot stop its ranks, and they
    would train on, or wait in a collective, with nobody to report to. With this, they stop as on a
    preemption: at an agreed step, with its checkpoint (:mod:`glmport.train.signals`), or at once before
    training. SIGHUP rather than SIGTERM because the kernel repeats it for every thread of the dead launcher
    the rank is handed on to, and a repeated SIGTERM means "abort now"."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    # A launcher started under nohup hands its ignored SIGHUP down; the rank runs in a session of its own (no
    # terminal can hang up on it), so here SIGHUP means only this, and must not be ignored.
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
    if os.getppid() == 1:  # the launcher died before the request was made: nobody would send it
        os.kill(os.getpid(), signal.SIGHUP)
