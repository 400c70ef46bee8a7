"""Turn device emulation on for a block of code (tests)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def emulating(*device_types: str):
    """Set ``GLMPORT_EMULATE`` for the block: plugin managers made inside it (and processes started from
    it) get the emulated twins of these backends. Nothing else in the process changes; a backend's
    stand-in device module is installed only by its ``activate()``."""
    previous = os.environ.get("GLMPORT_EMULATE")
    os.environ["GLMPORT_EMULATE"] = ",".join(device_types)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("GLMPORT_EMULATE", None)
        else:
            os.environ["GLMPORT_EMULATE"] = previous


def cpu_int32_kernels():
    """A context in which CPU kernels that insist on int64 indices (the ``nll_loss`` family) accept the
    int32 ones a 32-bit device would take. For plugin authors who emulate a 32-bit device on the CPU:
    return it from ``Backend.compute_context``."""
    from glmport.backends._emulation import int32_kernel_emulation

    return int32_kernel_emulation()
