"""QLoRA: the frozen base model in 4-bit (or 8-bit) through bitsandbytes, LoRA adapters in fp32 on top.

``glmport.quantization: 4bit`` is what LLaMA-Factory calls ``quantization_bit: 4`` (``8bit``: ``8``): the base
loads through transformers' ``BitsAndBytesConfig`` (nf4 with double quantization, computing in the run's
dtype), and peft's ``prepare_model_for_kbit_training`` readies it (the remaining half-precision weights go to
fp32, inputs require grads). Gradient checkpointing is not turned on there: glmport turns it on itself, the
way every other run does (:func:`glmport.train.methods.enable_gradient_checkpointing`), so it is checked the
same way.

Where it can run is the backend's answer (:meth:`glmport.backend.Backend.quantization_kernels`); whether
bitsandbytes is installed is asked here. Every refusal is a :class:`~glmport.errors.ConfigError` before the
model loads. The result records the quantization (``glmport_result.json``); ``glmport infer`` loads the base
the same way where it can, and ``glmport export --merge`` merges the adapter into the full-precision base.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging

from glmport.errors import ConfigError, Problem

log = logging.getLogger("glmport")

KEY = "glmport.quantization"
EXTRA = "glmport[qlora]"
BITS = {"4bit": 4, "8bit": 8}
METHOD_NAMES = {"ptuning": "P-Tuning v2 (peft_config.peft_type: PREFIX_TUNING)",
                "sft": "full SFT (no peft_config)"}


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes' version, or None; nothing is imported (importing it probes devices)."""
    try:
        if importlib.util.find_spec("bitsandbytes") is None:
            return None
        return importlib.metadata.version("bitsandbytes")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):  # not importable, or no metadata
        return None


def support_problem(setting: str, backend, where: str, key: str = KEY) -> Problem | None:
    """Why ``setting`` cannot run on ``backend`` here (no kernels for the device, or no bitsandbytes), or None."""
    if setting not in BITS:
        return None
    kernels = backend.quantization_kernels()
    if not kernels.available:
        return Problem(where, f"{key}: {setting} cannot run on backend {backend.name}: {kernels.reason}",
                       kernels.install_hint or "set glmport.quantization: none")
    if bitsandbytes_version() is None:
        return Problem(where, f"{key}: {setting} needs the bitsandbytes package, which is not installed",
                       f"pip install '{EXTRA}' (bitsandbytes), or set glmport.quantization: none")
    return None


def quantization_problems(config, backend) -> list[Problem]:
    """Every reason the config's ``glmport.quantization`` cannot run with its method on ``backend``."""
    setting = config.glmport.quantization
    if setting not in BITS:
        return []
    where = config.locate(KEY)
    problems = []
    if config.method != "lora":
        problems.append(Problem(where, f"{KEY}: {setting} is QLoRA: LoRA adapters on a frozen quantized base; "
                                       f"{METHOD_NAMES[config.method]} trains weights that cannot be quantized",
                                "use peft_config.peft_type: LORA, or set glmport.quantization: none"))
    unsupported = support_problem(setting, backend, where)
    if unsupported is not None:
        problems.append(unsupported)
    return problems


def bitsandbytes_config(setting: str, dtype):
    """transformers' ``BitsAndBytesConfig`` for ``setting`` (``4bit``/``8bit``), computing in ``dtype``;
    None for ``none``."""
    if setting not in BITS:
        return None
    from transformers import BitsAndBytesConfig

    if BITS[setting] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    # QLoRA's recipe (Dettmers et al. 2023): NormalFloat4, its quantization constants quantized again
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def prepare_for_training(model):
    """peft's k-bit preparation, without its own checkpointing (glmport's comes later, if asked)."""
    from peft import prepare_model_for_kbit_training

    from glmport.train.methods import quiet_peft

    with quiet_peft():
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def quantized_modules(model) -> dict[str, int]:
    """How many linear layers of each bitsandbytes type the model holds (``Linear4bit``: 12, say)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes"):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def check_quantized(model, setting: str, info) -> None:
    """A load that left every linear layer in full precision would train plain LoRA under a QLoRA name."""
    counts = quantized_modules(model)
    if not counts:
        raise ConfigError(f"{KEY}: {setting}: no layer of the {info.kind} {info.family} model {info.path} was "
                          "quantized (transformers left them all in full precision)",
                          [Problem(KEY, "report this with the model's config.json", "set glmport.quantization: none")])
    log.info("base model in %s through bitsandbytes %s: %s", setting, bitsandbytes_version(),
             ", ".join(f"{n} {name}" for name, n in sorted(counts.items())))
