"""Native GLM (transformers' ``GlmModel``): default position ids in int32.

When no ``position_ids`` are passed (generation never passes them for GLM), ``GlmModel.forward`` builds
them with ``torch.arange`` (int64) plus the cache length. This wrapper builds the same positions in int32
before calling the original forward, so the numbers are unchanged and nothing 64-bit reaches the device.
"""

from __future__ import annotations

import functools

from glmport.patching import Patch


def apply(ctx) -> None:
    import torch

    original = ctx.original("GlmModel.forward")

    @functools.wraps(original)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, *args, **kwargs):
        if position_ids is None:
            source = input_ids if input_ids is not None else inputs_embeds
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + source.shape[1], dtype=torch.int32, device=source.device)[None]
        return original(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, *args, **kwargs)

    ctx.replace("GlmModel.forward", forward)


def patch(*, requires) -> Patch:
    return Patch(
        id="native-positions32",
        family="glm-native",
        file="transformers",
        replaces=("GlmModel.forward",),
        why="GlmModel.forward builds default position ids with an int64 arange; build the same ones in int32",
        apply=apply,
        requires=requires,
    )
