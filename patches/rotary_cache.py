"""Rotary cache built once: ``ChatGLMModel.forward`` calls ``rotary_pos_emb(self.seq_length)`` on every
forward, recomputing cos/sin for the full context (8k positions for ChatGLM3-6B, 128k for GLM-4-9B) each
step. Keep the result per length, dtype and device."""

from __future__ import annotations

from glmport.patching import Patch


def apply(ctx) -> None:
    import torch

    original = ctx.original("RotaryEmbedding.forward")

    def forward(self, max_seq_len, offset=0):
        if torch.is_inference_mode_enabled():  # an inference tensor must not outlive inference mode
            return original(self, max_seq_len, offset)
        key = (max_seq_len, offset, self.inv_freq.dtype, self.inv_freq.device)
        cached = self.__dict__.get("_glmport_rope")
        if cached is None or cached[0] != key:
            cached = (key, original(self, max_seq_len, offset))
            self.__dict__["_glmport_rope"] = cached
        return cached[1]

    ctx.replace("RotaryEmbedding.forward", forward)


def patch(family: str, *, requires, modes=("infer", "train")) -> Patch:
    return Patch(
        "rotary-cache", family=family, file="modeling", replaces=("RotaryEmbedding.forward",),
        why="build the rotary cos/sin table once instead of on every forward",
        apply=apply, requires=requires, modes=modes,
    )
