"""What ``glmport data check`` reports about a data file: counts, lengths and what truncation does."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from glmport.data.loader import LoadResult, Skipped, invalid_records_error
from glmport.data.records import ROLES, Conversation
from glmport.data.spans import IGNORE_INDEX
from glmport.data.templates import Template, TrainSample
from glmport.errors import DataError, Problem


@dataclass
class Samples:
    """Every conversation of a file through a template, with the ones that could not be built."""

    conversations: list[Conversation] = field(default_factory=list)  # those that built, in file order
    train: list[TrainSample] = field(default_factory=list)
    full_lengths: list[int] = field(default_factory=list)
    upstream_unlabelled: int = 0  # samples upstream's plain tail truncation leaves with no label at all
    eval_count: int = 0
    skipped: list[Skipped] = field(default_factory=list)


def build_samples(result: LoadResult, template: Template, max_input_length: int, max_output_length: int,
                  *, skip_invalid: bool = False) -> Samples:
    budget = max_input_length + max_output_length + 1
    samples, problems = Samples(), []
    for conv in result.conversations:
        try:
            full = template.untruncated_sample(conv)
            sample = template.train_sample(conv, max_input_length, max_output_length)
            samples.eval_count += len(template.eval_samples(conv, max_input_length, max_output_length))
        except DataError as exc:
            problems += exc.problems or [Problem(conv.source, str(exc))]
            samples.skipped.append(Skipped(conv.source, "; ".join(p.what for p in exc.problems) or str(exc), ""))
            continue
        samples.conversations.append(conv)
        samples.train.append(sample)
        samples.full_lengths.append(len(full.input_ids))
        samples.upstream_unlabelled += all(label == IGNORE_INDEX for label in full.labels[:budget])
    if problems and (not skip_invalid or not samples.train):
        raise invalid_records_error(result.path, problems, len(result.conversations), skip_invalid)
    return samples


def percentiles(values: list[int]) -> dict[str, int]:
    """p50/p90/p99/max by the nearest-rank method: every value reported is one that occurs."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    rank = {q: ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1] for q in (50, 90, 99)}
    return {"p50": rank[50], "p90": rank[90], "p99": rank[99], "max": ordered[-1]}


def conversation_counts(conversations: list[Conversation]) -> dict:
    roles = Counter(message.role for conv in conversations for message in conv.messages)
    return {
        "messages": {role: roles.get(role, 0) for role in ROLES},
        "multi_turn": sum(1 for conv in conversations if conv.count("user") > 1),
        "with_tools": sum(1 for conv in conversations if _uses_tools(conv)),
    }


def _uses_tools(conv: Conversation) -> bool:
    """Tools declared, or a tool called (a ChatGLM3 tool call carries the tool's name as metadata)."""
    return any(m.tools is not None or m.metadata or m.role == "observation" for m in conv.messages)


def check_report(result: LoadResult, samples: Samples, template: Template, tokenizer_note: str,
                 max_input_length: int, max_output_length: int) -> dict:
    """Everything ``data check`` prints, as plain data (``--json`` prints exactly this)."""
    trimmed = [s for s in samples.train if s.trimmed_tokens]
    return {
        "file": str(result.path),
        "format": result.format,
        "template": template.name,
        "tokenizer": tokenizer_note,
        "records": len(result.conversations) + len(result.skipped),
        "valid": len(samples.train),
        **conversation_counts(samples.conversations),
        "max_input_length": max_input_length,
        "max_output_length": max_output_length,
        "budget": max_input_length + max_output_length + 1,
        "train_tokens": percentiles(samples.full_lengths),
        "trimmed": {
            "samples": len(trimmed),
            "tokens": sum(s.trimmed_tokens for s in trimmed),
            "messages": sum(s.trimmed_messages for s in trimmed),
        },
        "upstream_truncation_loses_all_labels": samples.upstream_unlabelled,
        "eval_samples": samples.eval_count,
        "skipped": [{"source": s.source, "reason": s.reason} for s in [*result.skipped, *samples.skipped]],
    }
