"""Tiny ChatGLM-6B (THUDM/chatglm-6b) model folders: config, seeded random weights, fixture code and tokenizer.

The other tiny families take their weights from a native ``GlmForCausalLM``; no transformers class computes
ChatGLM-6B (2-D rotary positions, the GLM-130B block), so its weights are drawn here, under the parameter
names and shapes of the remote code (``transformer.layers.N.attention.query_key_value``, ...):

* LayerNorms start at weight 1, bias 0; every bias at 0; the other matrices at N(0, 0.02), the word
  embeddings at N(0, 1) (the first layer normalizes them anyway);
* the output layer has the prior a pretrained model has learned, that ids the tokenizer never produces do
  not occur: the final LayerNorm's bias leans every hidden state along one direction and their rows point
  the other way (logit about -10), while rows of real tokens are N(0, 0.125). Without it 130k unused ids
  share the probability mass and no adapter can lift a real token above them (see
  :func:`glmport.tiny.build.native_model`, which solves the same problem for the other families).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FAMILY = "chatglm"
# What the fixture tokenizer appends after its vocabulary, in id order: the 8 ChatGLM-6B special pieces,
# <n>, <|tab|>, <|blank_2|> ... <|blank_80|>, and <pad> (glmport/tiny/remote/chatglm/tokenization_chatglm.py).
SPECIAL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
WHITESPACE_PIECES = 2 + 79
APPENDED_PIECES = len(SPECIAL_PIECES) + WHITESPACE_PIECES + 1


def pad_id(layout) -> int:
    return layout.first_special + APPENDED_PIECES - 1


def used_ids(layout, seed_text: str = "") -> list[int]:
    """Every id the fixture tokenizer produces: the named vocabulary and everything appended after it."""
    from glmport.tiny.tokenizer import base_vocabulary

    named = [i for token, i in base_vocabulary(layout, seed_text).items()
             if not token.startswith("<unused_") and i < layout.first_special]
    return sorted(named) + list(range(layout.first_special, layout.first_special + APPENDED_PIECES))


def remote_config(shape, layout, revision: str) -> dict:
    """config.json in the layout of THUDM/chatglm-6b's (its auto_map has no AutoModelForCausalLM either)."""
    specials = layout.specials
    return {
        "_name_or_path": f"glmport/tiny-remote-{revision}",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "bos_token_id": specials["<sop>"],
        "eos_token_id": specials["<eop>"],
        "mask_token_id": specials["[MASK]"],
        "gmask_token_id": specials["[gMASK]"],
        "pad_token_id": pad_id(layout),
        "hidden_size": shape.hidden_size,
        "inner_hidden_size": shape.ffn_hidden_size,
        "layernorm_epsilon": 1e-5,
        "max_sequence_length": shape.seq_length,
        "model_type": "chatglm",
        "num_attention_heads": shape.num_attention_heads,
        "num_layers": shape.num_layers,
        "position_encoding_2d": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": layout.padded_vocab_size,
    }


def state_dict(shape, layout, seed: int, seed_text: str = "") -> dict:
    """Seeded random weights under the remote-code names (see the module docstring)."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def normal(*size, std):
        return torch.randn(*size, generator=generator) * std

    hidden, inner, vocab = shape.hidden_size, shape.ffn_hidden_size, layout.padded_vocab_size
    head_dim = hidden // shape.num_attention_heads
    rotary = head_dim // 2  # each half of a head rotates on its own
    out = {"transformer.word_embeddings.weight": normal(vocab, hidden, std=1.0)}
    for layer in range(shape.num_layers):
        prefix = f"transformer.layers.{layer}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{prefix}{norm}.weight"] = torch.ones(hidden)
            out[f"{prefix}{norm}.bias"] = torch.zeros(hidden)
        # checkpoints carry the rotary frequencies (in fp16), although the model ignores them when loading
        out[f"{prefix}attention.rotary_emb.inv_freq"] = (
            1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))).half()
        for name, rows, cols in (("attention.query_key_value", 3 * hidden, hidden), ("attention.dense", hidden, hidden),
                                 ("mlp.dense_h_to_4h", inner, hidden), ("mlp.dense_4h_to_h", hidden, inner)):
            out[f"{prefix}{name}.weight"] = normal(rows, cols, std=0.02)
            out[f"{prefix}{name}.bias"] = torch.zeros(rows)
    # The prior: the final LayerNorm's bias leans every hidden state along one direction, and the rows of
    # ids the tokenizer never produces point the other way, so they start at a logit near -10.
    lean = normal(hidden, std=1.0)
    lean = lean / lean.norm()
    out["transformer.final_layernorm.weight"] = torch.ones(hidden)
    out["transformer.final_layernorm.bias"] = 4.0 * lean
    head = -2.5 * lean.expand(vocab, hidden).clone()
    real = used_ids(layout, seed_text)
    head[real] = normal(len(real), hidden, std=0.125)
    out["lm_head.weight"] = head
    return {name: tensor.contiguous() for name, tensor in out.items()}


def build(target: Path, layout, shape, *, revision: str, seed: int = 0, seed_text: str = "") -> None:
    """Write a tiny ChatGLM-6B folder into ``target`` (an empty staging folder)."""
    from safetensors.torch import save_file

    from glmport.tiny.remote import fixture_files, write_remote_tokenizer

    save_file(state_dict(shape, layout, seed, seed_text), str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(remote_config(shape, layout, revision), indent=2) + "\n")
    for name, source in fixture_files(FAMILY, revision).items():
        shutil.copyfile(source, target / name)
    write_remote_tokenizer(target, layout, seed_text)
