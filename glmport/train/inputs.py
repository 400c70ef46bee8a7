"""The user's input to a run, checked before any model is loaded and before anything is written: launch,
config and backend (together, in one error), DeepSpeed, data files, consent to run the model's code.

Every error here names the config key, flag or file line at fault, and says what to do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from glmport.backend import Backend, Selection, parse_emulate, select_backend
from glmport.config import RunConfig, log_warnings, raise_problems, read_run_config
from glmport.data.loader import LoadResult, load_conversations
from glmport.errors import BackendUnavailable, ConfigError, Problem
from glmport.tiny import build_tiny_model
from glmport.tiny.synthetic import ALPHABET, write_synthetic_splits
from glmport.train.environment import EnvironmentChanges
from glmport.train.quantization import quantization_problems

log = logging.getLogger("glmport")


def load_config_and_backend(request, manager) -> tuple[RunConfig, Selection]:
    """The config (with the command line's flags applied) and the backend, checked together: one error lists
    every problem of both, the backend's included. A backend that is the only problem raises
    :class:`BackendUnavailable` (exit status 3) as it is."""
    named = request.backend if request.backend not in (None, "", "auto") else None
    try:
        config, problems = read_run_config(request.config, request.overrides, data_dir=request.data_dir,
                                           model_dir=request.model_dir)
    except ConfigError as exc:  # the file cannot be read; a backend named on the command line is still checked
        unavailable = _named_backend_problem(manager, named) if named else None
        if unavailable is None:
            raise
        both = [*exc.problems, unavailable]
        raise ConfigError(f"{request.config}: {len(both)} problem(s)", both) from None
    apply_flags(config, request)
    selection = None
    try:
        selection = choose_backend(config, request.backend, manager)
    except BackendUnavailable as exc:
        if not problems:
            raise
        problems.append(_backend_problem(exc, *_requested_backend(config, request.backend)))
    except ConfigError as exc:
        problems.extend(exc.problems)
    if selection is not None:
        problems.extend(precision_problems(config, selection.backend))
        problems.extend(quantization_problems(config, selection.backend))
    raise_problems(config, problems)
    log_warnings(config)
    return config, selection


def launch_config_and_backend(request, manager, *, dry_run: bool) -> tuple[RunConfig, Backend]:
    """For ``glmport train --nproc-per-node``: the config and the backend, checked as a run checks them, in
    one error, before any process starts. Two differences: the backend's dtypes are not asked (that can
    initialize a device in the launcher, which then holds memory on it for the whole run; each rank checks
    them), and a dry run may name a backend that is not available here (it prints commands for another
    host)."""
    config, problems = read_run_config(request.config, request.overrides, data_dir=request.data_dir,
                                       model_dir=request.model_dir)
    apply_flags(config, request)
    backend = None
    try:
        backend = choose_backend(config, request.backend, manager).backend
    except BackendUnavailable as exc:
        source, requested = _requested_backend(config, request.backend)
        if dry_run and requested not in (None, "", "auto"):
            backend = manager.backends.with_emulation(parse_emulate(config.glmport.emulate)).get(requested)
        if backend is None:
            if not problems:
                raise
            problems.append(_backend_problem(exc, source, requested))
    except ConfigError as exc:
        problems.extend(exc.problems)
    if backend is not None:
        problems.extend(quantization_problems(config, backend))
    raise_problems(config, problems)
    log_warnings(config)
    return config, backend


def apply_flags(config: RunConfig, request) -> None:
    """``--allow-unverified-patches`` and ``--[no-]trust-remote-code`` win over the config's keys."""
    if request.allow_unverified_patches:
        config.glmport.allow_unverified_patches = True
        config.where["glmport.allow_unverified_patches"] = "--allow-unverified-patches"
    if request.trust_remote_code is not None:
        config.glmport.trust_remote_code = request.trust_remote_code
        config.where["glmport.trust_remote_code"] = "--trust-remote-code" if request.trust_remote_code \
            else "--no-trust-remote-code"


