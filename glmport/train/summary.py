"""The end of a run: the loss plot, ``run_summary.json`` and the summary block printed for the user."""

from __future__ import annotations

import os
import time
from pathlib import Path

from glmport.train.callbacks import format_duration
from glmport.train.checkpointing import plan_of
from glmport.train.faults import write_faults
from glmport.train.outputs import LOSS_PLOT, RESULT_DIR, SUMMARY_FILE, write_json_atomic
from glmport.train.plot import write_loss_plot
from glmport.train.state import TrainingRun


def merge_ranks(run: TrainingRun) -> int:
    """Every rank's counters into this one's (tokens seen, label tokens, the 64-bit guard's checks and leaks),
    so that rank 0 summarizes the whole run; returns the highest peak memory of any rank's device."""
    trainer = run.trainer
    peak = run.backend.memory_stats().peak
    if not run.ranks.distributed:
        return peak
    guard = trainer.guard_report
    parts = run.ranks.gather((trainer.tokens_seen, trainer.label_tokens_seen, guard.ops_checked, guard.leaks, peak))
    trainer.tokens_seen = sum(part[0] for part in parts)
    trainer.label_tokens_seen = sum(part[1] for part in parts)
    guard.ops_checked = sum(part[2] for part in parts)
    known = set()
    guard.leaks = [leak for part in parts for leak in part[3]
                   if (leak.op, leak.site) not in known and not known.add((leak.op, leak.site))]
    return max(part[4] for part in parts)


def summarize(run: TrainingRun, started: float, result_dir: Path, predictions: Path | None) -> dict:
    """Plot the loss, write ``run_summary.json``, print the summary block; returns what the file holds.
    Called on every rank (they pool their counters); rank 0 writes and prints, and every rank returns it."""
    peak = merge_ranks(run)
    summary = None
    with run.ranks.agree():
        if run.ranks.is_main:
            summary = _summarize(run, started, result_dir, predictions, peak)
    return run.ranks.share(summary)


def _summarize(run: TrainingRun, started: float, result_dir: Path, predictions: Path | None, peak: int) -> dict:
    trainer = run.trainer
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    train_metrics = next((e for e in reversed(history) if "train_runtime" in e), {})
    runtime = (train_metrics.get("train_runtime") or (time.time() - started)) if run.trained_steps else None
    plot = None
    if run.config.glmport.plot:
        title = f"glmport {run.config.method} - {run.loaded.info.path.name} on {run.backend.name}"
        with _faults(run, LOSS_PLOT):
            plot = write_loss_plot(history, run.output_dir / LOSS_PLOT, title)
    stats = {split: vars(s) for split, s in run.datasets.stats.items()}
    guard = trainer.guard_report
    summary = {
        "method": run.config.method,
        "model": str(run.loaded.info.path),
        "model_kind": run.loaded.info.kind,
        "model_family": run.loaded.info.family,
        "backend": run.backend.name,
        "backend_how": run.selection.how,
        "emulated": run.backend.emulated,
        "processes": run.ranks.world_size,
        "dtype": str(run.loaded.dtype).replace("torch.", ""),
        "patches": run.loaded.patches.summary() if run.loaded.patches else None,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "trained_steps": run.trained_steps,  # by this process; 0 when a finished checkpoint was published
        "history": trainer.identity.history(trainer.state.global_step),  # which steps ran on what
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval": {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {},
        "train_runtime_s": runtime,
        "tokens_per_second": trainer.tokens_seen / runtime if runtime else None,  # of this run's steps, all ranks
        "tokens_seen": trainer.tokens_seen,
        "label_tokens_seen": trainer.label_tokens_seen,
        "peak_memory_bytes": peak,  # the highest of any rank's device
        "gradient_checkpointing": plan_of(run.model),  # the mode (auto: its numbers), compiled layers
        "guard_64bit": {"mode": run.guard_mode, "ops_checked": guard.ops_checked,
                        "leaks": [str(leak) for leak in guard.leaks]},
        "data": stats,
        "skipped_report": str(run.datasets.skip_report) if run.datasets.skip_report else None,
        "outputs": {"result": str(result_dir), "loss_plot": str(plot) if plot else None,
                    "tensorboard": os.environ.get("TENSORBOARD_LOGGING_DIR") if "tensorboard" in trainer.args.report_to
                    else None,
                    "predictions": str(predictions) if predictions else None},
        "notes": run.notes,
        "wall_time_s": time.time() - started,
    }
    with _faults(run, SUMMARY_FILE):
        write_json_atomic(run.output_dir / SUMMARY_FILE, summary)
    print(render_summary(summary), flush=True)
    return summary


