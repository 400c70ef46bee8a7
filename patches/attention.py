"""Attention for vendor devices and for training on padded batches.

Upstream, ChatGLM3's ``CoreAttention`` uses SDPA on torch >= 2 with a ``[batch, 1, seq, seq]`` boolean
mask whenever a batch has padding, and falls back to a path that builds its causal mask with a boolean
``tril_`` (unsupported on MLU); GLM-4's eager ``CoreAttention`` always takes that path. Cambricon's
training port replaced it with ``flash_attn_varlen_func`` but (a) its fallback still called the dropout
module it had deleted, (b) it ignored the padding mask, and (c) its causal test reduced to "mask is None".

This replacement:

* with the backend's variable-length kernel (``Backend.varlen_attention``), attends over the real tokens
  of each sequence with int32 ``cu_seqlens`` and ``causal=True`` for prefill/training steps, and builds no
  dense mask at all;
* otherwise uses SDPA: causal flag when there is no mask, the model's mask (True = masked) when there is;
  never a boolean ``tril_``.

With the kernel, the mask that travels through the layers is 2-D ``[batch, seq]``: 0 for padding, and
equal nonzero numbers for the tokens of one sequence. ``get_masks`` returns the padding mask itself (one
sequence per row, as GLM-4 does for its FlashAttention2 class) instead of a dense ``[batch, 1, seq, seq]``
one; a packed batch (:mod:`glmport.data.packing`) gets its segment numbers (1, 2, ... per sample), so each
sample of a row is its own sequence and no sample sees another. Attention tells a 2-D mask from a dense one
by rank. The mask travels through the layers' own arguments, so gradient checkpointing's recomputation
(whole layers, or a wrapper around ``CoreAttention.forward``) sees exactly what the forward saw.

Grouped key/value heads: the remote code expands the 2 key/value groups to every query head (``expand``
then ``.contiguous()`` in ``SelfAttention.forward``) before calling ``CoreAttention``. The kernel takes
grouped heads (flash-attn's convention), so for GLM-4, whose ``CoreAttention`` keeps the config, the
varlen path hands it one head per group (a view of the expanded copy): the gathered and saved key/value
tensors are the groups' size, not the heads'. ChatGLM2/3's ``CoreAttention`` does not keep the config, so
there the kernel gets the expanded heads.
"""

from __future__ import annotations

from glmport.patches.layouts import SEQUENCE_FIRST

from glmport.patching import Patch

# Set on ChatGLMModel: True where attention takes a 2-D segment mask (the kernel path). glmport.data.packing
# reads it (by this name) to hand a packed batch its segment numbers instead of a dense block-diagonal mask.
SEGMENT_MASKS = "_glmport_segment_masks"
_SEQUENCES = None  # per mask tensor, weakly held (gone with the step's mask): its sequences, see _sequences

ATTENTION_CLASSES = {"chatglm3": ("CoreAttention",), "glm4": ("CoreAttention", "SdpaAttention"),
                     "chatglm2": ("CoreAttention",)}


def _dropout_p(module) -> float:
    dropout = getattr(module, "attention_dropout", None)  # the Cambricon port deleted this module
    return float(getattr(dropout, "p", 0.0)) if module.training else 0.0


def _sequences(mask, length: int):
    """``(keep, cu_seqlens, longest)`` for the last ``length`` positions of a 2-D mask: ``keep`` the real
    tokens ``[batch, seq]``; each run of equal nonzero values in a row is one sequence. Computed once per
    mask tensor, which every layer and a non-reentrant checkpoint's recompute get: one host sync per forward."""
    import torch

    global _SEQUENCES
    if _SEQUENCES is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _SEQUENCES = WeakIdKeyDictionary()
    cached = _SEQUENCES.get(mask)  # nothing writes into a mask in place once the model has it
    if cached is not None and cached[0] == length:
        return cached[1]
    segments = mask[:, -length:]
    keep = segments != 0
    previous = torch.cat((torch.zeros_like(segments[:, :1]), segments[:, :-1]), dim=-1)
    starts = (keep & (segments != previous))[keep]  # per real token, row-major: does a sequence start here?
    # int32 throughout (the kernel's convention, and MLU has no 64-bit kernels): the start offsets, then the total
    offsets = torch.arange(starts.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens = offsets[torch.cat((starts, starts.new_ones(1)))]
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.shape[0] > 1 else 0
    _SEQUENCES[mask] = (length, (keep, cu_seqlens, longest))
    return keep, cu_seqlens, longest


def _varlen(q, k, v, mask, kernel, dropout):
    """q ``[batch, heads, seq, dim]``, k/v ``[batch, heads or groups, seq, dim]``; ``mask`` ``[batch, seq]``
    (see :func:`_sequences`)."""
    batch, heads, length, dim = q.shape
    keep, cu_seqlens, longest = _sequences(mask, length)
    out = q.new_zeros(batch, length, heads, dim)
    if longest:
        packed = kernel(q.transpose(1, 2)[keep], k.transpose(1, 2)[keep], v.transpose(1, 2)[keep],
                        cu_seqlens, cu_seqlens, longest, longest, dropout_p=dropout, softmax_scale=None, causal=True)
        out[keep] = packed.to(out.dtype)
    return out.transpose(1, 2)


def _kv_groups(module, heads: int) -> int | None:
    """Key/value groups of a multi-query ``CoreAttention`` that keeps its config (GLM-4), else ``None``."""
    config = getattr(module, "config", None)
    groups = getattr(config, "multi_query_group_num", None) if getattr(config, "multi_query_attention", False) else None
    return groups if groups and groups < heads and heads % groups == 0 else None


def _grouped(t, groups: int | None):
    """The remote code's expanded ``[batch, heads, seq, dim]`` keys/values, one head per group (a view): the
    expansion is group-major (``unsqueeze`` + ``expand`` at the group axis), so head ``g * per_group`` is group
    ``g``; the gradient reaches the group through that head alone, which is what the expansion's sum gives."""
    if groups is None or t.shape[1] == groups:
        return t
    return t.unflatten(1, (groups, t.shape[1] // groups))[:, :, 0]


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
        if attention_mask is not None and attention_mask.dim() == 2:  # padding or segment mask, see above
            groups = _kv_groups(self, heads)
            out = _varlen(q, _grouped(k, groups), _grouped(v, groups), attention_mask, kernel, dropout)
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
    ctx.add(f"ChatGLMModel.{SEGMENT_MASKS}", kernel is not None)
    if kernel is not None:
        _padding_instead_of_dense_mask(ctx)


def patch(family: str, *, requires, modes=("infer", "train")) -> Patch:
    replaces = tuple(f"{name}.forward" for name in ATTENTION_CLASSES[family]) + ("ChatGLMModel.get_masks",)
    return Patch(
        "attention-varlen", family=family, file="modeling", replaces=replaces, adds=(f"ChatGLMModel.{SEGMENT_MASKS}",),
        why="attention via the variable-length kernel when the device has one, else SDPA; no boolean tril_, "
            "padding respected, causal flag right",
        apply=apply, requires=requires, modes=modes,
    )
