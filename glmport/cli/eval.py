"""``glmport eval``: ROUGE-1/2/L and BLEU-4 of a model or training result on a data file, as training reports them.

::

    glmport eval MODEL_OR_RESULT DATA_FILE [-o DIR]              # DIR/report.json and DIR/predictions.jsonl
    glmport eval BASE_MODEL RESULT [...] --data DATA_FILE         # side by side: did the fine-tune help?

Every record of DATA_FILE is used (any data format ``glmport train`` reads); each reply in it is a sample, its
prompt the conversation before it, as in training's evaluation. Lengths and ``max_new_tokens`` default to the
training run's own (read from OUTPUT_DIR/glmport_config.yaml next to a result), so the numbers are comparable
with the run's; decoding is greedy.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from glmport.cli._output import table
from glmport.cli.infer import (
    add_generation_flags,
    add_model_flags,
    configure_logging,
    generation_settings,
    on_backend,
    open_model,
    progress_bar,
    report_leaks,
)
from glmport.errors import ConfigError, GlmportError, Problem

log = logging.getLogger("glmport")
DEFAULT_OUTPUT = Path("glmport_eval")
COMPARE_FILE = "compare.json"


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser("eval", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="ROUGE/BLEU of a model or result on a data file; several side by side",
                              description=__doc__.split("\n", 2)[2])
    p.add_argument("paths", nargs="+", type=Path, metavar="MODEL_OR_RESULT [DATA_FILE]",
                   help="a model (folder, OUTPUT_DIR/final, adapter) and the data file; or, with --data, the "
                        "models to compare")
    p.add_argument("--data", type=Path, metavar="FILE", help="the data file, when comparing several models")
    p.add_argument("--format", default="auto", help="the data format (default: detected from the records)")
    p.add_argument("-o", "--output-dir", type=Path, default=None, metavar="DIR",
                   help=f"where report.json and predictions.jsonl go (default ./{DEFAULT_OUTPUT}; one subfolder "
                        "per model when comparing)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per generate call (default 8)")
    p.add_argument("--max-input-length", type=int, default=None, metavar="N",
                   help="prompt tokens kept (default: the training run's, else 1024)")
    p.add_argument("--max-output-length", type=int, default=None, metavar="N",
                   help="reference tokens kept (default: the training run's, else 512)")
    add_model_flags(p)
    add_generation_flags(p, max_new_tokens=None)
    p.add_argument("--json", action="store_true", help="print the report (or the comparison) as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines or progress bar on stderr")
    p.set_defaults(handler=cmd_eval)


def _models_and_data(args) -> tuple[list[Path], Path]:
    if args.data is not None:
        return list(args.paths), args.data
    if len(args.paths) == 2 and not args.paths[1].is_dir():
        return [args.paths[0]], args.paths[1]
    shown = " ".join(map(str, args.paths))
    raise ConfigError("glmport eval takes MODEL DATA_FILE, or MODEL MODEL... --data DATA_FILE", [Problem(
        shown, f"{len(args.paths)} path(s) and no --data" + (f"; {args.paths[1]} is a folder" if len(args.paths) == 2
                                                            else ""),
        "to compare models, name the data file with --data FILE")])


def labels_for(paths: list[Path]) -> list[str]:
    """Short distinct names: each folder's name, with parent folders added where it takes that to tell them apart
    (``lora/out/final`` and ``sft/out/final``) or to say more than a bare ``final``."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        unclear = [i for i, name in enumerate(names)
                   if (names.count(name) > 1 or name == "final") and depth[i] < len(parts[i])]
        if not unclear:
            return names
        for i in unclear:
            depth[i] += 1


