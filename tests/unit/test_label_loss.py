"""The fused chunked label-row loss (:class:`glmport.train.loss.ChunkedLinearCrossEntropy`): the same loss and
gradients as cross-entropy over the full logits, one chunk of logits at a time, no output-layer recompute, and
the fallbacks that must call the head module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from glmport.train import loss

WIDTH, VOCAB = 16, 300


class _OpLog(TorchDispatchMode):
    """Every aten op run, and the most rows of any logits-shaped (``[rows, VOCAB]``) tensor an op made (views of
    the weight, ``[WIDTH, VOCAB]``, aside)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.logit_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        view = func._schema.returns[0].alias_info is not None if func._schema.returns else False
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not view and t.dim() == 2 and t.shape[1] == VOCAB:
                self.logit_rows = max(self.logit_rows, t.shape[0])
        return out


def _batch(label_rows: int, seed: int = 0, dtype=torch.float32):
    """hidden [2, S, WIDTH] and labels with ``label_rows`` labels in all (prompt positions -100)."""
    g = torch.Generator().manual_seed(seed)
    seq = label_rows // 2 + 6
    hidden = torch.randn(2, seq, WIDTH, generator=g).to(dtype)
    labels = torch.full((2, seq), -100)
    per_row = (label_rows // 2, label_rows - label_rows // 2)
    for row, n in enumerate(per_row):
        labels[row, seq - n:] = torch.randint(0, VOCAB, (n,), generator=g)
    return hidden, labels


def _head(bias: bool, trains: bool, dtype=torch.float32):
    torch.manual_seed(1)
    head = torch.nn.Linear(WIDTH, VOCAB, bias=bias).to(dtype)
    head.requires_grad_(trains)
    return head


def _grads(fn, hidden, labels, head):
    """(loss, grad of hidden, grads of the head's trainable parameters)."""
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    total = fn(hidden, labels, head)
    total.backward()
    return total.detach(), hidden.grad, [p.grad for p in head.parameters() if p.requires_grad]


def _fused(hidden, labels, head):
    total, count = loss.label_loss_sum(hidden, labels, head)
    assert count == int((labels[:, 1:] != -100).sum())
    return total


def _reference(hidden, labels, head):
    logits = head(hidden)[:, :-1].float().reshape(-1, VOCAB)
    return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def _close(a, b, atol, rtol=1e-5):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol), (a.float() - b.float()).abs().max()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("trains", [False, True], ids=["frozen-head", "trained-head"])
