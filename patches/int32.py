"""64-bit-free positions: the remote code builds position ids with ``dtype=torch.long`` and P-Tuning's
prefix token ids with ``.long()``; on a device without 64-bit kernels both are narrowed silently on every
step. Build the same values in int32. (Token ids, masks and labels are narrowed by the backend before
they are moved; generation's int64 bookkeeping stays on the host side of the model's forward.)
"""

from __future__ import annotations

from glmport.patches.layouts import SEQUENCE_FIRST

from glmport.patching import Patch


def int32_position_ids(self, input_ids, device):
    import torch

    batch, length = input_ids.shape
    return torch.arange(length, dtype=torch.int32, device=device).unsqueeze(0).expand(batch, length)


def int32_prompt(self, batch_size, device, dtype=None):
    """ChatGLM2/3's P-Tuning v2 prompt: per layer a ``[2, prefix, batch, kv_groups, head_dim]`` key/value
    pair from the prefix encoder, with int32 prefix ids."""
    import torch

    dtype = dtype if dtype is not None else torch.half
    prefix_ids = torch.arange(self.pre_seq_len, dtype=torch.int32, device=device).unsqueeze(0).expand(batch_size, -1)
    encoded = self.prefix_encoder(prefix_ids).type(dtype)
    layers = encoded.view(batch_size, self.pre_seq_len, 2 * self.num_layers, self.multi_query_group_num, self.kv_channels)
    layers = self.dropout(layers)
    return layers.permute([2, 1, 0, 3, 4]).split(2)


def apply(ctx) -> None:
    ctx.replace("ChatGLMPreTrainedModel.get_position_ids", int32_position_ids)
    if ctx.module_family in SEQUENCE_FIRST:  # ChatGLM2/3 build their own P-Tuning v2 prefix
        ctx.replace("ChatGLMModel.get_prompt", int32_prompt)


def patch(family: str, *, requires, modes=("infer", "train")) -> Patch:
    own_prefix = ("ChatGLMModel.get_prompt",) if family in SEQUENCE_FIRST else ()
    replaces = ("ChatGLMPreTrainedModel.get_position_ids",) + own_prefix
    return Patch(
        "int32-positions", family=family, file="modeling", replaces=replaces,
        why="position ids and prefix ids in int32 (the device narrows 64-bit data silently)",
        apply=apply, requires=requires, modes=modes,
    )
