"""Gradient checkpointing (``off``, ``full``, ``selective``, ``auto``) and compiled layers.

* ``full``: the model's own layer checkpointing (:func:`glmport.train.methods.enable_gradient_checkpointing`):
  each layer keeps only its input and runs its forward again in the backward pass.
* ``selective``: only the attention core is recomputed (the remote code's ``CoreAttention``/``SdpaAttention``
  module of ChatGLM2/3 and GLM-4), the part whose saved tensors grow with the square of the row length
  when attention runs with a dense mask; the linear layers keep their outputs, so the expensive matmuls
  run once. A non-reentrant :func:`torch.utils.checkpoint.checkpoint` wraps each core's forward, installed
  on the module instances (:func:`enable_selective`; :func:`remove_selective` takes it off).
* ``auto``: the least recompute whose estimated peak fits the device's free memory with a margin, from the
  analytic model of :mod:`glmport.bench.estimate` at the loaded model's shape and the run's token budget.

``glmport.compile: true`` compiles each transformer layer with :meth:`torch.nn.Module.compile` (module by
module, so a graph break or a recompile stays inside one layer) where the backend says torch.compile works
(:meth:`glmport.backend.Backend.compile_support`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from glmport.bench.estimate import GIB, estimate_peak
from glmport.bench.shapes import Shape
from glmport.errors import ConfigError, Problem

log = logging.getLogger("glmport")

KEY = "glmport.gradient_checkpointing"
MODES = ("off", "selective", "full")  # least recompute first
FIT_FRACTION = 0.8  # auto: a mode fits when its estimate is at most this share of the free memory


def requested_mode(config) -> str:
    """``off``/``full``/``selective``/``auto``: ``glmport.gradient_checkpointing``, else what the upstream
    ``training_args.gradient_checkpointing`` says (true: full). The config check refuses the two disagreeing."""
    if config.glmport.gradient_checkpointing is not None:
        return config.glmport.gradient_checkpointing
    args = config.training_args
    return "full" if args.get("gradient_checkpointing") or args.get("activation_checkpointing") else "off"


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_cores(model) -> list[torch.nn.Module]:
    """The attention cores of the remote code's ``SelfAttention`` modules (ChatGLM2/3, GLM-4): what
    ``selective`` recomputes. Native transformers classes call a function there, not a module: none."""
    return [m.core_attention for m in _base(model).modules()
            if isinstance(getattr(m, "core_attention", None), torch.nn.Module)]


def _checkpointed(module: torch.nn.Module):
    """The forward installed on a core: the class's forward (looked up at each call, so a patch set's
    replacement is used) under a non-reentrant checkpoint while training with gradients."""
    @functools.wraps(type(module).forward)
    def forward(*args, **kwargs):
        run = type(module).forward
        if not (module.training and torch.is_grad_enabled()):
            return run(module, *args, **kwargs)
        return torch.utils.checkpoint.checkpoint(run, module, *args, use_reentrant=False, **kwargs)

    return forward


def remove_selective(model) -> None:
    """Take selective checkpointing off every attention core of ``model`` (nothing happens where it was off)."""
    for core in attention_cores(model):
        core.__dict__.pop("forward", None)


def enable_selective(model, info) -> int:
    """Checkpoint every attention core of ``model``; returns how many."""
    cores = attention_cores(model)
    if not cores:
        raise ConfigError(f"{KEY}: selective recomputes the attention core, a module of the remote code's "
                          f"ChatGLM2/ChatGLM3/GLM-4 attention; this {info.kind} {info.family} model has none", [
                              Problem(KEY, "selective is not available for this model",
                                      "use full (every layer recomputed) or off")])
    for core in cores:
        core.forward = _checkpointed(core)
    return len(cores)


# --- auto: the estimate against free memory ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelShape(Shape):
    """A :class:`~glmport.bench.shapes.Shape` read from a loaded model's config, with its own vocabulary."""

    vocab_size: int = 65024

    @property
    def vocab(self) -> int:
        return self.vocab_size


def model_shape(config) -> ModelShape:
    """The estimate's shape of a remote ``ChatGLMConfig`` or a native ``GlmConfig``/``Glm4Config``."""
    def first(*names):
        return next(int(getattr(config, n)) for n in names if getattr(config, n, None) is not None)

    heads = first("num_attention_heads")
    kv = first("multi_query_group_num", "num_key_value_heads") if getattr(config, "multi_query_attention", True) \
        else heads
    return ModelShape(getattr(config, "_name_or_path", "") or "model", "chatglm3", first("num_layers", "num_hidden_layers"),
                      first("hidden_size"), heads, kv, first("ffn_hidden_size", "intermediate_size"),
                      vocab_size=first("padded_vocab_size", "vocab_size"))


