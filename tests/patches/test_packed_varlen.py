"""Packed rows through the backend's variable-length attention kernel (issue 16), in this process.

With the kernel (the emulated MLU's CPU reference, 64-bit guard on), the packing hook hands the layers the
``[batch, seq]`` segment numbers: every sample of a row is its own sequence in int32 ``cu_seqlens``, no
dense ``[batch, 1, seq, seq]`` mask is built, gradient checkpointing's recompute sees the same sequences,
and GLM-4's key/value groups reach the kernel unexpanded. Without it (cpu), the block-diagonal mask stays.
Either way a sample's outputs and gradients do not depend on the other samples of its row.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from patchkit import backend, on_device, patched_model, source_params, token_batch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from glmport.data.packing import PackingCollator, enable_packed_attention
from glmport.guard import sixty_four_bit_guard

SOURCES = [p for p in source_params(upstream=False, families=("chatglm3", "glm4"))
           if p.values[0].name in ("chatglm3-2023-12", "glm4-2024-07")]
LENGTHS = (4, 3, 6, 2, 5)  # first fit into rows of 9: [4, 3, 2], [6], [5]
ROW_TOKENS = 9


def _features(family: str, lengths=LENGTHS, seed: int = 7) -> list[dict]:
    ids = token_batch(family, rows=len(lengths), length=max(lengths), seed=seed)
    return [{"input_ids": ids[i, :n].tolist(), "labels": ids[i, :n].tolist()} for i, n in enumerate(lengths)]


class _Shapes(TorchDispatchMode):
    """The shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.seen.add(tuple(value.shape))
        return out


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call of the variable-length kernel the backends hand out: (cu_seqlens_q, max_seqlen_q, kv heads)."""
    calls = []

    def recording(kernel):
        def run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
            calls.append((cu_seqlens_q.clone(), max_seqlen_q, k.shape[1]))
            return kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)

        return run

    from glmport.backends._device import DeviceModuleBackend

    original = DeviceModuleBackend.varlen_attention
    monkeypatch.setattr(DeviceModuleBackend, "varlen_attention",
                        lambda self: None if original(self) is None else recording(original(self)))
    return calls


@contextlib.contextmanager
def _packed_model(source, model_dir, backend_name: str):
    """``(model, backend)``: the patched tiny model with the packing hook, on ``backend_name`` (``mlu``:
    emulated; :func:`_guarded` gives its 64-bit guard)."""
    with on_device("mlu" if backend_name == "mlu" else None):
        device = backend(backend_name)
        with patched_model(model_dir(source), backend_name, "train") as (model, _):
            handle = enable_packed_attention(model)
            try:
                yield model, device
            finally:
                handle.remove()


def _guarded(device):
    if not device.sixty_four_bit_policy().lacks_64bit:
        return contextlib.nullcontext()
    return sixty_four_bit_guard(device.sixty_four_bit_policy().narrow.keys(), label=device.name, mode="error")


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("backend_name", ["mlu", "cpu"])
def test_packed_rows_use_the_kernel_without_a_dense_mask(source, backend_name, model_dir, kernel_calls):
    batch = PackingCollator(pad_token_id=0, row_tokens=ROW_TOKENS)(_features(source.family))
    rows, width = batch["input_ids"].shape
    assert (rows, width) == (3, 9)
    dense = {(rows, 1, width, width), (rows, width, width)}  # the mask, and get_masks' float [b, s, s]
    with _packed_model(source, model_dir, backend_name) as (model, device):
        batch = device.coerce(batch)
        model.gradient_checkpointing_enable()
        model.train()
        shapes = _Shapes()
        with device.compute_context(), _guarded(device) as report, shapes:
            model(**batch, use_cache=False).loss.backward()
    if backend_name == "cpu":  # no kernel: SDPA over the rows with the block-diagonal mask (the control)
        assert kernel_calls == [] and (rows, 1, width, width) in shapes.seen
        return
    assert report.clean and report.ops_checked > 100
    assert not dense & shapes.seen, sorted(dense & shapes.seen)
    layers = model.config.num_layers
    assert len(kernel_calls) == 2 * layers  # each layer's forward, and its recompute for the backward
    groups = model.config.multi_query_group_num if source.family == "glm4" else model.config.num_attention_heads
    for cu_seqlens, longest, kv_heads in kernel_calls:
        assert cu_seqlens.dtype == torch.int32
        assert cu_seqlens.tolist() == [0, 4, 7, 9, 15, 20] and longest == 6  # one sequence per sample
        assert kv_heads == groups  # GLM-4: the 2 key/value groups, not the 4 expanded heads


def _a_outputs(model, device, family: str, b_length: int, b_seed: int):
    """Logits of sample A packed after a sample B, and the gradients of a loss on A's logits alone."""
    sample_a = _features(family, lengths=(6,), seed=11)[0]
    sample_b = _features(family, lengths=(b_length,), seed=b_seed)[0]
    batch = device.coerce(PackingCollator(pad_token_id=0, row_tokens=16)([sample_b, sample_a]))
    assert batch["input_ids"].shape[0] == 1  # one row: B then A
    embedded = []
    hook = model.transformer.embedding.register_forward_hook(lambda m, args, out: embedded.append(out) or out.retain_grad())
    try:
        model.zero_grad()
        with device.compute_context(), _guarded(device):
            logits = model(**batch, use_cache=False).logits
            weights = torch.linspace(-1, 1, logits.shape[-1])
            a_logits = logits[0, b_length:]
            (a_logits * weights).sum().backward()
    finally:
        hook.remove()
    (embeds,) = embedded  # [seq, 1, hidden] (ChatGLM3) or [1, seq, hidden] (GLM-4): one row either way
    b_grad = embeds.grad.reshape(-1, embeds.shape[-1])[:b_length]
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return a_logits.detach(), grads, b_grad


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("backend_name", ["mlu", "cpu"])
def test_a_sample_never_sees_the_other_samples_of_its_row(source, backend_name, model_dir, kernel_calls):
    with _packed_model(source, model_dir, backend_name) as (model, device):
        model.train()
        logits_1, grads_1, b_grad_1 = _a_outputs(model, device, source.family, b_length=4, b_seed=1)
        logits_2, grads_2, b_grad_2 = _a_outputs(model, device, source.family, b_length=7, b_seed=2)
        alone = device.coerce({"input_ids": torch.tensor([_features(source.family, lengths=(6,), seed=11)[0]["input_ids"]])})
        with device.compute_context(), _guarded(device), torch.no_grad():
            logits_alone = model(**alone, use_cache=False).logits[0]
    assert bool(kernel_calls) == (backend_name == "mlu")
    torch.testing.assert_close(logits_1, logits_2, atol=1e-5, rtol=0)  # B changed (tokens and length): A did not
    torch.testing.assert_close(logits_1, logits_alone, atol=1e-5, rtol=0)  # and A packed is A alone
    assert grads_1.keys() == grads_2.keys() and grads_1
    for name in grads_1:  # relative to each gradient's norm: the summed logits make them large (up to ~1e3)
        difference = float((grads_1[name] - grads_2[name]).norm() / grads_1[name].norm())
        assert difference < 1e-5, (name, difference)
    assert torch.count_nonzero(b_grad_1) == 0 and torch.count_nonzero(b_grad_2) == 0  # A's loss never reaches B
