"""The training configuration: the upstream ChatGLM3 / GLM-4 ``finetune_demo`` YAML as users have it, plus
a ``glmport:`` section, plus ``key=value`` overrides from the command line.

Every problem (unknown key, wrong type, missing file, legacy key that cannot be mapped) is collected and
reported in one :class:`~glmport.errors.ConfigError` before any model is loaded, each with the file and
line (or the override) it comes from.

Upstream schema (``FinetuningConfig`` of ``finetune_hf.py``)::

    data_config: {train_file, val_file, test_file, num_proc}
    max_input_length: int
    max_output_length: int
    training_args: any Seq2SeqTrainingArguments field, incl. generation_config: {...}
    peft_config: {peft_type: LORA | PREFIX_TUNING, ...}     # absent: full SFT
    combine: bool      # GLM-4: train only the last assistant turn
    freezeV: bool      # GLM-4V: freeze the vision tower (no effect on text models)
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmport.data.formats import FORMATS
from glmport.errors import ConfigError, Problem
from glmport.yamlfile import apply_overrides, load_yaml

log = logging.getLogger("glmport")

# Keys that transformers renamed or removed since the upstream demos were written. A mapped key is
# renamed with a warning; a key mapped to None is dropped with a warning that says why.
LEGACY_TRAINING_ARGS: dict[str, tuple[str | None, str]] = {
    "evaluation_strategy": ("eval_strategy", "renamed in transformers 4.46"),
    "no_cuda": ("use_cpu", "renamed in transformers 4.37"),
    "per_gpu_train_batch_size": ("per_device_train_batch_size", "renamed in transformers 4"),
    "per_gpu_eval_batch_size": ("per_device_eval_batch_size", "renamed in transformers 4"),
    "warmup_ratio": ("warmup_steps", "transformers 5 reads a warmup_steps below 1 as a ratio"),
    "overwrite_output_dir": (None, "removed in transformers 5; glmport decides from RESUME (yes / N / no)"),
    "logging_dir": (None, "removed in transformers 5; glmport writes TensorBoard logs to OUTPUT_DIR/runs "
                          "(set TENSORBOARD_LOGGING_DIR to choose another folder)"),
    "save_safetensors": (None, "removed in transformers 5, which always writes safetensors"),
    "include_tokens_per_second": (None, "removed in transformers 5; glmport reports tokens/s itself"),
    "half_precision_backend": (None, "removed in transformers 5"),
    "use_mps_device": (None, "removed in transformers 5"),
}

TOP_LEVEL_KEYS = {
    "data_config", "max_input_length", "max_output_length", "training_args", "peft_config",
    "combine", "freezeV", "glmport", "swanlab",
}


@dataclass
class DataConfig:
    train_file: str
    val_file: str | None = None
    test_file: str | None = None
    num_proc: int | None = None


@dataclass
class GlmportSettings:
    """The ``glmport:`` section: glmport's own settings (everything else is the upstream schema)."""

    backend: str = "auto"  # auto | cpu | cuda | mlu | a plugin's backend; --backend wins
    model_dir: str | None = None  # for `glmport train CONFIG`; MODEL_DIR wins in the upstream form
    data_dir: str | None = None  # base of data_config paths; default: the config file's folder
    init_model: str | None = None  # tiny-native | tiny-remote: build model_dir offline when missing
    synthetic_data: dict | None = None  # {train: N, val: N, seed: S}: generate data files when missing
    model_family: str = "auto"  # auto | chatglm | chatglm2 | chatglm3 | glm4
    template: str = "auto"  # auto | chatglm | chatglm2 | chatglm3 | glm4
    data_format: str = "auto"  # auto, or one of glmport.data.formats.FORMATS
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16: dtype of frozen base weights
    guard_64bit: str = "auto"  # auto (on when emulating a device without 64-bit) | on | off | report
    emulate: str | None = None  # e.g. mlu: same as GLMPORT_EMULATE=mlu for this run
    eval_samples: int = 50  # validation samples used per evaluation (upstream hard-codes 50)
    skip_invalid: bool = False  # skip bad records, listing each in OUTPUT_DIR/skipped_records.jsonl
    allow_unverified_patches: bool = False  # patch remote code whose revision is not in the manifest
    trust_remote_code: bool | None = None  # None: run remote code only of a revision in the manifest
    plot: bool = True  # write loss.png at the end
    packing: bool | None = None  # padding-free packed batches; None: where correct (glmport.data.packing)
    seed: int | None = None  # overrides training_args.seed
    quantization: str = "none"  # none | 4bit | 8bit: QLoRA's frozen base through bitsandbytes (LoRA only)
    gradient_checkpointing: str | None = None  # off | full | selective | auto; None: training_args decides
    compile: bool = False  # torch.compile each transformer layer (where the backend supports it)


