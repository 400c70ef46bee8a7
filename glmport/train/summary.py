"""After training: publish the result atomically, predict the test split, plot, and summarize."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from glmport.train.callbacks import format_duration
from glmport.train.plot import write_loss_plot
from glmport.train.run import RESULT_DIR, SUMMARY_FILE, TrainingRun, remove_tree, write_json_atomic

log = logging.getLogger("glmport")

REMOTE_CODE = ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py", "quantization.py")


def _save_model(run: TrainingRun, staging: Path) -> str:
    from glmport.train.methods import uses_own_prefix_encoder

    info, trainer = run.loaded.info, run.trainer
    if uses_own_prefix_encoder(info, run.config.peft_config):
        from safetensors.torch import save_file

        # through accelerate, so weights sharded by DeepSpeed/FSDP are gathered first
        state = trainer.accelerator.get_state_dict(trainer.model)
        marker = "transformer.prefix_encoder."
        encoder = {k.split(marker, 1)[1]: v.detach().cpu().contiguous() for k, v in state.items() if marker in k}
        save_file(encoder, str(staging / "prefix_encoder.safetensors"))
        return "prefix-encoder"
    trainer.save_model(str(staging))
    if run.config.method == "sft" and info.kind == "remote":
        for name in REMOTE_CODE:  # the folder loads by path like the original (patches are applied at load)
            if (info.path / name).is_file():
                shutil.copyfile(info.path / name, staging / name)
    return "adapter" if run.config.method != "sft" else "full-model"


def publish_result(run: TrainingRun) -> Path:
    """Write the trained result to OUTPUT_DIR/final in one rename: it exists complete or not at all."""
    final = run.output_dir / RESULT_DIR
    staging = run.output_dir / f".{RESULT_DIR}.partial"
    remove_tree(staging)
    staging.mkdir(parents=True)
    content = _save_model(run, staging)
    try:
        run.loaded.tokenizer.save_pretrained(str(staging))
    except Exception as exc:  # a remote tokenizer that cannot save must not lose the trained weights
        log.warning("the tokenizer could not be saved with the result (%s); load it from the base model", exc)
    info = run.loaded.info
    write_json_atomic(staging / "glmport_result.json", {
        "content": content,
        "method": run.config.method,
        "peft_config": run.config.peft_config,
        "base_model": str(info.path),
        "model_kind": info.kind,
        "model_family": info.family,
        "template": run.template.name,
        "combine": run.config.combine,
        "backend": run.backend.name,
        "dtype": str(run.loaded.dtype).replace("torch.", ""),
        "patches": run.loaded.patches.summary() if run.loaded.patches else None,
        "global_step": run.trainer.state.global_step,
    })
    old = run.output_dir / f".{RESULT_DIR}.old"
    remove_tree(old)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    remove_tree(old)
    return final


def write_predictions(run: TrainingRun) -> Path:
    """Predict the test split and write every prediction next to its reference (upstream wrote none)."""
    import numpy as np

    trainer, tokenizer = run.trainer, run.loaded.tokenizer
    trainer.force_generate = True  # predictions are the point here, whatever predict_with_generate says
    try:
        output = trainer.predict(run.datasets.test, metric_key_prefix="test")
    finally:
        trainer.force_generate = False
    path = run.output_dir / "predictions.jsonl"
    tmp = path.with_name(path.name + ".partial")
    rows = run.datasets.test
    with open(tmp, "w", encoding="utf-8") as out:
        predictions = output.predictions if output.predictions is not None else []
        for index, predicted in enumerate(predictions):
            row = rows[index]
            predicted = np.where(np.asarray(predicted) < 0, run.template.pad_token_id, predicted)
            out.write(json.dumps({
                "source": row.get("source", ""),
                "prompt": tokenizer.decode(row["prompt_ids"], skip_special_tokens=True),
                "prediction": tokenizer.decode(predicted.tolist(), skip_special_tokens=True),
                "reference": tokenizer.decode(row["output_ids"], skip_special_tokens=True),
            }, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    run.notes.append("test: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in output.metrics.items()
                                          if isinstance(v, float) and not k.endswith(("runtime", "per_second"))))
    return path


def summarize(run: TrainingRun, started: float, result_dir: Path, predictions: Path | None) -> dict:
    trainer = run.trainer
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    train_metrics = next((e for e in reversed(history) if "train_runtime" in e), {})
    runtime = train_metrics.get("train_runtime") or (time.time() - started)
    plot = None
    if run.config.glmport.plot:
        title = f"glmport {run.config.method} - {run.loaded.info.path.name} on {run.backend.name}"
        plot = write_loss_plot(history, run.output_dir / "loss.png", title)
    memory = run.backend.memory_stats()
    stats = {split: vars(s) for split, s in run.datasets.stats.items()}
    guard = trainer.guard_report
    summary = {
        "method": run.config.method,
        "model": str(run.loaded.info.path),
        "model_kind": run.loaded.info.kind,
        "model_family": run.loaded.info.family,
        "backend": run.backend.name,
        "backend_how": run.selection.how,
        "emulated": run.backend.availability().emulated,
        "dtype": str(run.loaded.dtype).replace("torch.", ""),
        "patches": run.loaded.patches.summary() if run.loaded.patches else None,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval": {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {},
        "train_runtime_s": runtime,
        "tokens_per_second": trainer.tokens_seen / runtime if runtime else None,
        "tokens_seen": trainer.tokens_seen,
        "label_tokens_seen": trainer.label_tokens_seen,
        "peak_memory_bytes": memory.peak,
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
    write_json_atomic(run.output_dir / SUMMARY_FILE, summary)
    print(render_summary(summary), flush=True)
    return summary


def render_summary(s: dict) -> str:
    def fmt(value, spec=".4f"):
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    backend = s["backend"] + (" (emulated)" if s["emulated"] else "")
    lines = [
        "",
        "=" * 72,
        f"glmport train: {s['method']} on {s['model_kind']} {s['model_family']} model, backend {backend}, {s['dtype']}",
        f"  model      {s['model']}",
        f"  steps      {s['steps']}/{s['max_steps']}" + (f" (resumed from {s['resumed_from']})" if s["resumed_from"] else ""),
        f"  loss       {fmt(s['first_loss'])} -> {fmt(s['last_loss'])}",
    ]
    if s["eval"]:
        lines.append("  eval       " + ", ".join(f"{k} {fmt(v)}" for k, v in s["eval"].items()
                                               if not k.endswith(("runtime", "per_second"))))
    tps = s["tokens_per_second"]
    lines.append(f"  speed      {fmt(tps, ',.0f')} tokens/s over {format_duration(s['train_runtime_s'])}; "
                 f"peak memory {s['peak_memory_bytes'] / 2**20:,.0f} MiB")
    guard = s["guard_64bit"]
    if guard["mode"]:
        verdict = "clean" if not guard["leaks"] else f"{len(guard['leaks'])} leak(s) listed in run_summary.json"
        lines.append(f"  64-bit     guard {guard['mode']}: {guard['ops_checked']:,} ops checked, {verdict}")
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