def _requested_backend(config: RunConfig, flag: str | None) -> tuple[str, str | None]:
    """(where the backend is asked for, which one): ``--backend``, else ``glmport.backend``, else auto."""
    if flag in (None, "", "auto") and config.glmport.backend not in ("", "auto"):
        return config.locate("glmport.backend"), config.glmport.backend
    return "--backend", flag


def _named_backend_problem(manager, named: str) -> Problem | None:
    try:
        select_backend(manager.backends, named)
    except BackendUnavailable as exc:
        return _backend_problem(exc, "--backend", named)
    return None


def _backend_problem(exc: BackendUnavailable, source: str, requested: str | None) -> Problem:
    """The error :func:`glmport.backend.select_backend` raised ("SOURCE NAME: what", then "-> fix" on the
    next line) as one problem among others."""
    head, _, fix = str(exc).partition("\n    -> ")
    for prefix in (f"{source} {requested}: ", f"{source} {requested!r}: "):
        if head.startswith(prefix):
            where = f"--backend {requested}" if source == "--backend" else source
            return Problem(where, head[len(prefix):], fix)
    where, sep, what = head.partition(": ")  # asked for elsewhere (GLMPORT_BACKEND), or auto found none
    return Problem(where, what, fix) if sep else Problem("backend", head, fix)


def choose_backend(config: RunConfig, flag: str | None, manager) -> Selection:
    """``--backend``, else ``glmport.backend``, else auto; ``training_args.use_cpu`` may only agree."""
    source, requested = _requested_backend(config, flag)
    if config.training_args.get("use_cpu"):
        if requested not in (None, "", "auto", "cpu"):
            raise ConfigError("the backend is chosen twice", [Problem(
                config.locate("training_args.use_cpu"),
                f"training_args.use_cpu: true asks for the CPU, but {source} asks for {requested}",
                "remove use_cpu (glmport's backend decides the device) or choose --backend cpu")])
        requested, source = "cpu", config.locate("training_args.use_cpu")
    return select_backend(manager.backends, requested, flag=source, emulate=parse_emulate(config.glmport.emulate))