CHOICES = {
    "model_family": {"auto", "chatglm", "chatglm2", "chatglm3", "glm4"},
    "template": {"auto", "chatglm", "chatglm2", "chatglm3", "glm4"},
    "data_format": {"auto", *FORMATS},
    "dtype": {"auto", "fp32", "bf16", "fp16"},
    "guard_64bit": {"auto", "on", "off", "report"},
    "init_model": {None, "tiny-native", "tiny-remote"},
    "quantization": {"none", "4bit", "8bit"},
    "gradient_checkpointing": {None, "off", "full", "selective", "auto"},
}


@dataclass
class RunConfig:
    path: Path
    data_config: DataConfig
    max_input_length: int
    max_output_length: int
    training_args: dict[str, Any]
    peft_config: dict[str, Any] | None
    combine: bool
    freeze_vision: bool
    glmport: GlmportSettings
    data_dir: Path
    model_dir: Path | None
    warnings: list[str] = field(default_factory=list)
    where: dict[str, str] = field(default_factory=dict)  # dotted key -> "file:line" or "override ..."

    @property
    def method(self) -> str:
        """``lora``, ``ptuning`` or ``sft``."""
        if not self.peft_config:
            return "sft"
        return "lora" if str(self.peft_config.get("peft_type", "")).upper() == "LORA" else "ptuning"

    def data_path(self, split: str) -> Path | None:
        name = getattr(self.data_config, f"{split}_file")
        return None if name is None else (self.data_dir / name)

    def locate(self, key: str) -> str:
        return self.where.get(key) or self.where.get(key.split(".")[0]) or str(self.path)


# --- type checking of plain YAML values against dataclass annotations ------------------------------


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether a YAML value fits a (resolved) type annotation. Unknown complex types are accepted."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if isinstance(annotation, type):
        if issubclass(annotation, bool):
            return isinstance(value, bool)
        if issubclass(annotation, enum.Enum):
            return isinstance(value, str) and value in {m.value for m in annotation}
        if annotation is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if annotation is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if annotation in (str, Path):
            return isinstance(value, str)
        if annotation in (list, dict):
            return isinstance(value, annotation)
        return isinstance(value, (dict, str)) or value is None  # a config object given as a mapping or path
    return True


def _describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("NoneType", "None")


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f"did you mean {close[0]!r}?" if close else "remove it"


def _check_fields(section: str, data: dict, cls, hints: dict, where, problems: list[Problem]) -> dict:
    """Check keys and value types of ``data`` against the dataclass ``cls``; return the valid subset."""
    names = {f.name for f in dataclasses.fields(cls)}
    valid = {}
    for key, value in data.items():
        dotted = f"{section}.{key}"
        if key not in names:
            problems.append(Problem(where(dotted), f"{dotted}: unknown key", _suggest(key, names)))
            continue
        if not _accepts(hints[key], value):
            problems.append(Problem(where(dotted), f"{dotted}: expected {_describe(hints[key])}, got {value!r}"))
            continue
        valid[key] = value
    return valid


# --- the sections -----------------------------------------------------------------------------------


def _training_args(raw: dict, where, problems: list[Problem], warnings: list[str]) -> dict:
    from transformers import Seq2SeqTrainingArguments

    hints = typing.get_type_hints(Seq2SeqTrainingArguments)
    renamed = {}
    for key, value in raw.items():
        if key in LEGACY_TRAINING_ARGS and key not in hints:
            new, why = LEGACY_TRAINING_ARGS[key]
            dotted = f"training_args.{key}"
            if new is None:
                warnings.append(f"{where(dotted)}: {dotted} is ignored: {why}")
                continue
            if new in raw:
                problems.append(Problem(where(dotted), f"{dotted} and training_args.{new} are both set",
                                        f"keep only {new} ({key} was {why})"))
                continue
            warnings.append(f"{where(dotted)}: {dotted} is now training_args.{new} ({why}); using it as {new}")
            renamed[new] = value
        else:
            renamed[key] = value
    valid = _check_fields("training_args", renamed, Seq2SeqTrainingArguments, hints, where, problems)
    gen = valid.get("generation_config")
    if isinstance(gen, dict):
        from transformers import GenerationConfig

        known = set(GenerationConfig().to_dict()) | {"max_new_tokens", "min_new_tokens"}
        for key in gen:
            if key not in known:
                dotted = f"training_args.generation_config.{key}"
                problems.append(Problem(where(dotted), f"{dotted}: not a generation setting", _suggest(key, known)))
    return valid