def estimate_modes(shape, *, method: str, tokens: int, rows: int, attention: str, dtype: str,
                   half_precision: str = "bf16", lora_rank: int = 8, workload: str = "W1",
                   quantization: str = "none") -> dict[str, dict]:
    """:func:`~glmport.bench.estimate.estimate_peak` for off, selective and full."""
    common = dict(method=method, workload=workload, dtype=dtype, tokens=tokens, lora_rank=lora_rank,
                  attention=attention, rows=rows, half_precision=half_precision, quantization=quantization)
    return {mode: estimate_peak(shape, checkpointing=mode, **common) for mode in MODES}


def token_budget(config) -> tuple[int, int]:
    """(tokens, rows) of the largest micro-batch: every sample at the longest it is trimmed to, prompt and
    answer and the end token (packed rows hold no more tokens than that)."""
    batch = int(config.training_args.get("per_device_train_batch_size", 8))
    return batch * (config.max_input_length + config.max_output_length + 1), batch


def choose(estimates: dict[str, dict], free: int | None, modes=MODES) -> tuple[str, str]:
    """The least recompute among ``modes`` that fits ``FIT_FRACTION`` of ``free``; (mode, why)."""
    need = {mode: estimates[mode]["above_loaded_model"] for mode in modes}
    shown = ", ".join(f"{mode} {need[mode] / GIB:.2f} GiB" for mode in modes)
    if free is None:
        return "full", f"estimated need above the loaded model: {shown}; the backend does not report free memory, so full"
    budget = free * FIT_FRACTION
    fits = [mode for mode in modes if need[mode] <= budget]
    mode = fits[0] if fits else "full"
    verdict = "fits" if fits else "none fits, so the smallest"
    return mode, (f"estimated need above the loaded model: {shown}; free {free / GIB:.2f} GiB, "
                  f"{FIT_FRACTION:.0%} of it usable: {mode} {verdict}")


# --- the run's step ----------------------------------------------------------------------------------


def apply_checkpointing(model, info, mode: str, *, backend=None, config=None, method: str = "lora") -> dict:
    """Turn ``mode`` on for ``model``; returns the plan (``mode``, ``requested``, and for auto the numbers),
    which is also kept on the model (:func:`plan_of`)."""
    from glmport.train.methods import enable_gradient_checkpointing

    plan: dict = {"requested": mode, "mode": mode}
    if mode == "auto":
        tokens, rows = token_budget(config)
        # with the backend's variable-length kernel the patch set attends without a score matrix, packed or not
        attention = "fused" if backend.varlen_attention() is not None else "masked"
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        dtype = "fp32" if method == "sft" else names.get(next(_base(model).parameters()).dtype, "fp32")
        estimates = estimate_modes(model_shape(_base(model).config), method=method, tokens=tokens, rows=rows,
                                   attention=attention, dtype=dtype,
                                   half_precision=names.get(backend.preferred_dtype(), "fp32"),
                                   lora_rank=int((config.peft_config or {}).get("r", 8)),
                                   quantization=config.glmport.quantization)
        free = backend.free_memory()
        modes = MODES if attention_cores(model) else ("off", "full")  # selective needs the remote code's cores
        plan["mode"], why = choose(estimates, free, modes)
        plan.update(free_bytes=free, tokens_per_micro_batch=tokens, attention=attention,
                    estimated_bytes={m: estimates[m]["above_loaded_model"] for m in modes})
        plan["decision"] = f"gradient checkpointing auto: {plan['mode']} ({tokens:,} tokens per micro-batch; {why})"
    if plan["mode"] == "full":
        enable_gradient_checkpointing(model, info)
    elif plan["mode"] == "selective":
        plan["recomputed_modules"] = enable_selective(model, info)
    model._glmport_checkpointing = plan
    return plan


def plan_of(model) -> dict | None:
    """What :func:`apply_checkpointing` and :func:`compile_layers` did to ``model`` (for run_summary.json)."""
    return getattr(model, "_glmport_checkpointing", None)


def check_compile(backend, where: str | None = None, key: str = "glmport.compile") -> None:
    """Refuse ``glmport.compile: true`` (or ``--compile``: ``key``) where the backend cannot compile, before
    anything is loaded; ``where`` is the key's place in the config (file:line)."""
    support = backend.compile_support()
    if not support.available:
        raise ConfigError(f"{key}: torch.compile is not offered on backend {backend.name}", [
            Problem(where or key, f"backend {backend.name}: {support.reason}",
                    support.install_hint or f"leave {key} out")])


def transformer_layers(model) -> list[torch.nn.Module]:
    """The layer stack: the remote code's ``transformer.encoder.layers`` or a native ``model.layers``."""
    for name, module in _base(model).named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module):
            return list(module)
    return []


def compile_layers(model, backend, key: str = "glmport.compile") -> int:
    """``torch.compile`` each transformer layer in place; returns how many."""
    check_compile(backend, key=key)
    layers = transformer_layers(model)
    if not layers:
        raise ConfigError(f"{key}: no transformer layer stack found in this model", [
            Problem(key, "nothing to compile", f"leave {key} out")])
    for layer in layers:
        layer.compile()
    plan = plan_of(model) or {}
    model._glmport_checkpointing = dict(plan, compiled_layers=len(layers))
    return len(layers)
