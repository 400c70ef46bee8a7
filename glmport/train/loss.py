"""Causal-LM cross-entropy computed on label positions only, never on full-vocabulary logits.

The remote ChatGLM code upcasts the whole ``[batch, seq, vocab]`` logits to fp32 (plus a shifted copy)
before its loss: 2 GB per copy at 8k tokens for ChatGLM3's 65k vocabulary, 5 GB for GLM-4's 151k. And
in SFT data most positions are prompt tokens without a label, so most of the output layer's work is
thrown away. We run the model with its output layer swapped for an identity, gather the hidden states at
label positions, and apply the real output layer to those rows only, in chunks of ``CHUNK_ROWS`` rows.

Per chunk the fp32 logits of a 65k vocabulary are large (1 GB at 4,096 rows), so only one chunk's may exist
at a time. Checkpointing each chunk did that but ran the output layer's forward twice, and at small shapes
the output layer is most of the step's linear work (83 % at the ``mini`` bench shape). A plain ``Linear``
head now goes through :class:`ChunkedLinearCrossEntropy` instead, which computes each chunk's gradients in
the forward pass while its logits exist and keeps only the gradients for the backward pass: the forward
matmul and the gradient matmuls, nothing recomputed. Measured forward + backward of this function at the
``mini`` dims (hidden 512, vocabulary 65,024, 10,240 label rows, fp32, 2 threads, best of 3 on a 2-core CPU
shared at load average 2-4): 24.2 s with checkpointed chunks, 10.4 s fused for a frozen head (LoRA; 1.7-2.3x
rep by rep); 25.8 s and 19.5 s when the head trains (1.3-1.5x). A head that must be called (peft's LoRA or
modules_to_save wrapper on the output layer, forward hooks, a DeepSpeed ZeRO-3 partitioned weight, which is
gathered only around calls) keeps the checkpointed chunks.

All of that happens inside the forward of the module that DDP or DeepSpeed wraps (the model's forward is
replaced for one call), and the loss comes back in that forward's output. Applying the output layer after
the wrapper's forward had returned broke full SFT, where the output layer trains: DDP looks for the
parameters a step uses in what its forward returns, took the head's for unused, and then failed when their
gradients arrived ("Expected to mark a variable ready only once"); DeepSpeed ZeRO-3 gathers a layer's
partitioned weights only around calls it sees. Inside, the head's gradients are synchronized like any
other layer's.

Measured on the tiny quick-start model (2-core CPU, 16 samples x ~45 tokens, vocabulary 65,024): a LoRA
step took 1.23 s with full-vocabulary logits and 0.74 s with this.

Every tensor stays 32-bit (labels are narrowed on 32-bit devices), so the loss is 64-bit clean too.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

CHUNK_ROWS = 4096


def _wrapped(model):
    """The module a DDP / DeepSpeed wrapper runs (``model`` itself when it is not wrapped)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module) and not hasattr(model, "get_base_model"):
        model = model.module
    return model


def _unwrap(model):
    model = _wrapped(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_layer_slot(model):
    """(owner, attribute) of the vocabulary projection: ``lm_head`` (native) or
    ``transformer.output_layer`` (remote code)."""
    base = _unwrap(model)
    if hasattr(base, "lm_head"):
        return base, "lm_head"
    transformer = getattr(base, "transformer", None)
    if transformer is not None and hasattr(transformer, "output_layer"):
        return transformer, "output_layer"
    raise AttributeError(f"{type(base).__name__} has neither lm_head nor transformer.output_layer")


@contextlib.contextmanager
def hidden_states_as_logits(model):
    """Within the block the model's forward returns final hidden states where it returned logits;
    yields the real output layer."""
    owner, name = output_layer_slot(model)
    head = getattr(owner, name)
    setattr(owner, name, torch.nn.Identity())
    try:
        yield head
    finally:
        setattr(owner, name, head)


def label_loss_sum(hidden, labels, head):
    """Sum of token losses predicting ``labels[:, 1:]`` from ``hidden[:, :-1]``, and the token count."""
    targets = labels[:, 1:]
    keep = targets != -100
    rows = hidden[:, :-1][keep]
    kept_targets = targets[keep]
    if torch.is_grad_enabled() and _plain_linear(head):
        return ChunkedLinearCrossEntropy.apply(rows, kept_targets, head.weight, head.bias), int(kept_targets.shape[0])
    # No gradients (evaluation), or a head we must call: peft's LoRA or modules_to_save wrapper, DeepSpeed
    # ZeRO-3, which gathers a partitioned weight only around calls it sees, an identity (patches/train_loss.py).
    # More than one chunk with gradients: each is recomputed in the backward pass instead of keeping its fp32
    # logits (one extra output-layer forward), so memory stays at one chunk.
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    recompute = rows.shape[0] > CHUNK_ROWS and torch.is_grad_enabled()
    for start in range(0, rows.shape[0], CHUNK_ROWS):
        chunk, chunk_targets = rows[start:start + CHUNK_ROWS], kept_targets[start:start + CHUNK_ROWS]
        if recompute:
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, head, chunk, chunk_targets,
                                                              use_reentrant=False)
        else:
            total = total + _chunk_loss(head, chunk, chunk_targets)
    return total, int(kept_targets.shape[0])


