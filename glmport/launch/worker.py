"""The launched side: what a process started by a launcher does differently.

It recognises that it was launched (``LOCAL_RANK`` is set: torchrun and the DeepSpeed launcher set it,
a job controller's pod variables alone do not), and when it fails it records the error in the file the
elastic agent names (``TORCHELASTIC_ERROR_FILE``), with torchrun's own error handler, so that the
launcher can say which rank failed and why. The ``record`` decorator does the same for an exception that
escapes a function; glmport's command line turns errors into exit statuses instead, so it records them
itself before it does.
"""

from __future__ import annotations

import os


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
