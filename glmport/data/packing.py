"""Padding-free packed batches: several samples share a row, and none of them sees another.

A micro-batch of samples is packed first-fit, in order, into rows of at most ``row_tokens`` tokens (a
sample longer than that gets a row of its own). By default a row holds at most as many tokens as the
micro-batch's longest sample: the padding goes, and no row is longer than a padded batch's, so attention
(which, without a variable-length kernel, runs over each whole row with a block-diagonal mask) costs no more.
Three things keep a packed row equal to the samples trained one by one:

1. positions restart at 0 for every sample (ChatGLM's rotary table is indexed by ``position_ids``);
2. attention stays inside each sample: :func:`enable_packed_attention` installs a hook on the model that
   turns the restarts into the remote code's ``full_attention_mask``: where the accelerator patch set runs
   attention through the backend's variable-length kernel, the ``[batch, seq]`` segment numbers (each
   sample its own sequence in ``cu_seqlens``, no dense mask built); elsewhere a block-diagonal causal mask
   ``[batch, 1, seq, seq]`` for SDPA;
3. the first label of every sample is -100, so the previous sample's last token does not learn to predict it.

The loss is normalized per label token (:mod:`glmport.train.loss`), so packed and unpacked micro-batches of
the same samples give the same loss. The number of samples per optimizer step does not change.

The hook reads the segments from ``position_ids`` (a real token at position 0 starts a sample), so an
ordinary padded batch (one start per row) and generation with a cache (no start) pass untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from glmport.errors import ConfigError


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Sample indices per row: first fit, in order; a sample longer than ``row_tokens`` fills a row alone."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        for r, left in enumerate(room):
            if length <= left:
                rows[r].append(index)
                room[r] -= length
                break
        else:
            rows.append([index])
            room.append(max(row_tokens - length, 0))
    return rows


@dataclass
class PackingCollator:
    """Packs training rows (``input_ids``, ``labels``) into padding-free rows of at most ``row_tokens``.

    Rows are right-padded to the longest row (padding: ``pad_token_id``, label -100, attention 0)."""

    pad_token_id: int
    row_tokens: int | None = None  # None: the micro-batch's longest sample
    fallback: Callable[[list[dict]], dict] | None = None  # collates what is not a training row (evaluation)

    def __call__(self, features: list[dict]) -> dict:
        if "prompt_ids" in features[0]:
            if self.fallback is None:
                raise ValueError("PackingCollator packs training rows; give it a fallback collator for evaluation")
            return self.fallback(features)
        lengths = [len(f["input_ids"]) for f in features]
        packed = []
        for members in pack_rows(lengths, self.row_tokens or max(lengths)):
            ids, labels, positions = [], [], []
            for i in members:
                sample_labels = list(features[i]["labels"])
                ids += list(features[i]["input_ids"])
                labels += [-100] + sample_labels[1:]
                positions += list(range(lengths[i]))
            packed.append((ids, labels, positions))
        width = max(len(row[0]) for row in packed)
        pad = [width - len(row[0]) for row in packed]
        return {
            "input_ids": torch.tensor([ids + [self.pad_token_id] * n for (ids, _, _), n in zip(packed, pad)]),
            "labels": torch.tensor([labels + [-100] * n for (_, labels, _), n in zip(packed, pad)]),
            "position_ids": torch.tensor([pos + [0] * n for (_, _, pos), n in zip(packed, pad)]),
            "attention_mask": torch.tensor([[1] * (width - n) + [0] * n for n in pad]),
        }


def segment_ids(position_ids, attention_mask):
    """``[batch, seq]`` sample number (1, 2, ...) of each real token, 0 for padding."""
    real = attention_mask != 0 if attention_mask is not None else torch.ones_like(position_ids, dtype=torch.bool)
    starts = (position_ids == 0) & real
    return torch.cumsum(starts.to(torch.int32), dim=-1, dtype=torch.int32) * real  # 32-bit: MLU has no int64


def block_diagonal_mask(segments):
    """Bool ``[batch, 1, seq, seq]``, True where a query may NOT look (the remote code's convention):
    causal, inside the query's own sample. Padding (segment 0) sees earlier padding only, so no row of the
    softmax is empty."""
    seq = segments.shape[-1]
    index = torch.arange(seq, dtype=torch.int32, device=segments.device)
    causal = index.unsqueeze(-1) >= index.unsqueeze(0)  # not a boolean tril_, which MLU lacks
    same = segments.unsqueeze(-1) == segments.unsqueeze(-2)
    return ~(same & causal).unsqueeze(1)


def _is_packed(position_ids, attention_mask) -> bool:
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] < 2:
        return False
    real = attention_mask != 0 if attention_mask is not None and attention_mask.dim() == 2 else None
    starts = position_ids[:, 1:] == 0
    if real is not None:
        starts = starts & real[:, 1:]
    return bool(starts.any())


# Class attribute the accelerator set's attention patch puts on ChatGLMModel (glmport.patches.attention, which
# names it too; patches depend on glmport, not the other way): True where attention takes 2-D segment masks
# to the variable-length kernel.
SEGMENT_MASKS = "_glmport_segment_masks"


def _packed_mask_hook(module, args, kwargs):
    """Forward pre-hook of the remote code's ``ChatGLMModel``: a packed batch gets its segment numbers
    (variable-length kernel) or its block-diagonal mask (SDPA). Either travels through the layers' own
    arguments, so gradient checkpointing's recompute sees it too."""
    if kwargs.get("full_attention_mask") is not None or kwargs.get("past_key_values"):
        return None
    position_ids, attention_mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if not _is_packed(position_ids, attention_mask):
        return None
    segments = segment_ids(position_ids, attention_mask)
    kwargs["full_attention_mask"] = segments if getattr(module, SEGMENT_MASKS, False) else block_diagonal_mask(segments)
    return args, kwargs


def packing_target(model):
    """The module whose forward takes ``full_attention_mask`` (remote ChatGLM3 / GLM-4 code), or ``None``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "transformer", None)
    if inner is None or "full_attention_mask" not in inspect.signature(inner.forward).parameters:
        return None
    return inner


def packing_refusal(model, method: str, peft_config: dict | None) -> str | None:
    """Why this model/method cannot train packed, or ``None`` when it can."""
    if packing_target(model) is None:
        return (f"{type(model).__name__} has no remote-code ChatGLMModel taking full_attention_mask (native "
                "transformers GLM classes are not packed yet)")
    if method == "ptuning" or (peft_config or {}).get("peft_type", "").upper() == "PREFIX_TUNING":
        return "P-Tuning v2 prepends its prefix to every row's keys; a packed row would share one prefix"
    return None


def enable_packed_attention(model):
    """Install the packed-batch mask hook on ``model``; returns the hook handle (``.remove()`` undoes it).
    Raises :class:`ConfigError` when the model has no place for it (see :func:`packing_refusal`)."""
    target = packing_target(model)
    if target is None:
        raise ConfigError(f"glmport.packing: {packing_refusal(model, 'lora', None)}; set glmport.packing: false")
    if getattr(target, "_glmport_packing_hook", None) is None:
        target._glmport_packing_hook = target.register_forward_pre_hook(_packed_mask_hook, with_kwargs=True)
    return target._glmport_packing_hook


def training_collator(run, padded):
    """The collator of a training run: ``padded`` (glmport's Collator), or a :class:`PackingCollator`
    falling back to it for evaluation batches, with the mask hook installed on ``run.model``.

    ``glmport.packing`` true packs or stops with the reason; false never packs; unset (the default) packs
    wherever it is correct (remote-code ChatGLM3/GLM-4 with LoRA or full SFT) and says so in the run's notes."""
    setting = run.config.glmport.packing
    if setting is False:
        return padded
    refusal = packing_refusal(run.model, run.config.method, run.config.peft_config)
    if refusal is not None:
        if setting:
            raise ConfigError(f"{run.config.locate('glmport.packing')}: glmport.packing: true, but {refusal}; "
                              "set glmport.packing: false")
        run.notes.append(f"training on padded batches: {refusal}")
        return padded
    enable_packed_attention(run.model)
    run.notes.append("training on padding-free packed batches (glmport.packing; set it false for padded ones)")
    return PackingCollator(padded.pad_token_id, fallback=padded)