def _chunk_loss(head, rows, targets):
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


def _plain_linear(head) -> bool:
    """A ``torch.nn.Linear`` whose forward is ``F.linear`` on its own tensors: no peft wrapper, no hooks (accelerate,
    DeepSpeed) or replaced forward, no ZeRO-3 partitioned weight (``ds_id``)."""
    return (type(head) is torch.nn.Linear and "forward" not in head.__dict__
            and not head._forward_hooks and not head._forward_pre_hooks
            and not any(hasattr(p, "ds_id") for p in (head.weight, head.bias) if p is not None))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(rows @ weight.T + bias, targets, reduction="sum")`` in chunks of ``CHUNK_ROWS`` rows, with
    the gradients computed in the forward pass, chunk by chunk, while that chunk's logits exist.

    Per chunk: the logits in the dtype ``head(rows)`` computes in (autocast's, say bf16), upcast to fp32,
    their log-softmax; the loss; ``softmax - onehot`` in fp32; then the gradient of the rows
    (``grad_logits @ weight``) and, only when the head trains, of the weight and bias (accumulated in fp32).
    Backward scales the saved gradients by the incoming one. The work is the forward matmul plus the
    gradient matmuls autograd would do anyway, nothing recomputed; the memory is one chunk of logits at a
    time, plus the rows' gradient (the size of the rows) and, when the head trains, its weight's gradient.
    """

    @staticmethod
    def forward(ctx, rows, targets, weight, bias):
        need_rows, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_bias = bias is not None and ctx.needs_input_grad[3]
        # The dtype head(rows) computes in: autocast decides (a one-row probe), as it would for the module.
        compute = F.linear(rows[:1], weight[:1], None if bias is None else bias[:1]).dtype
        w = weight.to(compute)
        b = None if bias is None else bias.to(compute)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            chunk, chunk_targets = rows[start:start + CHUNK_ROWS].to(compute), targets[start:start + CHUNK_ROWS]
            log_probs = torch.log_softmax(F.linear(chunk, w, b).float(), dim=-1)
            total += F.nll_loss(log_probs, chunk_targets, reduction="sum")
            if not (need_rows or need_weight or need_bias):
                continue
            grad_logits = log_probs.exp_()  # softmax, in place of the log-probabilities
            picked = torch.arange(chunk.shape[0], dtype=targets.dtype, device=rows.device)  # 32-bit like targets
            grad_logits.index_put_((picked, chunk_targets), grad_logits.new_tensor(-1.0), accumulate=True)
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
            grad_logits = grad_logits.to(compute)
            if need_rows:
                grad_rows[start:start + CHUNK_ROWS] = grad_logits @ w
            if need_weight:
                grad_weight += (grad_logits.t() @ chunk).float()
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_rows, grad_weight, grad_bias = ctx.saved_tensors
        if grad_rows is not None:  # scaled in fp32: a bf16 copy of a 1/tokens scale would be off by up to 0.4 %
            grad_rows = (grad_rows.float() * grad_total).to(grad_rows.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_total).to(ctx.dtypes[1])
        return grad_rows, None, grad_weight, grad_bias


def model_loss_sum(model, inputs: dict, labels):
    """Run ``model(**inputs)`` and return (loss sum, label count, outputs); ``model`` may be a DDP or DeepSpeed
    wrapper. ``outputs.loss`` is the loss sum, ``outputs.logits`` the final hidden states."""
    inner = _wrapped(model)
    forward = inner.forward  # the class's, or a wrapper set on the instance (accelerate's autocast)
    own = inner.__dict__.get("forward")
    counted: list[int] = []

    def forward_with_label_loss(*args, **kwargs):
        with hidden_states_as_logits(inner) as head:
            outputs = forward(*args, **kwargs)
        total, count = label_loss_sum(outputs.logits, labels, head)
        counted.append(count)
        outputs["loss"] = total  # returned through the wrapper: DDP sees every parameter the loss used
        return outputs

    inner.forward = forward_with_label_loss
    try:
        outputs = model(**inputs)
    finally:
        if own is not None:
            inner.forward = own
        else:
            del inner.forward
    return outputs["loss"], counted[-1], outputs
