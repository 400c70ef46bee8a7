"""The backend matrix: the same contract tests for every registered backend.

cpu runs for real; mlu and cuda run through CPU emulation (GLMPORT_EMULATE) everywhere, and for real
where the hardware is present (skipped with the reason otherwise). A third-party backend passes the same
contract in test_third_party.py.
"""

from __future__ import annotations

import pytest

from glmport.errors import PluginError
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
        backend = PluginManager(autoload=False, emulate=[emulate] if emulate else []).backends.get(name)
        status = backend.availability()
        if emulate:
            assert status.available and backend.emulated
        elif not status.available:
            pytest.skip(f"{name} hardware not present: {status.reason}")
        with backend.activate():  # as a run would: emulated MLU installs its stand-in torch_mlu here
            yield backend


def test_probing_and_reporting_leave_the_process_alone():
    """`glmport backends` on an emulated MLU: available, described, and nothing installed in the process."""
    import sys

    import torch

    from glmport.cli import main

    with emulating("mlu"):
        mlu = PluginManager(autoload=False).backends.get("mlu")
        assert mlu.emulated and mlu.availability().available
        mlu.describe()
        assert main(["backends", "--json"]) == 0
        assert "torch_mlu" not in sys.modules and not hasattr(torch, "mlu")
        with mlu.activate():
            assert sys.modules["torch_mlu"].mlu is torch.mlu and torch.mlu.device_count() == 1
            with mlu.activate():  # nested activation reuses it
                pass
            assert "torch_mlu" in sys.modules
        assert "torch_mlu" not in sys.modules and not hasattr(torch, "mlu")


def test_emulation_is_resolved_once_when_the_manager_is_made(monkeypatch):
    monkeypatch.setenv("GLMPORT_EMULATE", "mlu")
    monkeypatch.setenv("GLMPORT_EMULATE_BF16", "0")
    manager = PluginManager(autoload=False)
    monkeypatch.delenv("GLMPORT_EMULATE")
    monkeypatch.delenv("GLMPORT_EMULATE_BF16")
    mlu = manager.backends.get("mlu")
    import torch

    assert mlu.emulated and mlu.supported_dtypes() == [torch.float32, torch.float16]  # an MLU370: no bf16
    assert not PluginManager(autoload=False).backends.get("mlu").emulated
    assert PluginManager(autoload=False, emulate=["cuda"]).backends.get("cuda").emulated
    with pytest.raises(PluginError, match="GLMPORT_EMULATE=cpu: backend 'cpu' cannot be emulated"):
        PluginManager(autoload=False, emulate=["cpu"]).backends  # noqa: B018
    with pytest.raises(PluginError, match="no backend 'tpu' is registered"):
        PluginManager(autoload=False, emulate=["tpu"]).backends  # noqa: B018
