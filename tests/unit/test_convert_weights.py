"""glmport convert's weight and config mapping, what it refuses, and the patches written out as plain code."""

from __future__ import annotations

import pytest
import torch

from glmport.convert.native import check_convertible, native_config, rope_parameters
from glmport.convert.standalone import module_source, redirect_auto_map
from glmport.convert.weights import (
    AttentionShape,
    expected_native_names,
    native_to_remote,
    remote_to_native,
)
from glmport.errors import ModelError, PatchError


@pytest.fixture(scope="module")
def native():
    from glmport.tiny.build import TinyShape, native_model
    from glmport.tiny.tokenizer import LAYOUTS

    return native_model(TinyShape(num_layers=2), LAYOUTS["chatglm3"], seed=3)


def test_remote_names_and_back_give_the_very_same_tensors(native):
    config = native.config
    shape = AttentionShape(config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    remote = native_to_remote(native.state_dict())
    assert "transformer.encoder.layers.1.self_attention.query_key_value.weight" in remote
    assert remote["transformer.encoder.layers.0.self_attention.query_key_value.bias"].shape[0] == \
        (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    back = {}
    for name, tensor in remote.items():
        back.update(remote_to_native(name, tensor, shape))
    original = native.state_dict()
    assert set(back) == set(original) == expected_native_names(config.num_hidden_layers, True)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    assert remote_to_native("transformer.rotary_pos_emb.inv_freq", torch.ones(4), shape) == {}


def test_a_fused_matrix_of_another_shape_names_the_tensor_and_the_config():
    shape = AttentionShape(heads=4, kv_heads=2, head_dim=16)
    with pytest.raises(ModelError, match="has 100 rows") as caught:
        remote_to_native("transformer.encoder.layers.0.self_attention.query_key_value.weight", torch.zeros(100, 8),
                         shape, source="model.safetensors")
    assert "(4 heads + 2 x 2 key/value groups) x 16" in str(caught.value)


def test_a_prefix_encoder_or_an_unknown_tensor_is_refused_with_the_reason():
    shape = AttentionShape(4, 2, 16)
    with pytest.raises(ModelError, match="P-Tuning v2 prefix encoder") as caught:
        remote_to_native("transformer.prefix_encoder.embedding.weight", torch.zeros(2, 2), shape)
    assert "glmport export RESULT OUT --merge" in str(caught.value)
    with pytest.raises(ModelError, match="no counterpart in GlmForCausalLM"):
        remote_to_native("transformer.encoder.layers.0.mlp.extra.weight", torch.zeros(2, 2), shape)


# --- rope ---------------------------------------------------------------------------------------------------------

BASE_SCALED = "        base = base * self.rope_ratio\n"
POSITIONS_SCALED = "        seq_idx = torch.arange(seq_len, dtype=dtype, device=device) / self.rope_ratio\n"


def test_rope_theta_is_10000_times_rope_ratio_when_the_code_scales_the_base():
    rope, note = rope_parameters({"rope_ratio": 500}, BASE_SCALED)
    assert rope == {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5}
    assert "10000 x rope_ratio 500" in note
    assert rope_parameters({"rope_ratio": 50}, BASE_SCALED)[0]["rope_theta"] == 500_000.0  # chatglm3-6b-32k


def test_rope_ratio_that_divides_positions_is_linear_scaling():
    """ChatGLM2-6B-32K interpolates positions (seq_idx / rope_ratio): transformers' linear scaling."""
    rope, note = rope_parameters({"rope_ratio": 16}, POSITIONS_SCALED)
    assert rope == {"rope_type": "linear", "factor": 16.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert "divides the positions" in note


def test_linear_scaling_is_chatglm2s_divided_positions():
    """transformers' linear rope at position p is the default rope at p / factor: ChatGLM2-32K's seq_idx / rope_ratio."""
    from transformers import GlmConfig
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=1,
                 intermediate_size=32, vocab_size=100, pad_token_id=0)
    linear = GlmConfig(**shape, rope_parameters=rope_parameters({"rope_ratio": 16}, POSITIONS_SCALED)[0])
    default = GlmConfig(**shape, rope_parameters=rope_parameters({}, "")[0])
    x, positions = torch.zeros(1, 6, 16), torch.arange(0, 96, 16).unsqueeze(0)
    cos, sin = GlmRotaryEmbedding(linear)(x, positions)
    cos_divided, sin_divided = GlmRotaryEmbedding(default)(x, positions.float() / 16)
    assert torch.allclose(cos, cos_divided, atol=1e-6) and torch.allclose(sin, sin_divided, atol=1e-6)


def test_no_rope_ratio_or_code_that_ignores_it_keeps_10000():
    assert rope_parameters({}, BASE_SCALED)[0]["rope_theta"] == 10000.0
    rope, note = rope_parameters({"rope_ratio": 50}, "class RotaryEmbedding: pass\n")
    assert rope["rope_theta"] == 10000.0 and "never reads it" in note
    with pytest.raises(ModelError, match="cannot tell how this model applies rope_ratio"):
        rope_parameters({"rope_ratio": 50}, "self.rope_ratio = rope_ratio\nbase = base ** self.rope_ratio\n")


def test_native_config_maps_every_key(native):
    from glmport.tiny.build import TinyShape, remote_config
    from glmport.tiny.tokenizer import LAYOUTS

    remote = remote_config(TinyShape(rope_ratio=500.0), LAYOUTS["glm4"], "glm4-2024-07")
    template = type("Template", (), {"pad_token_id": 151329, "stop_token_ids": [151329, 151336, 151338]})()
    config, _ = native_config(remote, template=template, modeling_text=BASE_SCALED, dtype_name="bfloat16")
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (151552, 64, 128)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == \
        (2, 4, 2, 16)
    assert config.max_position_embeddings == 1024 and config.rms_norm_eps == 1e-5 and config.attention_bias
    assert config.rope_parameters["rope_theta"] == 5_000_000.0
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.eos_token_id == [151329, 151336, 151338] and config.pad_token_id == 151329
    assert config.architectures == ["GlmForCausalLM"] and str(config.dtype).endswith("bfloat16")


# --- what the native class cannot express -------------------------------------------------------------------------

CHATGLM3 = {"model_type": "chatglm", "padded_vocab_size": 65024, "rmsnorm": True, "post_layer_norm": True,
            "add_bias_linear": False, "apply_residual_connection_post_layernorm": False}


@pytest.mark.parametrize("change, message", [
    ({"position_encoding_2d": True, "padded_vocab_size": 130528}, "2D position ids"),
    ({"model_type": "glm"}, "native transformers folder already"),
    ({"rmsnorm": False}, "RMSNorm"),
    ({"add_bias_linear": True}, "no bias"),
    ({"pre_seq_len": 128}, "P-Tuning v2 prefix encoder"),
    ({"model_type": "llama"}, "not a ChatGLM remote-code model"),
])
def test_what_glm_cannot_compute_is_refused_with_the_reason(tmp_path, change, message):
    with pytest.raises(ModelError, match=message) as caught:
        check_convertible(tmp_path, {**CHATGLM3, **change})
    assert str(tmp_path / "config.json") in str(caught.value)


def test_chatglm6b_refusal_says_why_and_what_to_do_instead(tmp_path):
    with pytest.raises(ModelError) as caught:
        check_convertible(tmp_path, {"model_type": "chatglm", "vocab_size": 130528, "position_encoding_2d": True})
    text = str(caught.value)
    assert "ChatGLM-6B" in text and "prefix-LM" in text and "keep using the remote-code folder" in text
    check_convertible(tmp_path, CHATGLM3)  # ChatGLM2 / ChatGLM3 / GLM-4 configs pass


# --- patches written out as plain code ------------------------------------------------------------------------------

def _compat_patches(family="chatglm3"):
    from glmport.patches import compat

    return compat.patches(family)


def test_the_compat_patches_become_a_module_that_never_imports_glmport():
    import ast

    patches = [p for p in _compat_patches() if not p.revisions]
    exported = {}
    auto_map = redirect_auto_map({"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                                  "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                                  "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}, exported)
    assert auto_map["AutoModel"] == "glmport_compat.ChatGLMForConditionalGeneration"
    assert exported == {"configuration_chatglm.py": ["ChatGLMConfig"],
                        "modeling_chatglm.py": ["ChatGLMForConditionalGeneration"]}
    assert redirect_auto_map(["tokenization_chatglm.ChatGLMTokenizer", None], exported) == \
        ["glmport_compat.ChatGLMTokenizer", None]
    text = module_source(patches, "chatglm3", {"modeling": "chatglm3-6b-2024-06"}, "a test", exported)
    tree = ast.parse(text)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "glmport" not in imported
    relative = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1]
    assert relative == ["configuration_chatglm", "modeling_chatglm", "tokenization_chatglm"]
    body = text[: text.index("from .configuration_chatglm")]  # all but the imports of the folder's own code
    namespace = {}
    exec(compile(body, "glmport_compat.py", "exec"), namespace)
    assert [name for _, name in namespace["PATCHES"]["modeling"]] == \
        [p.apply.__name__ for p in patches if p.file == "modeling"]
    assert namespace["TOKENIZER_CLASS"]["chatglm3"] == "ChatGLMTokenizer"  # a constant the patches read


def test_a_patch_that_calls_into_glmport_cannot_be_written_out():
    from glmport.patching import Patch

    def uses_glmport(ctx):
        from glmport.errors import ModelError  # noqa: F401

    patch = Patch("needs-glmport", family="chatglm3", file="modeling", replaces=(), why="test", apply=uses_glmport)
    with pytest.raises(PatchError, match="needs-glmport .* imports glmport"):
        module_source([patch], "chatglm3", {}, "a test", {})
