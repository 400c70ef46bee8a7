"""The Trainer's arguments: the user's ``training_args`` plus glmport's defaults and the backend's overrides."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from transformers import GenerationConfig, Seq2SeqTrainingArguments

from glmport.errors import ConfigError
from glmport.train.state import TrainingRun

log = logging.getLogger("glmport")


def training_arguments(run: TrainingRun, *, has_eval: bool, generation: GenerationConfig | None = None):
    """Build ``Seq2SeqTrainingArguments``; transformers' own checks become a :class:`ConfigError`."""
    config, backend = run.config, run.backend
    if config.glmport.compile:  # refused here, before the model is loaded, where the backend cannot compile
        from glmport.train.checkpointing import check_compile

        check_compile(backend, config.locate("glmport.compile"))
    args = dict(config.training_args)
    args["output_dir"] = str(run.output_dir)
    args.setdefault("report_to", "tensorboard" if has_tensorboard() else "none")
    if args.get("report_to") in ("tensorboard", ["tensorboard"]) and not has_tensorboard():
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
    if config.method == "sft" and "bf16" not in args and "fp16" not in args and backend.preferred_dtype() == torch.bfloat16:
        args["bf16"] = True
    args.pop("generation_config", None)
    if generation is not None:
        args["generation_config"] = generation
    # glmport turns checkpointing on itself and checks that it took (the 2024 remote code ignores the call)
    args.pop("gradient_checkpointing", None)
    args.pop("activation_checkpointing", None)
    if run.ranks.distributed:
        # The loss reaches every trainable parameter (glmport.train.loss computes it inside the wrapped forward),
        # so DDP need not search the graph for unused ones each step; a model that has some can say so.
        args.setdefault("ddp_find_unused_parameters", False)
    # the backend puts the Trainer on its device; under DeepSpeed, DeepSpeed does (DS_ACCELERATOR)
    args.update(backend.deepspeed_training_arguments() if args.get("deepspeed") else backend.training_arguments())
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


def generation_config(run: TrainingRun) -> GenerationConfig:
    """``training_args.generation_config`` with the template's pad and stop tokens (512 new tokens unless set)."""
    gen = run.config.training_args.get("generation_config") or {}
    if not isinstance(gen, dict):
        raise ConfigError(f"{run.config.locate('training_args.generation_config')}: generation_config must be a mapping")
    generation = GenerationConfig(**{"max_new_tokens": 512, **gen})
    generation.pad_token_id = run.template.pad_token_id
    generation.eos_token_id = list(run.template.stop_token_ids)
    # the Trainer aligns the generation config with the tokenizer's special ids (and warns when it has to)
    generation.bos_token_id = getattr(run.loaded.tokenizer, "bos_token_id", None)
    return generation


def has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
