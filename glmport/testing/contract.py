"""The backend contract: tests every backend must pass, builtin or third-party.

Use it from a plugin's own test suite::

    from glmport.testing import BackendContract

    class TestMyBackend(BackendContract):
        backend_name = "npu"        # skipped with the backend's reason when it is not available here

or override the ``backend`` fixture to parametrize over several backends (glmport's own matrix does).
The tests run on whatever device the backend places tensors on; under emulation that is the CPU. Each
test runs inside the backend's ``activate()``, as a training run would.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest

from glmport.backend import Availability, Backend, MemoryStats
from glmport.errors import SixtyFourBitError


def _step_model(device):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64)).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def _batch():
    import torch

    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.roll(-1, dims=1), "weights": torch.ones(4, 8, dtype=torch.float64)}


def run_training_step(backend: Backend, batch, *, leak_int64: bool = False, guard: bool | None = None):
    """One forward/backward/optimizer step the way glmport's trainer runs it on ``backend``: coerce the
    batch, move it, run inside the backend's compute context and (when the backend lacks 64-bit) the
    64-bit guard. ``leak_int64`` adds a position tensor built with torch's default int64, the classic leak.
    Returns the loss as a float."""
    import torch
    import torch.nn.functional as F

    from glmport.guard import sixty_four_bit_guard

    device = backend.device(0)
    model, optimizer = _step_model(device)
    policy = backend.sixty_four_bit_policy()
    batch = {k: v.to(device) for k, v in backend.coerce(batch).items()}
    use_guard = policy.lacks_64bit if guard is None else guard
    guard_ctx = sixty_four_bit_guard(policy.narrow.keys(), label=backend.name) if use_guard else nullcontext()
    with backend.compute_context(), guard_ctx:
        hidden = model[0](batch["input_ids"])
        if leak_int64:
            positions = torch.arange(batch["input_ids"].shape[1], device=device)  # int64 by default
            hidden = hidden + positions[None, :, None]
        logits = model[1](hidden)
        per_token = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        loss = (per_token * batch["weights"].flatten()).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss.detach().cpu())


class BackendContract:
    """Contract tests for one backend. Set ``backend_name`` or override the ``backend`` fixture."""

    backend_name: str | None = None

    @pytest.fixture
    def backend(self):
        from glmport.plugins import PluginManager

        assert self.backend_name, "set backend_name on your BackendContract subclass or override `backend`"
        registry = PluginManager().backends
        found = registry.get(self.backend_name)
        assert found is not None, f"backend {self.backend_name!r} is not registered; known: {registry.names()}"
        status = found.availability()
        if not status.available:
            pytest.skip(f"backend {self.backend_name} is not available here: {status.reason}")
        with found.activate():
            yield found

    # --- identity and detection ------------------------------------------------------------------
    def test_identity(self, backend: Backend):
        assert backend.name and backend.name == backend.name.strip()
        assert backend.device_type and backend.collective_backend
        assert backend.visible_devices_env is None or backend.visible_devices_env.isupper()
        assert isinstance(backend.auto_priority, int)

    def test_availability_explains_itself(self, backend: Backend):
        status = backend.availability()
        assert isinstance(status, Availability)
        assert status.available and status.reason.strip()

    def test_describe_is_json(self, backend: Backend):
        described = json.loads(json.dumps(backend.describe()))
        assert described["name"] == backend.name and described["available"] is True
        assert described["device_count"] >= 1

    # --- placement --------------------------------------------------------------------------------
    def test_tensors_round_trip_through_the_device(self, backend: Backend):
        import torch

        backend.set_device(0)
        device = backend.device(0)
        assert isinstance(device, torch.device)
        data = torch.arange(6, dtype=torch.float32)
        on_device = data.to(device)
        assert on_device.device.type == device.type
        backend.synchronize()
        assert torch.equal((on_device * 2).cpu(), data * 2)

    def test_device_for_every_local_rank(self, backend: Backend):
        count = backend.device_count()
        devices = [backend.device(rank) for rank in range(count + 1)]
        assert devices[count] == devices[0], "local ranks beyond the device count wrap around"

    def test_seed_makes_random_draws_repeatable(self, backend: Backend):
        import torch

        device = backend.device(0)
        backend.seed(1234)
        first = torch.rand(8, device=device)
        backend.seed(1234)
        again = torch.rand(8, device=device)
        assert torch.equal(first.cpu(), again.cpu())

    # --- memory -----------------------------------------------------------------------------------
    def test_memory_stats_track_an_allocation(self, backend: Backend):
        import torch

        backend.reset_peak_memory()
        before = backend.memory_stats()
        assert isinstance(before, MemoryStats) and before.allocated >= 0
        block = torch.ones(32 * 2**20 // 4, device=backend.device(0))  # 32 MiB
        block.add_(1)
        during = backend.memory_stats()
        assert during.peak >= during.allocated > 0
        assert during.peak >= before.allocated
        del block

    # --- dtypes -----------------------------------------------------------------------------------
    def test_dtypes(self, backend: Backend):
        import torch

        supported = backend.supported_dtypes()
        assert torch.float32 in supported
        assert backend.preferred_dtype() in supported
        dtype = next((d for d in supported if d != torch.float32), None)
        if dtype is None:
            pytest.skip("backend trains in fp32 only")
        a = torch.randn(4, 4, device=backend.device(0))
        with backend.autocast(dtype):
            assert (a @ a).dtype == dtype

    # --- 64-bit policy ----------------------------------------------------------------------------
    def test_coerce_narrows_exactly_what_the_device_lacks(self, backend: Backend):
        import torch

        batch = {
            "input_ids": torch.tensor([[1, 2, 3]]),
            "scores": torch.tensor([0.5], dtype=torch.float64),
            "mask": torch.tensor([True]),
            "nested": [torch.tensor([7])],
            "name": "sample-1",
        }
        out = backend.coerce(batch)
        narrow = backend.sixty_four_bit_policy().narrow
        expect_ids = narrow.get(torch.int64, torch.int64)
        assert out["input_ids"].dtype == expect_ids and out["input_ids"].tolist() == [[1, 2, 3]]
        assert out["scores"].dtype == narrow.get(torch.float64, torch.float64)
        assert out["mask"].dtype == torch.bool and out["nested"][0].dtype == expect_ids
        assert out["name"] == "sample-1"

    def test_coerce_refuses_values_that_do_not_fit(self, backend: Backend):
        import torch

        if not backend.sixty_four_bit_policy().lacks_64bit:
            pytest.skip("backend computes in 64 bits: nothing is narrowed")
        with pytest.raises(SixtyFourBitError, match=r"\['position_ids'\].*2199023255552"):
            backend.coerce({"position_ids": torch.tensor([1, 2**41])})

    def test_training_step(self, backend: Backend):
        import math

        loss = run_training_step(backend, _batch())
        assert math.isfinite(loss) and loss > 0

    def test_guard_fails_a_step_that_leaks_int64(self, backend: Backend):
        if not backend.sixty_four_bit_policy().lacks_64bit:
            pytest.skip("backend computes in 64 bits: there is nothing to guard")
        with pytest.raises(SixtyFourBitError, match=r"aten\.add\.Tensor got a int64 tensor"):
            run_training_step(backend, _batch(), leak_int64=True)

    # --- integration with the Trainer -------------------------------------------------------------
    def test_training_arguments_put_the_trainer_on_the_backend_device(self, backend: Backend, tmp_path):
        from accelerate.state import PartialState
        from transformers import Seq2SeqTrainingArguments

        PartialState._reset_state()
        args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to="none", **backend.training_arguments())
        assert args.device.type == backend.device(0).type
        PartialState._reset_state()

    def test_deepspeed_info(self, backend: Backend):
        info = backend.deepspeed()
        assert info.accelerator and isinstance(info.usable, bool)
        assert info.installed or "not installed" in info.note
