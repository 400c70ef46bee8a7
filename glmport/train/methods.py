"""LoRA, P-Tuning v2 and full SFT on a loaded GLM model.

Dtype policy: frozen base weights in the backend's best half precision (bf16, else fp16; fp32 on CPU);
every trainable parameter in fp32 (LoRA matrices, prefix encoders, and all weights for SFT). GLM-4 is
never put in fp16 silently (see :func:`glmport.modeling.resolve_dtype`).

P-Tuning v2:

* ChatGLM-6B/ChatGLM2/ChatGLM3 remote code has its own prefix encoder (``config.pre_seq_len``), whose key/value
  layout ``[seq, batch, kv_groups (ChatGLM-6B: heads), head_dim]`` peft's prefix tuning does not produce
  (zai-org/ChatGLM3#359);
  we use the model's own, as the upstream demo does, and train only ``transformer.prefix_encoder``.
* Everything else (GLM-4 remote code, native ``Glm``/``Glm4`` classes) uses peft ``PREFIX_TUNING`` with the key/value-head
  geometry filled in: ``num_attention_heads`` = key/value heads and ``token_dim`` = kv heads x head dim.
  peft's defaults use the query heads, which is wrong for these grouped-query models.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from peft import get_peft_config, get_peft_model

from glmport.errors import ConfigError

log = logging.getLogger("glmport")

# native: GlmAttention and Glm4Attention (GLM-4-0414) name their projections alike, as GLM-4's finetune.py targets them
LORA_TARGETS = {"native": ["q_proj", "k_proj", "v_proj"], "remote": ["query_key_value"]}



@contextlib.contextmanager
def quiet_peft():
    """peft asks transformers a deprecated question about checkpointing when it wraps a model; the
    warning is between the two libraries, and nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield

def uses_own_prefix_encoder(info, peft_config) -> bool:
    """ChatGLM-6B's, ChatGLM2-6B's and ChatGLM3-6B's remote code (their official P-Tuning v2 recipes) bring
    their own (ChatGLM-6B's, the one P-Tuning v2 was built for, with ``prefix_projection`` too)."""
    return (peft_config or {}).get("peft_type", "").upper() == "PREFIX_TUNING" and info.kind == "remote" \
        and info.family in ("chatglm", "chatglm2", "chatglm3")


def prefix_config_overrides(info, peft_config) -> dict:
    """Config changes needed before the model is built (ChatGLM3's own prefix encoder)."""
    if not uses_own_prefix_encoder(info, peft_config):
        return {}
    return {
        "pre_seq_len": int(peft_config.get("num_virtual_tokens", 128)),
        "prefix_projection": bool(peft_config.get("prefix_projection", False)),
        "use_cache": False,
    }


def _linear_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _geometry(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) from a native GlmConfig / Glm4Config or a remote ChatGLMConfig."""
    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    kv = getattr(config, "num_key_value_heads", None) or getattr(config, "multi_query_group_num", None)
    head_dim = getattr(config, "head_dim", None) or getattr(config, "kv_channels", None)
    return layers, kv, head_dim


def apply_method(model, info, method: str, peft_config: dict | None, backend=None, where: str = "peft_config"):
    """Wrap or freeze ``model`` for ``method``; returns the model to train."""
    if method == "sft":
        model.requires_grad_(True)
        model.float()  # fp32 master weights; half precision comes from autocast
        return model
    if method == "ptuning" and uses_own_prefix_encoder(info, peft_config):
        model.requires_grad_(False)
        encoder = model.transformer.prefix_encoder
        encoder.float().requires_grad_(True)
        return model

    settings = {k: v for k, v in peft_config.items()}
    settings.setdefault("task_type", "CAUSAL_LM")
    if method == "lora":
        targets = settings.get("target_modules") or LORA_TARGETS[info.kind]
        available = _linear_names(model)
        # a string is a regular expression for peft (matched against full module names): peft checks it
        missing = [] if isinstance(targets, str) else [t for t in targets if t not in available]
        if missing:
            raise ConfigError(
                f"{where}.target_modules: {missing} not found in this {info.kind} model; "
                f"its linear layers are: {', '.join(sorted(available))}"
            )
        settings["target_modules"] = targets
    else:
        layers, kv, head_dim = _geometry(model.config)
        settings.setdefault("num_layers", layers)
        settings.setdefault("num_attention_heads", kv)
        settings.setdefault("token_dim", kv * head_dim)
        if settings["token_dim"] != kv * head_dim or settings["num_attention_heads"] != kv:
            raise ConfigError(
                f"{where}: num_attention_heads {settings['num_attention_heads']} / token_dim {settings['token_dim']} "
                f"do not match this model's key/value heads ({kv} heads x {head_dim} = {kv * head_dim}); "
                "remove them and glmport fills them in"
            )
    with quiet_peft():
        peft_model = get_peft_model(model, get_peft_config(settings))
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if backend is not None:
        narrow_prompt_tokens(peft_model, backend)
    return peft_model


def narrow_prompt_tokens(peft_model, backend) -> None:
    """peft builds prompt-learning virtual-token ids with ``.long()``; narrow them once for the device."""
    if getattr(peft_model, "prompt_tokens", None):
        peft_model.prompt_tokens = {name: backend.coerce(ids, where=f"peft prompt_tokens[{name!r}]")
                                    for name, ids in peft_model.prompt_tokens.items()}


def enable_gradient_checkpointing(model, info) -> str:
    """Turn checkpointing on for real. The 2024 remote code's ``gradient_checkpointing_enable`` only
    validates its argument and never sets the flag (the compat patch fixes that); we check the flag after."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
    flags = [m.gradient_checkpointing for m in base.modules() if hasattr(m, "gradient_checkpointing")]
    if not any(flags):
        raise ConfigError(
            "gradient checkpointing (glmport.gradient_checkpointing: full, or training_args.gradient_checkpointing: "
            "true): the model did not turn it on "
            f"({info.kind} {info.family}); this is the silent no-op of the 2024 remote code, which the compat "
            "patch set should have fixed: run `glmport patch plan` on the folder"
        )
    return "on"


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
