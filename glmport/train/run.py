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


def _check_deepspeed(config: RunConfig, backend, env) -> None:
    if not config.training_args.get("deepspeed"):
        return
    info = backend.deepspeed()
    if not info.usable:
        raise ConfigError("DeepSpeed is configured but cannot run here", [Problem(
            config.locate("training_args.deepspeed"), f"training_args.deepspeed: {info.note}",
            "install it, or remove training_args.deepspeed to train without it")])
    env.set("DS_ACCELERATOR", info.accelerator, keep_existing=True)


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


def _training_arguments(run: TrainingRun, *, has_eval: bool, generation=None):
    """The user's training_args plus glmport's defaults and the backend's overrides."""
    from transformers import Seq2SeqTrainingArguments

    config, backend = run.config, run.backend
    args = dict(config.training_args)
    args["output_dir"] = str(run.output_dir)
    args.setdefault("report_to", "tensorboard" if _has_tensorboard() else "none")
    if args.get("report_to") in ("tensorboard", ["tensorboard"]) and not _has_tensorboard():
        log.warning("report_to tensorboard: tensorboard is not installed (pip install 'glmport[plot]'); not logging to it")
        args["report_to"] = "none"
    args.setdefault("disable_tqdm", True)  # glmport prints one progress line per logging step
    args["remove_unused_columns"] = False  # our collator needs every column
    if config.glmport.seed is not None:
        args["seed"] = config.glmport.seed
    workers = args.get("dataloader_num_workers", 0)
    if workers and workers > (os.cpu_count() or 1):
        log.warning("training_args.dataloader_num_workers %d > %d CPUs: using %d", workers, os.cpu_count(), os.cpu_count())
        args["dataloader_num_workers"] = os.cpu_count()
    if not has_eval:
        # Upstream's __post_init__ did this by assigning the removed evaluation_strategy field: no-op on
        # current transformers, so runs without a validation set crashed at the first evaluation.
        args["eval_strategy"] = "no"
        args["do_eval"] = False
        args.pop("eval_steps", None)
    if config.method == "sft" and "bf16" not in args and "fp16" not in args:
        import torch

        if backend.preferred_dtype() == torch.bfloat16:
            args["bf16"] = True
    args.pop("generation_config", None)
    if generation is not None:
        args["generation_config"] = generation
    # glmport turns checkpointing on itself and checks that it took (the 2024 remote code ignores the call)
    args.pop("gradient_checkpointing", None)
    args.pop("activation_checkpointing", None)
    args.update(backend.training_arguments())
    try:
        built = Seq2SeqTrainingArguments(**args)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{config.path}: transformers rejects the training_args: {exc}") from None
    if built.n_gpu > 1:
        # One process driving several devices means torch DataParallel, which glmport does not use.
        env = backend.visible_devices_env or "the backend's visible-devices variable"
        raise ConfigError(f"{built.n_gpu} {backend.name} devices are visible to this single process: set {env} to one "
                          "device (glmport trains one device per process)")
    return built


def _generation_config(run: TrainingRun):
    from transformers import GenerationConfig

    gen = run.config.training_args.get("generation_config") or {}
    if not isinstance(gen, dict):
        raise ConfigError(f"{run.config.locate('training_args.generation_config')}: generation_config must be a mapping")
    generation = GenerationConfig(**{"max_new_tokens": 512, **gen})
    generation.pad_token_id = run.template.pad_token_id
    generation.eos_token_id = list(run.template.stop_token_ids)
    return generation


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def _refuse_multiprocess() -> None:
    from glmport.backend import launched_distributed

    if launched_distributed():
        raise ConfigError(
            f"glmport train was started as one of {os.environ.get('WORLD_SIZE')} processes (WORLD_SIZE): this release "
            "trains with one process on one device; multi-process launch is not supported yet"
        )


class EnvironmentChanges:
    """Environment variables set for one run, restored afterwards (an in-process caller keeps its own)."""

    def __init__(self) -> None:
        self.previous: dict[str, str | None] = {}

    def set(self, key: str, value: str, *, keep_existing: bool = False) -> None:
        if keep_existing and key in os.environ:
            return
        self.previous.setdefault(key, os.environ.get(key))
        os.environ[key] = value

    def restore(self) -> None:
        for key, value in self.previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.previous.clear()


