"""The backend matrix: the same contract tests for every registered backend.

cpu runs for real; mlu and cuda run through CPU emulation (GLMPORT_EMULATE) everywhere, and for real
where the hardware is present (skipped with the reason otherwise). A third-party backend passes the same
contract in test_third_party.py.
"""

from __future__ import annotations

import pytest

from glmport.plugins import PluginManager
from glmport.testing import BackendContract
from glmport.testing.emulation import emulating

MATRIX = [
    pytest.param(("cpu", None), id="cpu"),
    pytest.param(("mlu", "mlu"), id="mlu-emulated"),
    pytest.param(("cuda", "cuda"), id="cuda-emulated"),
    pytest.param(("mlu", None), id="mlu-real"),
    pytest.param(("cuda", None), id="cuda-real"),
]


def test_matrix_covers_every_builtin_backend():
    names = set(PluginManager(autoload=False).backends.names())
    assert names == {param.values[0][0] for param in MATRIX}


class TestBuiltinBackends(BackendContract):
    @pytest.fixture(params=MATRIX)
    def backend(self, request):
        name, emulate = request.param
        if emulate:
            with emulating(emulate):
                backend = PluginManager(autoload=False).backends.get(name)
                status = backend.availability()
                assert status.available and status.emulated
                yield backend
            return
        backend = PluginManager(autoload=False).backends.get(name)
        status = backend.availability()
        if not status.available:
            pytest.skip(f"{name} hardware not present: {status.reason}")
        yield backend
