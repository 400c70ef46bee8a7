"""Builders behind :func:`glmport.tiny.build_tiny_model`."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from glmport.tiny.tokenizer import LAYOUTS, SpecialLayout, build_fast_tokenizer, save_fast_tokenizer

REMOTE_SOURCE = Path(__file__).resolve().parent / "remote"


@dataclass(frozen=True)
class TinyShape:
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    kv_groups: int = 2
    seq_length: int = 1024
    rope_ratio: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _layout(family: str) -> SpecialLayout:
    if family not in LAYOUTS:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(LAYOUTS)}")
    return LAYOUTS[family]


SENTENCEPIECE_FAMILIES = ("chatglm2", "chatglm3")  # <unk> 0 pads, <s> 1 and </s> 2 of the piece model


def _chat_eos_ids(layout: SpecialLayout) -> list[int]:
    """Generation stops at eos and at the role tokens that end an assistant turn (ChatGLM2 has none)."""
    eos = 2 if layout.family in SENTENCEPIECE_FAMILIES else layout.specials["<|endoftext|>"]
    return [eos] + [layout.specials[role] for role in ("<|user|>", "<|observation|>") if role in layout.specials]


NATIVE_ARCHS = ("glm", "glm4")  # config.json model_type: GlmForCausalLM, Glm4ForCausalLM (GLM-4-0414)


def native_model(shape: TinyShape, layout: SpecialLayout, seed: int, used_ids: list[int] | None = None,
                 arch: str = "glm"):
    """A random GlmForCausalLM (``arch`` glm) or Glm4ForCausalLM (``arch`` glm4: GLM-4-0414's layers, with the
    extra post-attention and post-MLP norms) with a learnable output layer.

    A random output layer over ChatGLM's 65k ids cannot be fine-tuned into anything: tens of thousands
    of unused ids share the probability mass with the few hundred the tokenizer really produces, and the
    final RMSNorm caps the hidden state so no adapter can lift a real token above them. A pretrained model
    has learned that unused ids never occur; the tiny model gets that prior at init: rows of unused ids
    start at zero, rows of real tokens at N(0, 0.125), and the final norm at 4 so logits have range.
    """
    import torch
    from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    if arch not in NATIVE_ARCHS:
        raise ValueError(f"unknown native architecture {arch!r}; choose one of {', '.join(NATIVE_ARCHS)}")
    config_cls, model_cls = (GlmConfig, GlmForCausalLM) if arch == "glm" else (Glm4Config, Glm4ForCausalLM)
    config = config_cls(
        vocab_size=layout.padded_vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.kv_groups,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.seq_length,
        rms_norm_eps=1e-5,
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=0 if layout.family in SENTENCEPIECE_FAMILIES else layout.specials["<|endoftext|>"],
        eos_token_id=_chat_eos_ids(layout),
        bos_token_id=1 if layout.family in SENTENCEPIECE_FAMILIES else None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * shape.rope_ratio,
                         "partial_rotary_factor": 0.5},
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
        if used_ids is not None:
            generator = torch.Generator().manual_seed(seed + 1)
            head = torch.zeros_like(model.lm_head.weight)
            head[used_ids] = torch.randn(len(used_ids), head.shape[1], generator=generator) * 0.125
            model.lm_head.weight.copy_(head)
            model.model.norm.weight.fill_(4.0)
    return model.eval()


def used_token_ids(layout: SpecialLayout, seed_text: str) -> list[int]:
    from glmport.tiny.tokenizer import base_vocabulary

    return [i for token, i in base_vocabulary(layout, seed_text).items() if not token.startswith("<unused_")]


def build_native(target: Path, *, family: str = "chatglm3", arch: str = "glm", seed: int = 0, seed_text: str = "",
                 **shape) -> None:
    """``arch`` glm4 (GLM-4-0414) needs the glm4 family: those models ship GLM-4's tokenizer, with a
    ``chat_template`` in tokenizer_config.json, which the tiny folder gets too."""
    layout = _layout(family)
    if family == "chatglm":
        raise ValueError("ChatGLM-6B has no native transformers class (its 2-D positions and GLM-130B block): "
                         "build it with tiny-remote")
    if arch == "glm4" and family != "glm4":
        raise ValueError(f"architecture glm4 (GLM-4-0414) uses the glm4 tokenizer layout, not {family}")
    model = native_model(TinyShape(**shape), layout, seed, used_token_ids(layout, seed_text), arch)
    # the generation config names the same special ids as the tokenizer, so transformers has nothing to
    # align (and no warning to print) when the model is loaded for training or generation
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.generation_config.eos_token_id = _chat_eos_ids(layout)
    model.save_pretrained(str(target))
    if arch == "glm4":
        from glmport.tiny.remote import GLM4_CHAT_TEMPLATE

        tokenizer = build_fast_tokenizer(layout, seed_text)
        tokenizer.chat_template = GLM4_CHAT_TEMPLATE  # saved into tokenizer_config.json / chat_template.jinja
        tokenizer.save_pretrained(str(target))
        _write_marker(target, "tiny-native", family, seed, arch=arch)
    else:
        save_fast_tokenizer(target, layout, seed_text)
        _write_marker(target, "tiny-native", family, seed)


def remote_state_dict(native) -> dict:
    """The tiny-native weights under the remote-code parameter names (fused query_key_value and
    dense_h_to_4h, as the ChatGLM checkpoints store them)."""
    import torch

    from glmport.convert.weights import native_to_remote  # the one name table, shared with glmport convert

    out = native_to_remote(native.state_dict())
    rot = native.config.head_dim // 2
    out["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (
        10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    )
    return {k: v.contiguous().clone() for k, v in out.items()}


def remote_config(shape: TinyShape, layout: SpecialLayout, revision: str) -> dict:
    config = {
        "_name_or_path": f"glmport/tiny-remote-{revision}",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": shape.ffn_hidden_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": shape.hidden_size,
        "kv_channels": shape.head_dim,
        "layernorm_epsilon": 1e-5,
        "multi_query_attention": True,
        "multi_query_group_num": shape.kv_groups,
        "num_attention_heads": shape.num_attention_heads,
        "num_layers": shape.num_layers,
        "original_rope": True,
        "padded_vocab_size": layout.padded_vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": shape.seq_length,
        "use_cache": True,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "eos_token_id": _chat_eos_ids(layout)[0],
        "pad_token_id": 0 if layout.family in SENTENCEPIECE_FAMILIES else layout.specials["<|endoftext|>"],
    }
    if layout.family == "glm4":
        config["rope_ratio"] = shape.rope_ratio
    return config


def build_remote(target: Path, *, family: str = "chatglm3", revision: str | None = None, seed: int = 0,
                 seed_text: str = "", **shape_options) -> None:
    from safetensors.torch import save_file

    from glmport.tiny.remote import FIXTURE_REVISIONS, fixture_files

    layout = _layout(family)
    revision = revision or FIXTURE_REVISIONS[family][-1]
    shape = TinyShape(**shape_options)
    if family == "chatglm":  # ChatGLM-6B: weights of its own (no native class computes it)
        from glmport.tiny import chatglm6b

        chatglm6b.build(target, layout, shape, revision=revision, seed=seed, seed_text=seed_text)
        _write_marker(target, "tiny-remote", family, seed, revision=revision)
        return
    native = native_model(shape, layout, seed, used_token_ids(layout, seed_text))
    save_file(remote_state_dict(native), str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(remote_config(shape, layout, revision), indent=2) + "\n")
    for name, source in fixture_files(family, revision).items():
        shutil.copyfile(source, target / name)
    from glmport.tiny.remote import write_remote_tokenizer

    write_remote_tokenizer(target, layout, seed_text)
    _write_marker(target, "tiny-remote", family, seed, revision=revision)


def _write_marker(target: Path, kind: str, family: str, seed: int, **extra) -> None:
    info = {"kind": kind, "family": family, "seed": seed, "built_by": "glmport init-model", **extra}
    (target / "glmport_tiny.json").write_text(json.dumps(info, indent=2) + "\n")