def _peft_config(raw: Any, where, problems: list[Problem]) -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(Problem(where("peft_config"), f"peft_config: expected a mapping, got {raw!r}",
                                "give peft_type: LORA or PREFIX_TUNING, or remove peft_config for full SFT"))
        return None
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type not in ("LORA", "PREFIX_TUNING"):
        problems.append(Problem(where("peft_config.peft_type"), f"peft_config.peft_type: {raw.get('peft_type')!r} is not supported",
                                "use LORA or PREFIX_TUNING (P-Tuning v2), or remove peft_config for full SFT"))
        return None
    try:
        from peft import get_peft_config

        get_peft_config(dict(raw, task_type=raw.get("task_type", "CAUSAL_LM")))
    except (TypeError, ValueError) as exc:
        problems.append(Problem(where("peft_config"), f"peft_config: peft rejects it: {exc}"))
        return None
    return dict(raw)


def _positive_int(data: dict, key: str, where, problems: list[Problem], required: bool = True) -> int:
    value = data.get(key)
    if value is None:
        if required:
            problems.append(Problem(where(key), f"{key}: missing", f"add `{key}: 512` (tokens) at the top level"))
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problems.append(Problem(where(key), f"{key}: expected a positive integer, got {value!r}"))
        return 0
    return value


def _check_training_numbers(args: dict, where, problems: list[Problem]) -> None:
    """Values of the right type that still cannot make a run (transformers takes max_steps: 0 and trains
    nothing, and a negative learning rate fails in the optimizer once the model is loaded)."""
    steps = args.get("max_steps", -1)
    if steps == 0 or steps < -1:
        problems.append(Problem(where("training_args.max_steps"), f"training_args.max_steps: {steps} trains nothing",
                                "give the number of optimizer steps (1 or more), or -1 to train for "
                                "training_args.num_train_epochs"))
    elif steps == -1:
        epochs = args.get("num_train_epochs", 3.0)
        if not (math.isfinite(epochs) and epochs > 0):
            problems.append(Problem(where("training_args.num_train_epochs"),
                                    f"training_args.num_train_epochs: {epochs} trains nothing (max_steps is -1, so "
                                    "the epochs decide how long the run is)",
                                    "give a number of epochs above 0, or set training_args.max_steps"))
    for key, least in (("learning_rate", 0), ("weight_decay", 0), ("warmup_steps", 0),
                       ("per_device_train_batch_size", 1), ("per_device_eval_batch_size", 1),
                       ("gradient_accumulation_steps", 1)):
        value = args.get(key)
        if value is not None and not (math.isfinite(value) and value >= least):
            dotted = f"training_args.{key}"
            problems.append(Problem(where(dotted), f"{dotted}: {value}: must be {least} or more"))


def load_run_config(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    data_dir: str | Path | None = None,
    model_dir: str | Path | None = None,
) -> RunConfig:
    """Read, override and validate a config. ``data_dir``/``model_dir`` are the upstream positional
    arguments (they win over ``glmport.data_dir``/``glmport.model_dir``). Every problem is raised in one
    :class:`ConfigError`; the warnings (legacy keys) are logged."""
    config, problems = read_run_config(path, overrides, data_dir=data_dir, model_dir=model_dir)
    raise_problems(config, problems)
    log_warnings(config)
    return config


def raise_problems(config: RunConfig, problems: list[Problem]) -> None:
    if problems:
        raise ConfigError(f"{config.path}: {len(problems)} problem(s) in the configuration", problems)


def log_warnings(config: RunConfig) -> None:
    for message in config.warnings:
        log.warning(message)