def _faults(run: TrainingRun, name: str):
    """A full disk here fails the run clearly: the result is published, but without a summary the run is not
    complete (``run_summary.json`` is written last)."""
    return write_faults(name, run.output_dir / name, run.output_dir, resume_flag=run.request.resume_flag,
                        left=f"the result in {run.output_dir / RESULT_DIR} is complete; {SUMMARY_FILE} was not written")


def render_summary(s: dict) -> str:
    def fmt(value, spec=".4f"):
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    backend = s["backend"] + (" (emulated)" if s["emulated"] else "")
    if s.get("processes", 1) > 1:
        backend += f" x {s['processes']} processes"
    lines = [
        "",
        "=" * 72,
        f"glmport train: {s['method']} on {s['model_kind']} {s['model_family']} model, backend {backend}, {s['dtype']}",
        f"  model      {s['model']}",
        f"  steps      {s['steps']}/{s['max_steps']}" + _resumed(s),
        f"  loss       {fmt(s['first_loss'])} -> {fmt(s['last_loss'])}",
    ]
    if s["eval"]:
        lines.append("  eval       " + ", ".join(f"{k} {fmt(v)}" for k, v in s["eval"].items()
                                               if not k.endswith(("runtime", "per_second"))))
    if s["train_runtime_s"]:
        lines.append(f"  speed      {fmt(s['tokens_per_second'], ',.0f')} tokens/s over "
                     f"{format_duration(s['train_runtime_s'])}; peak memory {s['peak_memory_bytes'] / 2**20:,.0f} MiB")
    if len({(h["backend"], h["dtype"]) for h in s["history"]}) > 1 or (s["resumed_from"] and s["history"]):
        lines.append("  trained    " + "; ".join(
            f"steps {h['from_step']}-{h['to_step']} on {h['backend']}{' (emulated)' if h['emulated'] else ''} "
            f"{h['dtype']}" + (f" x {h['processes']} processes" if h.get("processes", 1) > 1 else "")
            for h in s["history"]))
    guard = s["guard_64bit"]
    if guard["mode"]:
        how = "stops at the first leak" if guard["mode"] == "error" else "lists every leak"
        verdict = "no 64-bit tensor reached a compute op" if not guard["leaks"] else \
            f"{len(guard['leaks'])} leak(s), listed in {SUMMARY_FILE}"
        lines.append(f"  64-bit     guard on ({how}): {guard['ops_checked']:,} ops checked, {verdict}")
    if s["patches"]:
        lines.append(f"  patches    {s['patches']}")
    train = s["data"].get("train", {})
    lines.append(f"  data       {train.get('samples', 0)} training samples, {train.get('trimmed_samples', 0)} trimmed, "
                 f"{sum(d.get('skipped', 0) for d in s['data'].values())} skipped")
    for key, label in (("result", "result"), ("loss_plot", "loss plot"), ("predictions", "predictions"),
                       ("tensorboard", "tensorboard")):
        if s["outputs"].get(key):
            lines.append(f"  {label:<10} {s['outputs'][key]}")
    if s["skipped_report"]:
        lines.append(f"  skipped    {s['skipped_report']}")
    for note in s["notes"]:
        lines.append(f"  note       {note}")
    lines.append("=" * 72)
    return "\n".join(lines)


def _resumed(s: dict) -> str:
    if not s["resumed_from"]:
        return ""
    trained = f"{s['trained_steps']} trained now" if s["trained_steps"] else "nothing left to train"
    return f" (resumed from {s['resumed_from']}; {trained})"
