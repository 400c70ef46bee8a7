"""Parameter names and config keys: ChatGLM remote code <-> transformers' native ``GlmForCausalLM``.

The two implementations compute the same function (pre-RMSNorm blocks, grouped-query attention with a
q/k/v bias and no output bias, SwiGLU, interleaved rotary embedding over the first half of each head);
only the names and two fusions differ. Remote code keeps q, k and v in one ``query_key_value`` matrix
(rows: all query heads, then the key groups, then the value groups) and the native class keeps three;
both keep the MLP's gate and up projections fused in one matrix, gate first.

One table serves both directions: :func:`native_to_remote` builds the tiny remote-code test models from a
tiny native one (:mod:`glmport.tiny.build`), :func:`remote_to_native` is ``glmport convert --to native``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from glmport.errors import ModelError, Problem

# native name -> remote name, outside the layers
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "transformer.embedding.word_embeddings.weight",
    "model.norm.weight": "transformer.encoder.final_layernorm.weight",
    "lm_head.weight": "transformer.output_layer.weight",
}
# inside layer N: native "model.layers.N." + key -> remote "transformer.encoder.layers.N." + value
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.dense.weight",
    "mlp.gate_up_proj.weight": "mlp.dense_h_to_4h.weight",  # gate first in both
    "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight",
}
FUSED_QKV = "self_attention.query_key_value"  # remote, split row-wise into the three below
SPLIT_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# buffers the remote checkpoints carry that the native model recomputes
DROPPED = ("transformer.rotary_pos_emb.inv_freq",)
PREFIX_ENCODER = "transformer.prefix_encoder."

NATIVE_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
REMOTE_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_REMOTE_TO_NATIVE = {remote: native for native, remote in LAYER_NAMES.items()}


@dataclass(frozen=True)
class AttentionShape:
    """Row counts of the fused query_key_value matrix: heads x head_dim, then 2 x kv_heads x head_dim."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def sizes(self) -> tuple[int, int, int]:
        kv = self.kv_heads * self.head_dim
        return self.heads * self.head_dim, kv, kv


def native_to_remote(state_dict: dict) -> dict:
    """A native ``GlmForCausalLM`` state dict under the remote-code names (q/k/v fused)."""
    import torch

    out, pending = {}, {}
    for name, tensor in state_dict.items():
        if name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[name]] = tensor
            continue
        match = NATIVE_LAYER.fullmatch(name)
        if not match:
            raise KeyError(f"{name}: not a GlmForCausalLM parameter")
        index, key = match.groups()
        prefix = f"transformer.encoder.layers.{index}."
        module, _, part = key.rpartition(".")
        if module in SPLIT_QKV:
            pending.setdefault((prefix, part), {})[module] = tensor
        elif key in LAYER_NAMES:
            out[prefix + LAYER_NAMES[key]] = tensor
        else:
            raise KeyError(f"{name}: no remote-code counterpart")
    for (prefix, part), parts in pending.items():
        out[f"{prefix}{FUSED_QKV}.{part}"] = torch.cat([parts[module] for module in SPLIT_QKV], dim=0)
    return out


def remote_to_native(name: str, tensor, shape: AttentionShape, source: str = "") -> dict:
    """The native parameter(s) of one remote-code tensor: ``{}`` for a dropped buffer. Raises ModelError
    for a name the native class has no place for."""
    if name in DROPPED:
        return {}
    for native, remote in GLOBAL_NAMES.items():
        if name == remote:
            return {native: tensor}
    match = REMOTE_LAYER.fullmatch(name)
    if match:
        index, key = match.groups()
        prefix = f"model.layers.{index}."
        if key in _REMOTE_TO_NATIVE:
            return {prefix + _REMOTE_TO_NATIVE[key]: tensor}
        module, _, part = key.rpartition(".")
        if module == FUSED_QKV:
            sizes = shape.sizes
            if tensor.shape[0] != sum(sizes):
                raise ModelError(f"{source or name}: {name} has {tensor.shape[0]} rows", [Problem(
                    name, f"expected {sum(sizes)} = ({shape.heads} heads + 2 x {shape.kv_heads} key/value groups) "
                          f"x {shape.head_dim}, from config.json",
                    "the weights do not belong to this config.json; put the config of the same model next to them")])
            pieces = tensor.split(list(sizes), dim=0)
            return {f"{prefix}{split}.{part}": piece.contiguous() for split, piece in zip(SPLIT_QKV, pieces)}
    if name.startswith(PREFIX_ENCODER):
        raise ModelError(f"{source or name}: holds a P-Tuning v2 prefix encoder ({name})", [Problem(
            name, "GlmForCausalLM has no prefix encoder: the prefix is ChatGLM3 remote code of its own",
            "convert the base model instead, and keep the P-Tuning result for the remote-code folder "
            "(glmport export RESULT OUT --merge writes one that loads with its prefix)")])
    raise ModelError(f"{source or name}: {name} has no counterpart in GlmForCausalLM", [Problem(
        name, "a parameter this converter does not know (a different architecture, or a modified model)",
        "glmport converts ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat checkpoints as published")])


def expected_native_names(num_layers: int, attention_bias: bool) -> set[str]:
    """Every parameter a GlmForCausalLM of ``num_layers`` layers has (to check that nothing is missing)."""
    names = set(GLOBAL_NAMES)
    for index in range(num_layers):
        prefix = f"model.layers.{index}."
        names.update(prefix + key for key in LAYER_NAMES)
        for module in SPLIT_QKV:
            names.add(f"{prefix}{module}.weight")
            if attention_bias:
                names.add(f"{prefix}{module}.bias")
    return names
