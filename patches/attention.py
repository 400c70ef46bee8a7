"""Attention for vendor devices and for training on padded batches.

Upstream, ChatGLM3's ``CoreAttention`` uses SDPA on torch >= 2 with a ``[batch, 1, seq, seq]`` boolean
mask whenever a batch has padding, and falls back to a path that builds its causal mask with a boolean
``tril_`` (unsupported on MLU); GLM-4's eager ``CoreAttention`` always takes that path. Cambricon's
training port replaced it with ``flash_attn_varlen_func`` but (a) its fallback still called the dropout
module it had deleted, (b) it ignored the padding mask, and (c) its causal test reduced to "mask is None".

This replacement:

* with the backend's variable-length kernel (``Backend.varlen_attention``), attends over the unpadded
  tokens of each sequence with int32 ``cu_seqlens`` and ``causal=True`` for prefill/training steps; the
  model's ``get_masks`` then skips building the dense mask at all;
* otherwise uses SDPA: causal flag when there is no mask, the model's mask (True = masked) when there is;
  never a boolean ``tril_``.

With the kernel, ``get_masks`` returns the 2-D padding mask itself (as GLM-4 already does for its
FlashAttention2 class) instead of a dense ``[batch, 1, seq, seq]`` one, and attention tells the two apart by
rank. The mask travels through the layers' own arguments, so gradient checkpointing's recomputation
sees exactly what the forward saw.
"""

from __future__ import annotations

from glmport.patches.layouts import SEQUENCE_FIRST

from glmport.patching import Patch

ATTENTION_CLASSES = {"chatglm3": ("CoreAttention",), "glm4": ("CoreAttention", "SdpaAttention"),
                     "chatglm2": ("CoreAttention",)}


def _dropout_p(module) -> float:
    dropout = getattr(module, "attention_dropout", None)  # the Cambricon port deleted this module
    return float(getattr(dropout, "p", 0.0)) if module.training else 0.0


def _varlen(q, k, v, padding, kernel, dropout):
    """q/k/v ``[batch, heads, seq, dim]``; ``padding`` ``[batch, seq]`` (nonzero = real token, each row's
    real tokens contiguous, as right or left padding leaves them)."""
    import torch
    import torch.nn.functional as F

    batch, heads, length, dim = q.shape
    keep = padding[:, -length:] != 0
    lengths = keep.sum(dim=-1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    packed = kernel(q.transpose(1, 2)[keep], k.transpose(1, 2)[keep], v.transpose(1, 2)[keep],
                    cu_seqlens, cu_seqlens, longest, longest, dropout_p=dropout, softmax_scale=None, causal=True)
    out = q.new_zeros(batch, length, heads, dim)
    out[keep] = packed.to(out.dtype)
    return out.transpose(1, 2)


def make_attention_forward(seq_first: bool, kernel):
    import torch.nn.functional as F

    def forward(self, query_layer, key_layer, value_layer, attention_mask):
        if seq_first:  # ChatGLM2/3: [seq, batch, heads, dim]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))
        else:  # GLM-4: [batch, heads, seq, dim]
            q, k, v = query_layer, key_layer, value_layer
        batch, heads, q_len, dim = q.shape
        k_len = k.shape[2]
        dropout = _dropout_p(self)
        if attention_mask is not None and attention_mask.dim() == 2:  # padding mask from get_masks below
            out = _varlen(q, k, v, attention_mask, kernel, dropout)
        elif attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=q_len == k_len and q_len > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout)
        if seq_first:
            return out.permute(2, 0, 1, 3).reshape(q_len, batch, heads * dim)
        return out.transpose(1, 2).reshape(batch, q_len, heads * dim)

    return forward


def _padding_instead_of_dense_mask(ctx) -> None:
    """get_masks: for a prefill/training step (no cache, no P-Tuning prefix), hand the 2-D padding mask
    to the attention modules instead of building the dense mask the variable-length kernel does not need."""
    original = ctx.original("ChatGLMModel.get_masks")

    def get_masks(self, input_ids, past_key_values, padding_mask=None):
        if padding_mask is not None and not past_key_values and getattr(self, "pre_seq_len", None) is None \
                and padding_mask.shape[-1] == input_ids.shape[-1]:
            return padding_mask
        return original(self, input_ids, past_key_values, padding_mask)

    ctx.replace("ChatGLMModel.get_masks", get_masks)


def apply(ctx) -> None:
    kernel = ctx.backend.varlen_attention()
    forward = make_attention_forward(ctx.module_family in SEQUENCE_FIRST, kernel)
    for name in ATTENTION_CLASSES[ctx.module_family]:
        ctx.replace(f"{name}.forward", forward)
    if kernel is not None:
        _padding_instead_of_dense_mask(ctx)


def patch(family: str, *, requires, modes=("infer", "train")) -> Patch:
    replaces = tuple(f"{name}.forward" for name in ATTENTION_CLASSES[family]) + ("ChatGLMModel.get_masks",)
    return Patch(
        "attention-varlen", family=family, file="modeling", replaces=replaces,
        why="attention via the variable-length kernel when the device has one, else SDPA; no boolean tril_, "
            "padding respected, causal flag right",
        apply=apply, requires=requires, modes=modes,
    )
