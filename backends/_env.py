"""Small helpers shared by the builtin backends."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def patched_environ(**values: str):
    """Set environment variables for the duration of a probe, restoring the previous values."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in previous.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
