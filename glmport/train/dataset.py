"""From data files to tokenized datasets and padded batches.

Records are read and validated by :mod:`glmport.data` (file/line errors), tokenized by the model's
template, and held in a ``datasets.Dataset`` of plain int lists. Training batches are right-padded with
explicit position ids; evaluation items carry both the full sequence (for eval loss) and the left-padded
prompt (for generation), since generation needs left padding and the loss does not care.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from glmport.data.loader import Skipped, invalid_records_error, write_skip_report
from glmport.errors import DataError, Problem

log = logging.getLogger("glmport")


@dataclass
class SplitStats:
    records: int = 0
    samples: int = 0
    trimmed_samples: int = 0
    trimmed_tokens: int = 0
    trimmed_messages: int = 0
    skipped: int = 0
    label_tokens: int = 0
    tokens: int = 0


@dataclass
class Datasets:
    train: Any
    eval: Any | None
    test: Any | None
    stats: dict[str, SplitStats] = field(default_factory=dict)
    skip_report: Path | None = None


def _each_sample(result, encode, skip_invalid: bool):
    """Yield ``encode(conv)`` for every conversation. A conversation the template cannot encode (no
    label left within the budget, ...) is an error listing all of them, or, with skip_invalid, a skipped
    record in the report."""
    problems = []
    for conv in result.conversations:
        try:
            encoded = encode(conv)
        except DataError as exc:
            found = exc.problems or [Problem(conv.source, str(exc))]
            problems += found
            result.skipped.append(Skipped(conv.source, "; ".join(p.what for p in found), ""))
            continue
        yield conv, encoded
    if problems and not skip_invalid:
        raise invalid_records_error(result.path, problems, len(result.conversations), False)


def _train_rows(result, template, max_in: int, max_out: int, stats: SplitStats, skip_invalid: bool) -> list[dict]:
    rows = []
    for _, sample in _each_sample(result, lambda c: template.train_sample(c, max_in, max_out), skip_invalid):
        rows.append({"input_ids": sample.input_ids, "labels": sample.labels})
        stats.samples += 1
        stats.tokens += len(sample.input_ids)
        stats.label_tokens += sum(1 for label in sample.labels if label != -100)
        if sample.trimmed_tokens or sample.trimmed_messages:
            stats.trimmed_samples += 1
            stats.trimmed_tokens += sample.trimmed_tokens
            stats.trimmed_messages += sample.trimmed_messages
    return rows


def _eval_rows(result, template, max_in: int, max_out: int, cap: int | None, stats: SplitStats,
               skip_invalid: bool) -> list[dict]:
    rows = []
    # Every record is encoded (a bad one is an error even past the cap); only the first `cap` are kept.
    for _, samples in _each_sample(result, lambda c: template.eval_samples(c, max_in, max_out), skip_invalid):
        for sample in samples:
            if cap is None or len(rows) < cap:
                rows.append({"prompt_ids": sample.prompt_ids, "output_ids": sample.output_ids, "source": sample.source})
    stats.samples = len(rows)
    return rows


def build_datasets(run_config, template, output_dir: Path | None, records: dict) -> Datasets:
    """Tokenize every split already read by :func:`glmport.data.loader.load_conversations`. Skipped records
    are reported in ``output_dir`` (``None``: not written, as on the ranks other than 0)."""
    settings = run_config.glmport
    stats: dict[str, SplitStats] = {}
    skipped_results = []
    splits: dict[str, Any] = {"train": None, "val": None, "test": None}
    for split in splits:
        result = records.get(split)
        if result is None:
            continue
        split_stats = stats[split] = SplitStats(records=len(result.conversations))
        max_in, max_out = run_config.max_input_length, run_config.max_output_length
        if split == "train":
            rows = _train_rows(result, template, max_in, max_out, split_stats, settings.skip_invalid)
        else:
            cap = settings.eval_samples if split == "val" else None
            rows = _eval_rows(result, template, max_in, max_out, cap, split_stats, settings.skip_invalid)
        split_stats.skipped = len(result.skipped)
        if result.skipped:
            skipped_results.append(result)
        splits[split] = Dataset.from_list(rows) if rows else None

    report = write_skip_report(skipped_results, output_dir) if skipped_results and output_dir is not None else None
    train_stats = stats["train"]
    if train_stats.trimmed_samples:
        log.warning(
            "%d of %d training samples were longer than max_input_length + max_output_length + 1 = %d tokens: "
            "%d whole earlier messages and %d tokens were trimmed (history and prompt first; no sample lost its labels)",
            train_stats.trimmed_samples, train_stats.samples,
            run_config.max_input_length + run_config.max_output_length + 1,
            train_stats.trimmed_messages, train_stats.trimmed_tokens,
        )
    return Datasets(splits["train"], splits["val"], splits["test"], stats, report)


def _pad(rows: list[list[int]], value: int, left: bool = False) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]


@dataclass
class Collator:
    """Pads a list of dataset rows into a batch of int64 tensors (the backend narrows them later).

    Training rows (``input_ids``, ``labels``) are right-padded. Evaluation rows (``prompt_ids``,
    ``output_ids``) become the full sequence for the eval loss plus ``gen_*`` fields: the prompt
    left-padded for generation, and the reference output right-padded for metrics.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        if "prompt_ids" in features[0]:
            return self._eval_batch(features)
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) for f in features]
        return self._causal_batch(ids, labels)

    def _causal_batch(self, ids, labels) -> dict:
        lengths = [len(r) for r in ids]
        ids = _pad(ids, self.pad_token_id)
        labels = _pad(labels, -100)
        width = len(ids[0])
        mask = [[1] * n + [0] * (width - n) for n in lengths]
        positions = [list(range(n)) + [0] * (width - n) for n in lengths]
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "position_ids": torch.tensor(positions),
            "labels": torch.tensor(labels),
        }

    def _eval_batch(self, features: list[dict]) -> dict:
        prompts = [list(f["prompt_ids"]) for f in features]
        outputs = [list(f["output_ids"]) for f in features]
        batch = self._causal_batch(
            [p + o for p, o in zip(prompts, outputs)],
            [[-100] * len(p) + o for p, o in zip(prompts, outputs)],
        )
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        batch["gen_input_ids"] = torch.tensor(_pad(prompts, self.pad_token_id, left=True))
        batch["gen_attention_mask"] = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
        batch["gen_output_ids"] = torch.tensor(_pad(outputs, -100))
        return batch
