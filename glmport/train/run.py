"""One ``glmport train`` run, from a config file to a saved result.

The order matters and is the point of this module: everything that can be wrong with the user's input
(config keys, data paths, backend, resume argument, DeepSpeed) is checked before the model is loaded; the
model is loaded through the patch session for the backend; the Trainer does the training; the result is
published atomically, so a crash never leaves output that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmport.backend import Selection, select_backend
from glmport.config import RunConfig, load_run_config
from glmport.errors import ConfigError, GlmportError, Problem

log = logging.getLogger("glmport")

RESULT_DIR = "final"
SUMMARY_FILE = "run_summary.json"


@dataclass
class TrainRequest:
    config: Path
    overrides: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    model_dir: Path | None = None
    resume: str | None = None
    resume_flag: str = "RESUME"
    backend: str | None = None


@dataclass
class TrainingRun:
    """Everything about one run; plugins receive it in the training hooks."""

    request: TrainRequest
    config: RunConfig
    selection: Selection
    output_dir: Path
    resume_from: Path | None = None
    loaded: Any = None  # glmport.modeling.LoadedModel
    template: Any = None
    datasets: Any = None
    model: Any = None
    trainer: Any = None
    guard_mode: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def backend(self):
        return self.selection.backend

    @property
    def method(self) -> str:
        return self.config.method


def _choose_backend(config: RunConfig, flag: str | None, manager) -> Selection:
    if config.glmport.emulate:
        os.environ["GLMPORT_EMULATE"] = config.glmport.emulate
    requested, source = flag, "--backend"
    if requested in (None, "", "auto") and config.glmport.backend not in ("", "auto"):
        requested, source = config.glmport.backend, config.locate("glmport.backend")
    if config.training_args.get("use_cpu"):
        if requested not in (None, "", "auto", "cpu"):
            raise ConfigError("the backend is chosen twice", [Problem(
                config.locate("training_args.use_cpu"),
                f"training_args.use_cpu: true asks for the CPU, but {source} asks for {requested}",
                "remove use_cpu (glmport's backend decides the device) or choose --backend cpu")])
        requested, source = "cpu", config.locate("training_args.use_cpu")
    return select_backend(manager.backends, requested, flag=source)


def _guard_mode(setting: str, backend) -> str | None:
    if setting == "off":
        return None
    if setting == "report":
        return "report"
    if setting == "on":
        return "error"
    return "error" if backend.availability().emulated else None  # auto


def _check_deepspeed(config: RunConfig, backend) -> None:
    if not config.training_args.get("deepspeed"):
        return
    info = backend.deepspeed()
    if not info.usable:
        raise ConfigError("DeepSpeed is configured but cannot run here", [Problem(
            config.locate("training_args.deepspeed"), f"training_args.deepspeed: {info.note}",
            "install it, or remove training_args.deepspeed to train without it")])
    os.environ.setdefault("DS_ACCELERATOR", info.accelerator)


def prepare_inputs(config: RunConfig) -> None:
    """Build what glmport was asked to build: a tiny model, a synthetic data set."""
    settings = config.glmport
    if settings.init_model and config.model_dir is not None and not (config.model_dir / "config.json").is_file():
        from glmport.tiny import build_tiny_model

        log.info("building %s model in %s", settings.init_model, config.model_dir)
        build_tiny_model(settings.init_model, config.model_dir, seed_text=synthetic_alphabet())
    if settings.synthetic_data:
        from glmport.tiny.synthetic import write_synthetic_splits

        write_synthetic_splits(config, settings.synthetic_data)


def synthetic_alphabet() -> str:
    from glmport.tiny.synthetic import ALPHABET

    return ALPHABET


def _training_arguments(run: TrainingRun):
    from transformers import GenerationConfig, Seq2SeqTrainingArguments

    config, backend = run.config, run.backend
    args = dict(config.training_args)
    args["output_dir"] = str(run.output_dir)
    args.setdefault("report_to", "tensorboard" if _has_tensorboard() else "none")
    if args.get("report_to") in ("tensorboard", ["tensorboard"]) and not _has_tensorboard():
        log.warning("report_to tensorboard: tensorboard is not installed (pip install 'glmport[plot]'); not logging to it")
        args["report_to"] = "none"
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run.output_dir / "runs"))
    args.setdefault("disable_tqdm", True)  # glmport prints one progress line per logging step
    args["remove_unused_columns"] = False  # our collator needs every column
    if run.config.glmport.seed is not None:
        args["seed"] = run.config.glmport.seed
    workers = args.get("dataloader_num_workers", 0)
    if workers and workers > (os.cpu_count() or 1):
        log.warning("training_args.dataloader_num_workers %d > %d CPUs: using %d", workers, os.cpu_count(), os.cpu_count())
        args["dataloader_num_workers"] = os.cpu_count()
    if run.datasets.eval is None:
        # Upstream's __post_init__ did this by assigning the removed evaluation_strategy field: no-op on
        # current transformers, so runs without a validation set crashed at the first evaluation.
        args["eval_strategy"] = "no"
        args["do_eval"] = False
        args.pop("eval_steps", None)
    if run.config.method == "sft" and "bf16" not in args and "fp16" not in args:
        import torch

        if backend.preferred_dtype() == torch.bfloat16:
            args["bf16"] = True
    gen = args.pop("generation_config", None) or {}
    if not isinstance(gen, dict):
        raise ConfigError(f"{config.locate('training_args.generation_config')}: generation_config must be a mapping")
    template = run.template
    generation = GenerationConfig(**{"max_new_tokens": 512, **gen})
    generation.pad_token_id = template.pad_token_id
    generation.eos_token_id = list(template.stop_token_ids)
    args["generation_config"] = generation
    # glmport turns checkpointing on itself and checks that it took (the 2024 remote code ignores the call)
    args.pop("gradient_checkpointing", None)
    args.pop("activation_checkpointing", None)
    args.update(backend.training_arguments())
    try:
        return Seq2SeqTrainingArguments(**args)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{config.path}: transformers rejects the training_args: {exc}") from None


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def build_run(request: TrainRequest, manager) -> TrainingRun:
    """Everything up to (and including) loading the model and data. Checks come first."""
    from glmport.train.resume import plan_resume

    config = load_run_config(request.config, request.overrides, data_dir=request.data_dir, model_dir=request.model_dir)
    selection = _choose_backend(config, request.backend, manager)
    backend = selection.backend
    _check_deepspeed(config, backend)
    output_dir = Path(config.training_args.get("output_dir") or "./output")
    plan = plan_resume(output_dir, request.resume, where=request.resume_flag)
    run = TrainingRun(request, config, selection, output_dir, plan.checkpoint, notes=list(plan.notes))
    run.guard_mode = _guard_mode(config.glmport.guard_64bit, backend)
    for key, value in backend.environment().items():
        os.environ.setdefault(key, value)
    prepare_inputs(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    _load(run)
    return run


def _load(run: TrainingRun) -> None:
    from glmport.data.templates import get_template
    from glmport.modeling import inspect_model_dir, load_model, resolve_dtype
    from glmport.train.dataset import build_datasets
    from glmport.train.methods import apply_method, enable_gradient_checkpointing, prefix_config_overrides

    config, backend = run.config, run.backend
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend.set_device(local_rank)
    backend.seed(int(config.glmport.seed if config.glmport.seed is not None else config.training_args.get("seed", 42)))
    info = inspect_model_dir(config.model_dir.resolve(), config.glmport.model_family)
    dtype, note = resolve_dtype(config.glmport.dtype, backend, info.family, config.method)
    if note:
        log.warning(note)
        run.notes.append(note)
    run.loaded = load_model(
        info, backend, mode="train", dtype=dtype, allow_unverified=config.glmport.allow_unverified_patches,
        config_overrides=prefix_config_overrides(info, config.peft_config),
    )
    run.template = get_template(config.glmport.template, run.loaded.tokenizer, combine=config.combine)
    run.datasets = build_datasets(config, run.template, run.output_dir)
    if run.datasets.train is None:
        raise GlmportError(f"{config.data_path('train')}: no training samples")
    run.model = apply_method(run.loaded.model, info, config.method, config.peft_config, backend)
    if config.training_args.get("gradient_checkpointing") or config.training_args.get("activation_checkpointing"):
        enable_gradient_checkpointing(run.model, info)


def build_trainer(run: TrainingRun, manager):
    from glmport.train.callbacks import NonFiniteLossCallback, OptimizerGuardCallback, ProgressCallback
    from glmport.train.dataset import Collator
    from glmport.train.trainer import GlmTrainer

    args = _training_arguments(run)
    compute_metrics = None
    if args.predict_with_generate and run.datasets.eval is not None:
        from glmport.train.metrics import make_compute_metrics

        compute_metrics = make_compute_metrics(run.loaded.tokenizer, run.template.pad_token_id)
    trainer = GlmTrainer(
        model=run.model,
        args=args,
        train_dataset=run.datasets.train,
        eval_dataset=run.datasets.eval,
        data_collator=Collator(run.template.pad_token_id),
        processing_class=run.loaded.tokenizer,
        compute_metrics=compute_metrics,
        backend=run.backend,
        guard_mode=run.guard_mode,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback prints lines
    trainer.add_callback(ProgressCallback(trainer))
    trainer.add_callback(OptimizerGuardCallback(trainer))
    trainer.add_callback(NonFiniteLossCallback())
    for plugin_callbacks in manager.hook.glmport_trainer_callbacks(run=run):
        for callback in plugin_callbacks or []:
            trainer.add_callback(callback)
    run.trainer = trainer
    return trainer


def run_training(request: TrainRequest, manager) -> dict:
    """Train, save, evaluate the test split, plot, summarize. Returns the summary."""
    from glmport.train.callbacks import NonFiniteLossCallback, OptimizerGuardCallback
    from glmport.train.summary import publish_result, summarize, write_predictions

    started = time.time()
    run = build_run(request, manager)
    trainer = build_trainer(run, manager)
    manager.hook.glmport_before_train(run=run)
    run.backend.reset_peak_memory()
    try:
        trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    finally:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, OptimizerGuardCallback):
                callback.close()
    bad = next((c.bad_step for c in trainer.callback_handler.callbacks if isinstance(c, NonFiniteLossCallback)), None)
    if bad is not None:
        raise GlmportError(
            f"the training loss became NaN/inf at step {bad}; stopped without publishing a result. Lower the "
            "learning rate, or use bf16/fp32 (fp16 overflows GLM-4). Complete checkpoints before it remain."
        )
    result_dir = publish_result(run)
    predictions = write_predictions(run) if run.datasets.test is not None else None
    summary = summarize(run, started, result_dir, predictions)
    manager.hook.glmport_after_train(run=run, summary=summary)
    return summary


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
