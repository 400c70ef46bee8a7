"""Scoring a model on a data file: ROUGE-1/2/L and BLEU-4 exactly as training reports them.

The samples are the ones training evaluates on (:meth:`glmport.data.templates.Template.eval_samples`: one per
reply to generate, the prompt up to its assistant token, the reference reply with its stop token), the
predictions are generated greedily in left-padded batches (:func:`glmport.infer.generate_in_batches`), and both
are decoded and scored by training's own functions (:mod:`glmport.train.metrics`), so a run's eval numbers and
``glmport eval`` on the same samples are the same numbers. Unlike training's evaluation (capped at
``glmport.eval_samples``), every record of the file is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glmport.errors import Problem
from glmport.infer import GenerationSettings, InferenceModel, generate_in_batches
from glmport.train.outputs import CONFIG_FILE, RESULT_DIR

log = logging.getLogger("glmport")

DEFAULT_MAX_INPUT_LENGTH = 1024
DEFAULT_MAX_OUTPUT_LENGTH = 512
REPORT_FILE = "report.json"
PREDICTIONS_FILE = "predictions.jsonl"


@dataclass
class EvalSettings:
    max_input_length: int
    max_output_length: int
    generation: GenerationSettings
    batch_size: int = 8
    source: str = "defaults"  # where the lengths came from: "defaults", the run's config file, "flags"

    def as_dict(self) -> dict:
        return {"max_input_length": self.max_input_length, "max_output_length": self.max_output_length,
                "batch_size": self.batch_size, "lengths_from": self.source, **self.generation.as_dict()}


def run_config_of(result: Path) -> Path | None:
    """The config a ``glmport train`` run wrote next to its result (OUTPUT_DIR/glmport_config.yaml)."""
    result = Path(result).resolve()
    if result.name == RESULT_DIR and (result.parent / CONFIG_FILE).is_file():
        return result.parent / CONFIG_FILE
    return None


def training_lengths(result: Path) -> tuple[dict[str, int], Path | None]:
    """``max_input_length``, ``max_output_length`` and the generation's ``max_new_tokens`` the run that made
    ``result`` evaluated with (what it has of them), and the config file they were read from."""
    config_file = run_config_of(result)
    if config_file is None:
        return {}, None
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        log.warning("%s: cannot read the run's settings (%s); using defaults", config_file, exc)
        return {}, None
    found = {key: config[key] for key in ("max_input_length", "max_output_length") if isinstance(config.get(key), int)}
    generation = ((config.get("training_args") or {}).get("generation_config") or {})
    if isinstance(generation, dict) and isinstance(generation.get("max_new_tokens"), int):
        found["max_new_tokens"] = generation["max_new_tokens"]
    return found, config_file


@dataclass
class Sample:
    source: str
    prompt_ids: list[int]
    output_ids: list[int]


def build_samples(bundle: InferenceModel, loaded, settings: EvalSettings) -> list[Sample]:
    """Every sample of every conversation of ``loaded`` (glmport.data.loader.LoadResult), as training builds
    them; conversations the template cannot make a sample of are reported together, with their lines."""
    from glmport.data.loader import invalid_records_error
    from glmport.errors import GlmportError

    samples, problems = [], []
    for conv in loaded.conversations:
        try:
            made = bundle.template.eval_samples(conv, settings.max_input_length, settings.max_output_length)
        except GlmportError as exc:
            problems += exc.problems or [Problem(conv.source, str(exc))]
            continue
        samples += [Sample(s.source or conv.source, list(s.prompt_ids), list(s.output_ids)) for s in made]
    if problems:
        raise invalid_records_error(loaded.path, problems, len(loaded.conversations), False)
    return samples


@dataclass
class Evaluation:
    """One model on one data file: the metrics, every prediction next to its reference, and what was run."""

    model: str
    data: str
    data_format: str
    records: int
    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    backend: str = ""
    dtype: str = ""
    seconds: float = 0.0
    guard: dict = field(default_factory=dict)  # what the 64-bit guard checked during generation

    def report(self, predictions: str | None = None) -> dict:
        return {"model": self.model, "data": self.data, "format": self.data_format, "records": self.records,
                "samples": len(self.rows), "metrics": self.metrics, "settings": self.settings,
                "backend": self.backend, "dtype": self.dtype, "seconds": round(self.seconds, 2),
                "guard_64bit": self.guard, "predictions": predictions}


def evaluate(bundle: InferenceModel, loaded, settings: EvalSettings, *, guard_mode: str | None = None,
             progress=None) -> Evaluation:
    """Generate a prediction for every sample of ``loaded`` and score them as training does. ``progress(total)``
    may return a progress bar (a context manager with ``update(n)``, as tqdm's)."""
    from glmport.train.metrics import decode_predictions, decode_references, score_pair, score_texts

    samples = build_samples(bundle, loaded, settings)
    started = time.monotonic()
    with progress(len(samples)) if progress is not None else contextlib.nullcontext() as bar:
        rows = generate_in_batches(bundle, [s.prompt_ids for s in samples], settings.generation,
                                   batch_size=settings.batch_size, guard_mode=guard_mode,
                                   progress=bar.update if bar is not None else None)
    seconds = time.monotonic() - started
    tokenizer, pad = bundle.tokenizer, bundle.template.pad_token_id
    # one row at a time: batch_decode of ragged rows would need padding, which changes nothing but costs
    predictions = [decode_predictions(tokenizer, [row], pad)[0] for row in rows]
    references = decode_references(tokenizer, [s.output_ids for s in samples])
    out = []
    for sample, prediction, reference in zip(samples, predictions, references):
        out.append({"source": sample.source,
                    "prompt": tokenizer.decode(sample.prompt_ids, skip_special_tokens=True),
                    "prediction": prediction, "reference": reference,
                    "scores": {k: round(v, 4) for k, v in score_pair(prediction, reference).items()}})
    metrics = score_texts(predictions, references)
    dtype = str(bundle.loaded.dtype).replace("torch.", "")
    return Evaluation(bundle.description, str(loaded.path), loaded.format, len(loaded.conversations), metrics,
                      out, settings.as_dict(), bundle.backend.name, dtype, seconds, bundle.guard_summary(guard_mode))


def write_evaluation(evaluation: Evaluation, folder: Path) -> Path:
    """``folder/predictions.jsonl``, then ``folder/report.json`` (last: a report means its predictions are
    complete); each written to a temporary name and renamed. Returns the report's path."""
    from glmport.data.loader import write_text_atomically

    folder = Path(folder)
    predictions = folder / PREDICTIONS_FILE
    write_text_atomically(predictions, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in evaluation.rows))
    report = folder / REPORT_FILE
    write_text_atomically(report, json.dumps(evaluation.report(str(predictions)), indent=2, ensure_ascii=False) + "\n")
    return report