@pytest.mark.parametrize("label_rows", [0, 5, 23])  # none; one chunk; three chunks, the last ragged
def test_fused_loss_matches_full_logits_cross_entropy(monkeypatch, bias, trains, label_rows):
    monkeypatch.setattr(loss, "CHUNK_ROWS", 8)
    hidden, labels = _batch(label_rows)
    head = _head(bias, trains)
    with _OpLog() as log:
        fused = _grads(_fused, hidden, labels, head)
    reference = _grads(_reference, hidden, labels, head)
    _close(fused[0], reference[0], atol=1e-4)
    _close(fused[1], reference[1], atol=1e-5)
    assert len(fused[2]) == len(reference[2]) == (1 + bias if trains else 0)
    for a, b in zip(fused[2], reference[2]):
        _close(a, b, atol=1e-5)
    # work: one forward and one grad-input matmul per chunk, plus one grad-weight matmul when the head trains
    chunks = -(-label_rows // 8)
    matmuls = sum(op.startswith(("aten.mm", "aten.addmm", "aten.linear", "aten.matmul")) for op in log.ops)
    assert matmuls == 1 + chunks * (2 + trains), log.ops  # 1: the one-row probe of the compute dtype


def test_fused_loss_under_bf16_autocast_matches_autocast_reference(monkeypatch):
    """The head computes in autocast's dtype as ``head(rows)`` would; the softmax and dW are fp32."""
    monkeypatch.setattr(loss, "CHUNK_ROWS", 8)
    hidden, labels = _batch(21)
    head = _head(bias=True, trains=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _grads(_fused, hidden, labels, head)
        reference = _grads(_reference, hidden, labels, head)
    exact = _grads(_reference, hidden, labels, head)  # fp32 throughout
    _close(fused[0], reference[0], atol=0.2, rtol=1e-2)
    for a, b, c in zip([fused[1], *fused[2]], [reference[1], *reference[2]], [exact[1], *exact[2]]):
        assert a.dtype == c.dtype == torch.float32
        _close(a, b, atol=2e-2, rtol=2e-2)
        # no further from fp32 than autograd's own bf16 path is
        assert (a - c).abs().max() <= 2 * (b - c).abs().max() + 1e-3


def test_bf16_rows_and_frozen_bf16_head_give_bf16_row_gradients(monkeypatch):
    """LoRA on a bf16 model: the frozen bf16 output layer, bf16 hidden states."""
    monkeypatch.setattr(loss, "CHUNK_ROWS", 8)
    hidden, labels = _batch(19, dtype=torch.bfloat16)
    head = _head(bias=False, trains=False, dtype=torch.bfloat16)
    fused, reference = _grads(_fused, hidden, labels, head), _grads(_reference, hidden, labels, head)
    assert fused[1].dtype == torch.bfloat16
    _close(fused[0], reference[0], atol=0.1, rtol=1e-2)
    _close(fused[1], reference[1], atol=1e-2, rtol=2e-2)


def test_only_one_chunk_of_logits_exists_and_none_is_kept_for_backward(monkeypatch):
    monkeypatch.setattr(loss, "CHUNK_ROWS", 8)
    label_rows = 64
    hidden, labels = _batch(label_rows)
    head = _head(bias=True, trains=True)
    saved: list[torch.Size] = []

    def keep(t):
        saved.append(t.shape)
        return t

    hidden = hidden.clone().requires_grad_(True)
    with _OpLog() as log, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        total, _ = loss.label_loss_sum(hidden, labels, head)
    with _OpLog() as backward_log:
        total.backward()
    # logits of one chunk at a time in the forward, none in the backward (the full logits: 64 rows)
    assert log.logit_rows == 8 and backward_log.logit_rows == 0
    # kept for backward: the rows' gradient, the head's gradients and the index bookkeeping, no logits
    assert torch.Size([label_rows, WIDTH]) in saved and torch.Size([VOCAB, WIDTH]) in saved
    assert all(VOCAB not in shape or shape in (torch.Size([VOCAB, WIDTH]), torch.Size([VOCAB])) for shape in saved)
    assert sum(torch.Size(s).numel() for s in saved) < label_rows * WIDTH * 3 + VOCAB * (WIDTH + 1) + 1


def test_int32_labels_pass_the_64bit_guard_on_emulated_mlu(monkeypatch):
    """64-bit-clean devices narrow labels to int32: on an emulated MLU with the guard in error mode, the fused
    loss's forward and backward create no int64 tensor, with the head frozen and trained."""
    from glmport.guard import sixty_four_bit_guard
    from glmport.plugins import PluginManager
    from glmport.testing.emulation import emulating

    monkeypatch.setattr(loss, "CHUNK_ROWS", 8)
    hidden, labels = _batch(20)
    for trains in (False, True):
        head = _head(bias=True, trains=trains)
        reference = _grads(_reference, hidden, labels, head)
        with emulating("mlu"):
            mlu = PluginManager(autoload=False).backends.get("mlu")
            narrowed = mlu.coerce({"labels": labels})["labels"]
            assert narrowed.dtype == torch.int32
            guard = sixty_four_bit_guard(mlu.sixty_four_bit_policy().narrow.keys(), label="mlu", mode="error")
            with mlu.compute_context(), guard as report:
                fused = _grads(_fused, hidden, narrowed, head)
        assert report.clean and report.ops_checked > 10
        for a, b in zip([fused[0], fused[1], *fused[2]], [reference[0], reference[1], *reference[2]]):
            _close(a, b, atol=1e-4)


class _Wrapped(torch.nn.Module):
    """A head that must be called (what peft's wrappers and hooks are): counted calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_heads_that_must_be_called_take_the_module_path(monkeypatch):
    monkeypatch.setattr(loss, "CHUNK_ROWS", 8)
    hidden, labels = _batch(20)
    wrapped = _Wrapped(_head(bias=False, trains=True))
    got, want = _grads(_fused, hidden, labels, wrapped), _grads(_reference, hidden, labels, wrapped.inner)
    assert wrapped.calls == 3 + 3  # three chunks, each recomputed in the backward pass
    for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        _close(a, b, atol=1e-4)

    hooked = _head(bias=False, trains=True)
    calls = []
    hooked.register_forward_pre_hook(lambda module, args: calls.append(1))
    _grads(_fused, hidden, labels, hooked)
    assert calls, "a hooked Linear (accelerate, DeepSpeed) is called"

    partitioned = _head(bias=False, trains=True)
    partitioned.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks a partitioned parameter with
    assert not loss._plain_linear(partitioned) and loss._plain_linear(_head(bias=True, trains=False))


def test_without_grad_no_gradient_is_computed(monkeypatch):
    monkeypatch.setattr(loss, "CHUNK_ROWS", 8)
    hidden, labels = _batch(20)
    head = _head(bias=True, trains=True)
    with torch.no_grad(), _OpLog() as log:
        total, count = loss.label_loss_sum(hidden, labels, head)
    assert count == 20 and not total.requires_grad
    assert sum(op.startswith(("aten.mm", "aten.addmm", "aten.linear")) for op in log.ops) == 3  # forward only
    _close(total, _reference(hidden, labels, head).detach(), atol=1e-4)