def build_run(request: TrainRequest, manager, env: EnvironmentChanges) -> TrainingRun:
    """Everything up to (and including) loading the model and data. Every input check comes first."""
    from glmport.train.resume import plan_resume

    _refuse_multiprocess()
    config = load_run_config(request.config, request.overrides, data_dir=request.data_dir, model_dir=request.model_dir)
    if config.glmport.emulate:
        env.set("GLMPORT_EMULATE", config.glmport.emulate)
    selection = _choose_backend(config, request.backend, manager)
    backend = selection.backend
    _check_deepspeed(config, backend, env)
    output_dir = Path(config.training_args.get("output_dir") or "./output")
    run = TrainingRun(request, config, selection, output_dir)
    run.guard_mode = _guard_mode(config.glmport.guard_64bit, backend)
    has_eval = config.data_config.val_file is not None and config.glmport.eval_samples > 0
    _training_arguments(run, has_eval=has_eval)  # transformers' own checks, before anything is loaded
    prepare_inputs(config)
    records = _read_records(config)
    plan = plan_resume(output_dir, request.resume, where=request.resume_flag)
    run.resume_from, run.notes = plan.checkpoint, list(plan.notes)
    for key, value in backend.environment().items():
        env.set(key, value, keep_existing=True)
    env.set("TENSORBOARD_LOGGING_DIR", str(output_dir / "runs"), keep_existing="TENSORBOARD_LOGGING_DIR" in os.environ)
    output_dir.mkdir(parents=True, exist_ok=True)
    _load(run, records, has_eval)
    return run


def _read_records(config: RunConfig) -> dict:
    """Every split read and validated (file/line errors) before the model is loaded."""
    from glmport.data.loader import load_conversations

    records = {}
    for split in ("train", "val", "test"):
        path = config.data_path(split)
        if path is not None and (split != "val" or config.glmport.eval_samples > 0):
            records[split] = load_conversations(path, fmt=config.glmport.data_format,
                                                skip_invalid=config.glmport.skip_invalid, key=f"data_config.{split}_file")
    return records


def _load(run: TrainingRun, records: dict, has_eval: bool) -> None:
    from glmport.data.templates import get_template
    from glmport.modeling import inspect_model_dir, load_model, resolve_dtype
    from glmport.train.dataset import build_datasets
    from glmport.train.methods import apply_method, enable_gradient_checkpointing, prefix_config_overrides

    config, backend = run.config, run.backend
    backend.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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
    run.datasets = build_datasets(config, run.template, run.output_dir, records)
    if run.datasets.train is None:
        raise GlmportError(f"{config.data_path('train')}: no training samples")
    if not has_eval:
        run.datasets.eval = None
    run.model = apply_method(run.loaded.model, info, config.method, config.peft_config, backend)
    if config.training_args.get("gradient_checkpointing") or config.training_args.get("activation_checkpointing"):
        enable_gradient_checkpointing(run.model, info)


def build_trainer(run: TrainingRun, manager):
    from transformers.trainer_callback import PrinterCallback

    from glmport.train.callbacks import ProgressCallback
    from glmport.train.dataset import Collator
    from glmport.train.trainer import GlmTrainer

    args = _training_arguments(run, has_eval=run.datasets.eval is not None, generation=_generation_config(run))
    generates = (args.predict_with_generate and run.datasets.eval is not None) or run.datasets.test is not None
    compute_metrics = None
    if generates:
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
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback prints lines
    trainer.add_callback(ProgressCallback(trainer))
    for plugin_callbacks in manager.hook.glmport_trainer_callbacks(run=run):
        for callback in plugin_callbacks or []:
            trainer.add_callback(callback)
    run.trainer = trainer
    return trainer


def run_training(request: TrainRequest, manager) -> dict:
    """Train, save, evaluate the test split, plot, summarize. Returns the summary."""
    from glmport.train.summary import publish_result, summarize, write_predictions

    started = time.time()
    env = EnvironmentChanges()
    run = None
    try:
        run = build_run(request, manager, env)
        trainer = build_trainer(run, manager)
        manager.hook.glmport_before_train(run=run)
        run.backend.reset_peak_memory()
        trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
        if trainer.first_nonfinite_step is not None:
            raise GlmportError(
                f"the training loss became NaN/inf at step {trainer.first_nonfinite_step}; stopped without publishing "
                "a result or a checkpoint of that state. Lower the learning rate, or use bf16/fp32 (fp16 overflows "
                "GLM-4). Complete checkpoints from before it remain."
            )
        result_dir = publish_result(run)
        predictions = write_predictions(run) if run.datasets.test is not None else None
        summary = summarize(run, started, result_dir, predictions)
        manager.hook.glmport_after_train(run=run, summary=summary)
        return summary
    finally:
        if run is not None and run.loaded is not None and run.loaded.patches is not None:
            run.loaded.patches.undo()
        env.restore()


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
