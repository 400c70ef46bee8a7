"""Native GLM (transformers' ``GlmModel`` and ``Glm4Model``): build the attention mask with 32-bit indices.

transformers builds causal/padding masks from ``torch.arange`` index tensors, which are int64; on a device
without 64-bit kernels every mask of every step is computed through narrowed data. This replacement of
``create_causal_mask`` (as imported by ``modeling_glm`` or ``modeling_glm4``: the same function, called the
same way) compares int32 positions instead. It returns
``None`` where no mask is needed (no padding, SDPA: the kernel's causal flag does the job) and
otherwise a ``[batch, 1, query, key]`` mask: boolean for SDPA-style kernels, additive float for eager.
Each query row can at least see itself, so left-padded rows never softmax over nothing.
"""

from __future__ import annotations

from glmport.patching import Patch


def mask32(config, inputs_embeds, attention_mask, cache=None, position_ids=None, *, past_key_values=None,
           **_ignored):
    """``cache`` is what transformers >= 5.24 passes; ``past_key_values`` what earlier 5.x releases pass."""
    import torch

    cache = cache if cache is not None else past_key_values
    batch, query = inputs_embeds.shape[:2]
    past = cache.get_seq_length() if cache is not None else 0
    keys = past + query
    padded = attention_mask is not None and not bool((attention_mask[:, -keys:] != 0).all())
    eager = getattr(config, "_attn_implementation", "sdpa") == "eager"
    if not padded and (query == 1 or past == 0) and not eager:  # SDPA's causal flag does the job
        return None
    device = inputs_embeds.device
    q_pos = torch.arange(past, keys, dtype=torch.int32, device=device)
    k_pos = torch.arange(keys, dtype=torch.int32, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if padded:
        allowed = allowed & (attention_mask[:, None, None, -keys:] != 0)
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None, None]
    allowed = allowed.expand(batch, 1, query, keys)
    if eager:  # eager attention adds the mask to the scores and applies no causal flag of its own
        blocked = torch.finfo(inputs_embeds.dtype).min
        return torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=device).masked_fill(~allowed, blocked)
    return allowed


def apply(ctx) -> None:
    ctx.replace("create_causal_mask", mask32)


def patch(family: str = "glm-native", *, requires) -> Patch:
    """``family``: ``glm-native`` (``modeling_glm``) or ``glm4-native`` (``modeling_glm4``)."""
    return Patch(
        id="native-mask32",
        family=family,
        file="transformers",
        replaces=("create_causal_mask",),
        why="transformers' mask builder indexes with int64 aranges; build the causal/padding mask from int32 positions",
        apply=apply,
        requires=requires,
    )