def cmd_eval(args, manager) -> int:
    from glmport.data.loader import load_conversations
    from glmport.evaluate import (
        DEFAULT_MAX_INPUT_LENGTH,
        DEFAULT_MAX_OUTPUT_LENGTH,
        EvalSettings,
        training_lengths,
    )
    from glmport.train.metrics import require_metrics

    configure_logging(args)
    models, data = _models_and_data(args)
    if args.base is not None and len(models) > 1:
        raise ConfigError("--base goes with one model", [Problem("--base", f"{len(models)} models are compared",
                                                                 "evaluate the adapter on its own with --base")])
    if len({model.resolve() for model in models}) < len(models):
        raise ConfigError("a model is named twice", [Problem(" ".join(map(str, models)), "the same folder twice",
                                                             "name each model once")])
    require_metrics()
    loaded = load_conversations(data, fmt=args.format, key="--data" if args.data else "DATA_FILE")  # before models
    found, config_file = next(((f, c) for f, c in map(training_lengths, models) if c is not None), ({}, None))
    max_in = args.max_input_length or found.get("max_input_length", DEFAULT_MAX_INPUT_LENGTH)
    max_out = args.max_output_length or found.get("max_output_length", DEFAULT_MAX_OUTPUT_LENGTH)
    problems = [Problem(flag, f"{value}", "give 1 or more") for flag, value in
                (("--max-input-length", max_in), ("--max-output-length", max_out)) if value < 1]
    if problems:
        raise ConfigError("bad length flag(s)", problems)
    generation = generation_settings(args, args.max_new_tokens or found.get("max_new_tokens", max_out))
    source = f"the training run ({config_file})" if config_file else "defaults"
    if args.max_input_length or args.max_output_length:
        source = "flags" if not config_file else f"flags and {source}"
    settings = EvalSettings(max_in, max_out, generation, args.batch_size, source)
    log.info("evaluating on %s (%s, %d records): max_input_length %d, max_output_length %d, max_new_tokens %d "
             "(from %s)", data, loaded.format, len(loaded.conversations), max_in, max_out,
             generation.max_new_tokens, source)
    output = args.output_dir or DEFAULT_OUTPUT
    labels = labels_for(models)
    evaluations = on_backend(args, manager, lambda backend: [
        _evaluate_one(args, manager, backend, model, label, loaded, settings,
                      output if len(models) == 1 else output / label.replace("/", "_"))
        for model, label in zip(models, labels)])
    if len(models) == 1:
        evaluation, report = evaluations[0]
        if args.json:
            print(json.dumps(evaluation.report(str(report.parent / "predictions.jsonl")), indent=2,
                             ensure_ascii=False))
        else:
            _print_table(data, loaded, labels, evaluations)
        return 0
    comparison = _comparison(data, labels, evaluations)
    from glmport.cli.infer import write_output

    write_output(output / COMPARE_FILE, json.dumps(comparison, indent=2, ensure_ascii=False) + "\n", "the comparison")
    if args.json:
        print(json.dumps(comparison, indent=2, ensure_ascii=False))
    else:
        _print_table(data, loaded, labels, evaluations)
        print(f"  comparison  {output / COMPARE_FILE}")
    return 0


def _evaluate_one(args, manager, backend, model: Path, label: str, loaded, settings, folder: Path):
    from glmport.evaluate import evaluate, write_evaluation
    from glmport.train.guarded import guard_mode_for

    bundle = open_model(args, manager, backend, model)
    try:
        evaluation = evaluate(bundle, loaded, settings, guard_mode=guard_mode_for(args.guard_64bit, backend),
                              progress=lambda total: progress_bar(args, total, "sample", label))
    finally:
        report_leaks(bundle)
        bundle.close()
    try:
        report = write_evaluation(evaluation, folder)
    except OSError as exc:
        raise GlmportError(f"cannot write the evaluation of {label} to {folder}: {exc.strerror or exc}", [Problem(
            str(folder), "choose an output folder you can write to (-o DIR), with free space")]) from None
    log.info("%s: %d samples in %.1fs; report %s", label, len(evaluation.rows), evaluation.seconds, report)
    return evaluation, report


def _comparison(data: Path, labels: list[str], evaluations) -> dict:
    metrics = {}
    for name in evaluations[0][0].metrics:
        metrics[name] = {label: evaluation.metrics[name] for label, (evaluation, _) in zip(labels, evaluations)}
    return {"data": str(data), "metrics": metrics,
            "models": [dict(evaluation.report(str(report.parent / "predictions.jsonl")), label=label,
                            report=str(report)) for label, (evaluation, report) in zip(labels, evaluations)]}


def _print_table(data: Path, loaded, labels: list[str], evaluations) -> None:
    first = evaluations[0][0]
    print(f"glmport eval: {data} ({loaded.format}, {first.records} records, {len(first.rows)} samples)")
    headers = ["metric", *labels]
    two = len(evaluations) == 2
    if two:
        headers.append(f"{labels[1]} - {labels[0]}")
    rows = []
    for name in first.metrics:
        values = [evaluation.metrics[name] for evaluation, _ in evaluations]
        row = [name, *(f"{v:.4f}" for v in values)]
        if two:
            row.append(f"{values[1] - values[0]:+.4f}")
        rows.append(row)
    print(table(headers, rows))
    for label, (evaluation, report) in zip(labels, evaluations):
        print(f"  {label}: {evaluation.model}; {evaluation.seconds:.1f}s on {evaluation.backend}; report {report}")
    sys.stdout.flush()