def read_run_config(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    data_dir: str | Path | None = None,
    model_dir: str | Path | None = None,
) -> tuple[RunConfig, list[Problem]]:
    """Read, override and check a config: the config (keys with problems left out) and every problem found,
    for callers that add problems of their own (the backend) before raising them together. A file that
    cannot be read or parsed raises a :class:`ConfigError` at once."""
    path = Path(path)
    data, lines = load_yaml(path)
    problems: list[Problem] = []
    origins = apply_overrides(data, list(overrides or []), lines, problems)

    def where(key: str) -> str:
        """``file:line`` of ``key``, or the override that set it (or set a key below it); else the nearest
        enclosing key's."""
        parts = key.split(".")
        while parts:
            dotted = ".".join(parts)
            if dotted in origins:
                return origins[dotted]
            if dotted in lines:
                return f"{path}:{lines[dotted]}"
            below = next((origin for k, origin in origins.items() if k.startswith(dotted + ".")), None)
            if below is not None:
                return below
            parts.pop()
        return str(path)

    warnings: list[str] = []
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.append(Problem(where(key), f"{key}: unknown top-level key", _suggest(key, TOP_LEVEL_KEYS)))
    if "swanlab" in data:
        warnings.append(f"{where('swanlab')}: swanlab is ignored: glmport logs to TensorBoard (report_to)")

    def section(name: str) -> dict:
        value = data.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(Problem(where(name), f"{name}: expected a mapping, got {value!r}"))
            return {}
        return value

    settings_raw = section("glmport")
    settings = GlmportSettings(**_check_fields(
        "glmport", settings_raw, GlmportSettings, typing.get_type_hints(GlmportSettings), where, problems))
    for key, choices in CHOICES.items():
        if key in settings_raw and getattr(settings, key) not in choices:
            shown = ", ".join(sorted(str(c) for c in choices if c is not None))
            problems.append(Problem(where(f"glmport.{key}"), f"glmport.{key}: {getattr(settings, key)!r} is not one of {shown}"))
    if settings.eval_samples < 0:
        problems.append(Problem(where("glmport.eval_samples"), "glmport.eval_samples: must be 0 or more"))

    data_raw = section("data_config")
    if "train_file" not in data_raw:
        problems.append(Problem(where("data_config"), "data_config.train_file: missing",
                                "add data_config: {train_file: train.jsonl} (relative to the data folder)"))
    data_cfg = DataConfig(**{"train_file": "", **_check_fields(
        "data_config", data_raw, DataConfig, typing.get_type_hints(DataConfig), where, problems)})

    max_in = _positive_int(data, "max_input_length", where, problems)
    max_out = _positive_int(data, "max_output_length", where, problems)
    training_args = _training_args(section("training_args"), where, problems, warnings)
    _check_training_numbers(training_args, where, problems)
    upstream = training_args.get("gradient_checkpointing")
    if settings.gradient_checkpointing is not None and upstream is not None \
            and settings.gradient_checkpointing != ("full" if upstream else "off"):
        problems.append(Problem(where("glmport.gradient_checkpointing"),
                                f"glmport.gradient_checkpointing: {settings.gradient_checkpointing} and "
                                f"training_args.gradient_checkpointing: {str(upstream).lower()} disagree",
                                "keep one of them (training_args.gradient_checkpointing: true means full)"))
    peft = _peft_config(data.get("peft_config"), where, problems)
    for flag in ("combine", "freezeV"):
        if flag in data and not isinstance(data[flag], bool):
            problems.append(Problem(where(flag), f"{flag}: expected true or false, got {data[flag]!r}"))

    base = path.parent
    data_root = Path(data_dir) if data_dir is not None else (base / settings.data_dir if settings.data_dir else base)
    model_root = Path(model_dir) if model_dir is not None else (base / settings.model_dir if settings.model_dir else None)

    config = RunConfig(
        path=path, data_config=data_cfg, max_input_length=max_in, max_output_length=max_out,
        training_args=training_args, peft_config=peft, combine=bool(data.get("combine", False)),
        freeze_vision=bool(data.get("freezeV", False)), glmport=settings, data_dir=data_root,
        model_dir=model_root, warnings=warnings,
        where={k: where(k) for k in set(lines) | set(origins)},
    )
    _check_files(config, problems)
    return config, problems


EXAMPLE_FILES = {"train": "train.jsonl", "val": "dev.jsonl", "test": "test.jsonl"}


def _check_files(config: RunConfig, problems: list[Problem]) -> None:
    """Data files, the model folder and a DeepSpeed config must exist (unless glmport will create them)."""
    generated = bool(config.glmport.synthetic_data)
    for split in ("train", "val", "test"):
        name = getattr(config.data_config, f"{split}_file")
        if not name:
            continue
        key, file = f"data_config.{split}_file", config.data_dir / name
        if file.is_dir():
            problems.append(Problem(config.locate(key), f"{key}: {file} is a folder; a data file is expected",
                                    f"name a .jsonl or .json file inside it ({key}: {Path(name) / EXAMPLE_FILES[split]}, say)"))
        elif not generated and not file.is_file():
            problems.append(Problem(config.locate(key), f"{key}: {file} does not exist",
                                    "check the path; data files are relative to DATA_DIR (or glmport.data_dir, "
                                    "or the config file's folder)"))
    if config.model_dir is None:
        problems.append(Problem(str(config.path), "no model folder given",
                                "pass MODEL_DIR (glmport train DATA_DIR MODEL_DIR CONFIG) or set glmport.model_dir"))
    elif not config.glmport.init_model and not (config.model_dir / "config.json").is_file():
        problems.append(Problem(config.locate("glmport.model_dir"), f"{config.model_dir} is not a model folder (no config.json)",
                                "point at a downloaded ChatGLM3 / GLM-4 folder, or build one: glmport init-model tiny-native DIR"))
    ds = config.training_args.get("deepspeed")
    if isinstance(ds, str):
        candidates = [config.path.parent / ds, Path(ds)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            problems.append(Problem(config.locate("training_args.deepspeed"),
                                    f"training_args.deepspeed: {ds} not found (looked next to the config and in the current folder)",
                                    "use configs/ds_zero_2.json or configs/ds_zero_3.json, or remove the key"))
        else:
            config.training_args["deepspeed"] = str(found)