def precision_problems(config: RunConfig, backend) -> list[Problem]:
    """Mixed precision (``training_args.fp16``/``bf16``) and base weights (``glmport.dtype``) in a dtype the
    backend has: transformers would ignore fp16 on a CPU, or fail once the model is loaded."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    supported = backend.supported_dtypes()
    has = ", ".join(name for name, dtype in dtypes.items() if dtype in supported)
    problems = []
    for key in ("fp16", "fp16_full_eval", "bf16", "bf16_full_eval"):
        name = key[:4]
        if config.training_args.get(key) is True and dtypes[name] not in supported:
            other = "bf16" if name == "fp16" else "fp16"
            instead = f"set training_args.{other}: true instead, or " if dtypes[other] in supported else ""
            problems.append(Problem(config.locate(f"training_args.{key}"),
                                    f"training_args.{key}: backend {backend.name} has no {name} (it supports {has})",
                                    f"{instead}remove training_args.{key} to train in fp32"))
    requested = config.glmport.dtype
    if requested in dtypes and dtypes[requested] not in supported:
        problems.append(Problem(config.locate("glmport.dtype"),
                                f"glmport.dtype: backend {backend.name} has no {requested} (it supports {has})",
                                "use glmport.dtype: auto (the backend's best choice), or one it supports"))
    return problems


def output_folder(config: RunConfig) -> Path:
    """``training_args.output_dir``: relative to the working directory (upstream's meaning), unlike the model
    and data paths, which are relative to the config file; so the run says where it writes, absolute."""
    folder = Path(config.training_args.get("output_dir") or "./output")
    log.info("output folder: %s (training_args.output_dir, relative to the working directory)",
             os.path.abspath(folder))
    return folder


def check_model_code(config: RunConfig, backend, patch_sets) -> None:
    """Consent to run the model folder's code, and that its revision can be patched: checked before anything
    is written (the model folder may have just been built by :func:`prepare_inputs`)."""
    from glmport.modeling import inspect_model_dir, preflight

    info = inspect_model_dir(config.model_dir.resolve(), config.glmport.model_family)
    check_context_length(config, info)
    preflight(info, backend, "train", patch_sets, remote_code_consent(config))


def check_context_length(config: RunConfig, info) -> None:
    """The longest sequence the run makes fits the model's positions (``info.context``); past them the remote
    code fails deep in its rotary lookup (IndexError) once the model has loaded.

    A training sample is at most ``max_input_length + max_output_length + 1`` tokens (the budget of
    glmport.data.truncation: prompt, answer and its stop token), and an evaluation sample no longer. A peft
    prefix (P-Tuning v2 everywhere but the ChatGLM-6B/2/3 remote code's own prefix encoder) shifts the real
    tokens' positions by its ``num_virtual_tokens``; generation during evaluation needs the prompt (up to
    ``max_input_length + 1``) and ``max_new_tokens`` more."""
    from glmport.train.methods import uses_own_prefix_encoder

    if info.context is None:
        return
    key, context = info.context
    model_key = f"{info.path / 'config.json'} {key} is {context}"
    prefix = 0
    if config.method == "ptuning" and not uses_own_prefix_encoder(info, config.peft_config):
        prefix = int(config.peft_config.get("num_virtual_tokens") or 0)
    prefix_sum = f" + peft_config.num_virtual_tokens {prefix}" if prefix else ""
    fewer_virtual = " or fewer peft_config.num_virtual_tokens," if prefix else ""
    problems = []
    sample = config.max_input_length + config.max_output_length + 1 + prefix
    if sample > context:
        problems.append(Problem(
            config.locate("max_input_length"),
            f"max_input_length {config.max_input_length} + max_output_length {config.max_output_length} + 1"
            f"{prefix_sum} = {sample} positions for the longest training sample (prompt, answer, its stop token"
            f"{', after the prefix' if prefix else ''}), but {model_key}",
            f"lower max_input_length and max_output_length to at most {context - 1 - prefix} tokens together"
            f"{fewer_virtual} (longer samples are trimmed to fit: see `glmport data check`), or train a model "
            "with a longer context"))
    new_tokens = (config.training_args.get("generation_config") or {}).get("max_new_tokens")
    evaluates = config.data_config.val_file is not None or config.data_config.test_file is not None
    if config.training_args.get("predict_with_generate") and evaluates and isinstance(new_tokens, int):
        generated = config.max_input_length + 1 + new_tokens + prefix
        if generated > context:
            problems.append(Problem(
                config.locate("training_args.generation_config.max_new_tokens"),
                f"max_input_length {config.max_input_length} + 1 + training_args.generation_config.max_new_tokens "
                f"{new_tokens}{prefix_sum} = {generated} positions for evaluation's generation (the longest prompt, "
                f"then the new tokens), but {model_key}",
                f"lower training_args.generation_config.max_new_tokens to at most "
                f"{context - 1 - prefix - config.max_input_length} (or max_input_length), or set "
                "training_args.predict_with_generate: false"))
    if problems:
        raise ConfigError(f"{config.path}: sequences longer than the model's context ({context} positions)", problems)


def remote_code_consent(config: RunConfig):
    from glmport.modeling import RemoteCodeConsent

    return RemoteCodeConsent(trust=config.glmport.trust_remote_code,
                             allow_unverified=config.glmport.allow_unverified_patches,
                             source=config.locate("glmport.trust_remote_code"), config_keys=True)


def check_deepspeed(config: RunConfig, backend, env: EnvironmentChanges | None = None, *, dtypes: bool = True) -> None:
    """``training_args.deepspeed``: the DeepSpeed the backend needs is installed and seen by transformers, the
    user's ``DS_ACCELERATOR`` (if any) agrees with the backend, and the config file is one DeepSpeed can
    run (its mixed precision too, unless ``dtypes`` is false: a launcher does not ask the device); then
    ``DS_ACCELERATOR`` is set for the run (``env``)."""
    ds = config.training_args.get("deepspeed")
    info = backend.deepspeed()
    if not ds:
        if env is not None and info.installed:
            # accelerate imports an installed DeepSpeed, whose accelerator probe warns when it has to guess
            env.set("DS_ACCELERATOR", info.accelerator, keep_existing=True)
        return
    where = config.locate("training_args.deepspeed")
    problems = []
    if not info.usable:
        problems.append(Problem(where, f"training_args.deepspeed: {info.note}",
                                "install it, or remove training_args.deepspeed to train without it"))
    else:
        from transformers.integrations import is_deepspeed_available

        if info.distribution != "deepspeed" and not is_deepspeed_available():
            # transformers reads the metadata of the distribution named "deepspeed" only
            problems.append(Problem(where, f"training_args.deepspeed: {info.distribution} {info.version} is installed, "
                                    "but transformers recognises only the distribution named deepspeed",
                                    "install upstream deepspeed>=0.15.2 (it has an MLU accelerator) in place of the fork"))
        chosen = os.environ.get("DS_ACCELERATOR")
        if chosen and chosen != info.accelerator:
            problems.append(Problem("DS_ACCELERATOR", f"DS_ACCELERATOR={chosen} is set, but backend {backend.name} runs "
                                    f"DeepSpeed's {info.accelerator} accelerator",
                                    "unset DS_ACCELERATOR: glmport sets it from the backend"))
    problems += deepspeed_config_problems(ds, where, backend if dtypes else None)
    if problems:
        raise ConfigError("DeepSpeed is configured but cannot run here", problems)
    if env is not None:
        env.set("DS_ACCELERATOR", info.accelerator, keep_existing=True)
    log.info("DeepSpeed: %s", info.describe())


def deepspeed_config_problems(ds, where: str, backend) -> list[Problem]:
    """What in a DeepSpeed config file would fail once the model is loaded: unreadable JSON, an unknown ZeRO
    stage, mixed precision the backend lacks (not checked without a ``backend``)."""
    import json

    if isinstance(ds, dict):
        data, name = ds, "training_args.deepspeed"
    else:
        name = str(ds)
        try:
            data = json.loads(Path(ds).read_text(encoding="utf-8"))
        except OSError as exc:
            return [Problem(where, f"training_args.deepspeed: cannot read {ds}: {exc.strerror or exc}")]
        except ValueError as exc:
            return [Problem(f"{ds}:{getattr(exc, 'lineno', '?')}", f"not valid JSON: {exc}",
                            "fix the file, or use configs/ds_zero_2.json / ds_zero_3.json")]
    if not isinstance(data, dict):
        return [Problem(where, f"{name}: a DeepSpeed config is a JSON object")]
    problems = []
    stage = (data.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(Problem(name, f"zero_optimization.stage {stage!r}: DeepSpeed has stages 0, 1, 2 and 3"))
    if backend is None:
        return problems
    import torch

    supported = backend.supported_dtypes()
    for key, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        if (data.get(key) or {}).get("enabled") is True and dtype not in supported:
            problems.append(Problem(name, f"{key}.enabled: true, but backend {backend.name} has no {key}",
                                    f'set "{key}": {{"enabled": "auto"}} (it follows training_args.{key})'))
    return problems


def prepare_inputs(config: RunConfig) -> None:
    """Build what glmport was asked to build: a tiny model, a synthetic data set."""
    settings = config.glmport
    if settings.init_model and config.model_dir is not None and not (config.model_dir / "config.json").is_file():
        log.info("building %s model in %s", settings.init_model, config.model_dir)
        build_tiny_model(settings.init_model, config.model_dir, seed_text=ALPHABET)
    if settings.synthetic_data:
        write_synthetic_splits(config, settings.synthetic_data)


def read_records(config: RunConfig) -> dict[str, LoadResult]:
    """Every split read and validated (file/line errors) before the model is loaded."""
    records = {}
    for split in ("train", "val", "test"):
        path = config.data_path(split)
        if path is not None and (split != "val" or config.glmport.eval_samples > 0):
            records[split] = load_conversations(path, fmt=config.glmport.data_format,
                                                skip_invalid=config.glmport.skip_invalid, key=f"data_config.{split}_file")
    return records
