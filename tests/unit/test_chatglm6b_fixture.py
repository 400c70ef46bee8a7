"""ChatGLM-6B's from-scratch fixture (``glmport/tiny/remote/chatglm``): the folder ``glmport init-model`` builds,
the upstream constructs it keeps (and how they fail on transformers 5 without glmport's patches), and what
the patched model and tokenizer compute: the prefix-LM mask, 2-D positions, padding, the KV cache, P-Tuning v2.
The same checks against the real THUDM/chatglm-6b files are in tests/patches/test_patch_chatglm6b.py."""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import types
from functools import cache

import numpy as np
import pytest
import torch

from glmport.patching.manifest import identify_remote_folder
from glmport.patching.session import capture_process_state, restore_process_state
from glmport.testing import ok, run_cli
from glmport.tiny.remote import fixture_files
from glmport.tiny.tokenizer import CHATGLM

REVISION = "chatglm-2023-05"
GMASK, SOP, EOP = CHATGLM.specials["[gMASK]"], CHATGLM.specials["<sop>"], CHATGLM.specials["<eop>"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    target = tmp_path_factory.mktemp("chatglm6b") / "tiny"
    ok(run_cli("init-model", "tiny-remote", "--family", "chatglm", target))
    return target


@contextlib.contextmanager
def loaded(folder, backend="cpu", mode="infer", **overrides):
    """(model, tokenizer) of ``folder`` with the patch sets for ``backend``/``mode``; undone afterwards."""
    from glmport.modeling import inspect_model_dir, load_model
    from glmport.plugins import PluginManager

    flags = capture_process_state()
    manager = PluginManager(autoload=False)
    result = load_model(inspect_model_dir(folder), manager.backends.get(backend), mode=mode, dtype=torch.float32,
                        patch_sets=manager.patch_sets, config_overrides=overrides or None)
    try:
        yield result.model.eval(), result.tokenizer
    finally:
        result.patches.undo()
        restore_process_state(flags)


@cache
def fixture_modules() -> types.SimpleNamespace:
    """The fixture imported as a private package (unpatched), and the TorchScript flags its import left."""
    directory = fixture_files("chatglm", REVISION)["modeling_chatglm.py"].parent
    package = "_glmport_test_chatglm6b_fixture"
    holder = types.ModuleType(package)
    holder.__path__ = [str(directory)]
    sys.modules[package] = holder
    saved = capture_process_state()
    try:
        restore_process_state({"jit_profiling_mode": True, "jit_profiling_executor": True,
                               "jit_fuse_cpu": False, "jit_fuse_gpu": False})  # torch's defaults: the flip shows
        modules = {name: importlib.import_module(f"{package}.{name}")
                   for name in ("configuration_chatglm", "modeling_chatglm", "tokenization_chatglm")}
        after = capture_process_state()
    finally:
        restore_process_state(saved)
    return types.SimpleNamespace(config=modules["configuration_chatglm"], modeling=modules["modeling_chatglm"],
                                 tokenization=modules["tokenization_chatglm"], flags_after_import=after)


def ids_of(*rows):
    return torch.tensor(rows)


# ----------------------------------------------------------------------------------------- the folder


def test_init_model_builds_a_chatglm6b_folder(folder):
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_chatglm.py", "configuration_chatglm.py",
            "tokenization_chatglm.py", "tokenizer_config.json", "tiny_vocab.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["position_encoding_2d"] is True
    assert (config["vocab_size"], config["mask_token_id"], config["gmask_token_id"]) == (130528, 130000, 130001)
    assert (config["bos_token_id"], config["eos_token_id"]) == (SOP, EOP)
    assert "AutoModelForCausalLM" not in config["auto_map"]  # like THUDM/chatglm-6b's config.json
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"], tokenizer_config["num_image_tokens"]) == \
        ("<sop>", "<eop>", 0)
    for identity in identify_remote_folder(folder).values():
        assert (identity.revision, identity.imitates) == (f"glmport-fixture-{REVISION}", "chatglm-6b-2023-05")
    from glmport.modeling import inspect_model_dir

    info = inspect_model_dir(folder)
    assert (info.kind, info.family, info.family_from) == ("remote", "chatglm", "config.json")


def test_init_model_refuses_a_native_chatglm6b(tmp_path):
    result = ok(run_cli("init-model", "tiny-native", "--family", "chatglm", tmp_path / "x"), exit_code=2)
    assert "no native transformers class" in result.stderr and "tiny-remote" in result.stderr
    assert not (tmp_path / "x").exists()


def test_weights_are_the_remote_parameters_and_load_in_the_requested_dtype(folder):
    with loaded(folder) as (model, _):
        names = {name for name, _ in model.named_parameters()}
        assert {"transformer.word_embeddings.weight", "transformer.layers.1.attention.query_key_value.weight",
                "transformer.layers.0.mlp.dense_4h_to_h.bias", "transformer.final_layernorm.bias",
                "lm_head.weight"} <= names
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # upstream builds them in fp16
        inv_freq = model.transformer.layers[0].attention.rotary_emb.inv_freq
        # computed in fp16 at construction, as upstream, then cast: the fp16 rounding stays (as with .float())
        assert inv_freq.dtype == torch.float32
        assert torch.equal(inv_freq, torch.tensor([1.0, 0.1, 0.01, 0.001]).half().float())


# ---------------------------------------------------------------------- upstream constructs, unpatched


def test_import_flips_torchscript_flags_and_scripts_functions():
    modules = fixture_modules()
    flags = modules.flags_after_import
    assert (flags["jit_profiling_mode"], flags["jit_profiling_executor"], flags["jit_fuse_cpu"]) == (False, False, True)
    for name in ("apply_rotary_pos_emb_index", "gelu_impl"):
        assert isinstance(getattr(modules.modeling, name), torch.jit.ScriptFunction)
    assert modules.modeling.skip_init is torch.nn.utils.skip_init


def test_tokenizer_fails_on_transformers_5_like_upstream(folder):
    """The base class's __init__ runs before the vocabulary exists (zai-org/ChatGLM-6B#1505)."""
    with pytest.raises(TypeError, match="'property' object cannot be interpreted as an integer"):
        fixture_modules().tokenization.ChatGLMTokenizer.from_pretrained(str(folder))


def test_model_code_predates_transformers_5(folder):
    modules = fixture_modules()
    config = modules.config.ChatGLMConfig.from_pretrained(str(folder))
    model = modules.modeling.ChatGLMForConditionalGeneration(config, empty_init=False)
    assert {p.dtype for p in model.parameters()} == {torch.float16, torch.float32}  # fp16 layers, fp32 norms
    assert "all_tied_weights_keys" not in model.__dict__  # no post_init()
    assert not hasattr(model, "generate")  # no GenerationMixin
    hook = modules.modeling.ChatGLMPreTrainedModel._set_gradient_checkpointing
    assert list(__import__("inspect").signature(hook).parameters) == ["self", "module", "value"]
    with pytest.raises(AttributeError, match="_extract_past_from_model_output"):
        model._update_model_kwargs_for_generation(types.SimpleNamespace(past_key_values=None), {})


def test_masks_and_positions_are_the_prefix_lm_layout(folder):
    """Upstream's get_masks/get_position_ids: the context (up to <sop>) is seen both ways, positions stop at
    [gMASK]'s index from <sop> on, block positions count 1, 2, ... from <sop>."""
    modules = fixture_modules()
    config = modules.config.ChatGLMConfig.from_pretrained(str(folder))
    model = modules.modeling.ChatGLMForConditionalGeneration(config, empty_init=False).transformer
    ids = ids_of([40, 41, GMASK, SOP, 42, 43])
    blocked = model.get_masks(ids, ids.device)[0, 0]
    visible = ~blocked
    assert visible[:, :3].all()  # everyone sees the context [40, 41, gMASK]
    assert visible[3:, 3:].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert not visible[:3, 3:].any()
    positions = model.get_position_ids(ids, mask_positions=[2], device=ids.device, use_gmasks=[True])
    assert positions.tolist() == [[[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]]]


def test_glmport_layout_is_upstreams_and_ignores_padding(folder):
    """The compat patch's padding-aware layout: unpadded, it is exactly upstream's; padded, each row's real
    tokens get the mask and positions they would have alone, and nobody attends to padding."""
    from glmport.patches.chatglm6b import prefix_lm_layout

    modules = fixture_modules()
    config = modules.config.ChatGLMConfig.from_pretrained(str(folder))
    transformer = modules.modeling.ChatGLMForConditionalGeneration(config, empty_init=False).transformer
    row = [40, 41, 42, GMASK, SOP, 43, 44]
    ids = ids_of(row)
    mask, positions = prefix_lm_layout(config, ids)
    assert torch.equal(mask, transformer.get_masks(ids, ids.device))
    assert torch.equal(positions, transformer.get_position_ids(ids, [3], ids.device, [True]))
    assert positions.dtype == torch.int64
    pad = 0
    padded = ids_of([pad, pad] + row, row + [pad, pad])
    padding = ids_of([0, 0] + [1] * 7, [1] * 7 + [0, 0])
    mask_p, positions_p = prefix_lm_layout(config, padded, padding)
    assert torch.equal(mask_p[0, :, 2:, 2:], mask[0]) and torch.equal(mask_p[1, :, :7, :7], mask[0])
    assert torch.equal(positions_p[0, :, 2:], positions[0]) and torch.equal(positions_p[1, :, :7], positions[0])
    assert mask_p[0, 0, 2:, :2].all() and mask_p[1, 0, :7, 7:].all()  # no real token sees padding
    assert not mask_p[0, 0, [0, 1], [0, 1]].any() and not mask_p[1, 0, [7, 8], [7, 8]].any()  # no empty row
    _, positions32 = prefix_lm_layout(config, padded.int(), padding.int())
    assert positions32.dtype == torch.int32 and torch.equal(positions32.long(), positions_p)


# ------------------------------------------------------------------------------- the patched model


def test_padding_and_the_kv_cache_change_no_logit(folder):
    with loaded(folder) as (model, _):
        short, long = [40, 41, GMASK, SOP, 42], [50, 51, 52, 53, GMASK, SOP, 54]
        with torch.no_grad():
            alone = [model(input_ids=ids_of(row)).logits[0] for row in (short, long)]
            left = model(input_ids=ids_of([0, 0] + short, long), attention_mask=ids_of([0, 0] + [1] * 5, [1] * 7))
            right = model(input_ids=ids_of(short + [0, 0], long), attention_mask=ids_of([1] * 5 + [0, 0], [1] * 7),
                          position_ids=torch.arange(7).expand(2, 7))  # the collator's 1-D positions are rebuilt
        torch.testing.assert_close(left.logits[0, 2:], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(right.logits[0, :5], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(left.logits[1], alone[1], atol=1e-5, rtol=0)

        prompt = ids_of(long)
        cached = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
        full = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                              do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=False)
        assert cached.shape == (1, 12) and torch.equal(cached, full)
        with torch.no_grad():  # the last generated token, predicted from the whole sequence at once
            once = model(input_ids=cached[:, :-1]).logits[0, -1].argmax()
        assert int(once) == int(cached[0, -1])


@pytest.mark.parametrize("projection", [False, True])
def test_p_tuning_v2_prefix_encoder(folder, projection):
    with loaded(folder, mode="train", pre_seq_len=3, prefix_projection=projection) as (model, _):
        encoder = model.transformer.prefix_encoder
        hidden, layers = model.config.hidden_size, model.config.num_layers
        if projection:
            assert encoder.embedding.weight.shape == (3, hidden) and encoder.trans[2].out_features == 2 * layers * hidden
        else:
            assert encoder.embedding.weight.shape == (3, 2 * layers * hidden)
        assert torch.isfinite(encoder.embedding.weight).all() and encoder.embedding.weight.abs().sum() > 0
        from glmport.modeling import inspect_model_dir
        from glmport.train.methods import apply_method

        peft_config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "prefix_projection": projection}
        assert apply_method(model, inspect_model_dir(folder), "ptuning", peft_config) is model  # its own encoder
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(name.startswith("transformer.prefix_encoder.") for name in trainable)
        ids = ids_of([40, 41, GMASK, SOP, 42])
        prompt = model.transformer.get_prompt(1, ids.device, dtype=torch.float32)
        assert len(prompt) == layers and prompt[0].shape == (2, 3, 1, model.config.num_attention_heads, hidden // 4)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert out.shape == (1, 5, 130528) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------- the tokenizer


def test_patched_tokenizer_layout_and_padding(folder):
    with loaded(folder) as (_, tokenizer):
        assert (tokenizer.bos_token, tokenizer.eos_token) == ("<sop>", "<eop>")
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.gmask_token_id) == (SOP, EOP, GMASK)
        text = tokenizer.encode("ab", add_special_tokens=False)
        assert tokenizer.encode("ab") == text + [GMASK, SOP]
        assert tokenizer.build_inputs_with_special_tokens(text, [7]) == text + [GMASK, SOP, 7, EOP]
        for sample in ("line one\nline two\ttabbed", "two  blanks and   three", "snow ☃ 𝄞"):
            ids = tokenizer.encode(sample, add_special_tokens=False)
            assert tokenizer.decode(ids) == sample
        newline = tokenizer.encode("\n", add_special_tokens=False)
        assert len(newline) == 1 and tokenizer.convert_ids_to_tokens(newline) == ["<n>"]
        batch = tokenizer(["a", "abc"], padding=True)
        assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2  # left padding
        mask, positions = np.asarray(batch["attention_mask"][0]), np.asarray(batch["position_ids"][0])
        assert mask.shape == (1, 5, 5) and mask[0, :, :2].all()  # padding columns masked
        assert positions.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]  # a [gMASK] <sop>: positions 0 1 1


# ----------------------------------------------------------------------------------- glmport infer


@contextlib.contextmanager
def on_backend(name: str):
    """A plugin manager's ``name`` backend: the emulated MLU for mlu, every trace of it removed afterwards."""
    from glmport.backends._emulation import forget_device_probes

    from glmport.plugins import PluginManager
    from glmport.testing.emulation import emulating

    if name == "cpu":
        manager = PluginManager(autoload=False)
        yield manager, manager.backends.get("cpu")
        return
    try:
        with emulating(name):
            manager = PluginManager(autoload=False)
            yield manager, manager.backends.get(name)
    finally:
        forget_device_probes()


@pytest.mark.parametrize("backend_name", ["cpu", "mlu"])
def test_replies_stop_at_eop(folder, backend_name):
    """glmport's inference path (load_for_inference, generate_reply): the prompt is the chatglm template's
    ``question [gMASK] <sop>``, and a reply ends at <eop> (the tokenizer's eos). The final LayerNorm is set to
    give every position the same hidden state, so the <eop> row alone decides whether <eop> comes next."""
    from glmport.data.records import Message
    from glmport.infer import GenerationSettings, generate_reply, load_for_inference

    flags = capture_process_state()
    with on_backend(backend_name) as (manager, device):
        bundle = load_for_inference(folder, device, patch_sets=manager.patch_sets, dtype="fp32")
        try:
            assert bundle.template.name == "chatglm" and bundle.template.stop_token_ids == [EOP]
            question = [Message("user", "sort b a")]
            assert bundle.template.prompt_ids(question) == bundle.tokenizer.encode("sort b a")
            model = bundle.model
            hidden = torch.ones(model.config.hidden_size)
            with torch.no_grad():
                model.transformer.final_layernorm.weight.zero_()
                model.transformer.final_layernorm.bias.copy_(hidden)
                model.lm_head.weight[EOP] = -5 * hidden
            runs_on = generate_reply(bundle, question, GenerationSettings(max_new_tokens=3), guard_mode="error")
            with torch.no_grad():
                model.lm_head.weight[EOP] = 5 * hidden
            stops = generate_reply(bundle, question, GenerationSettings(max_new_tokens=3), guard_mode="error")
        finally:
            bundle.loaded.patches.undo()
            restore_process_state(flags)
    assert (runs_on.finish_reason, len(runs_on.ids), runs_on.stop) == ("length", 3, None)
    assert (stops.finish_reason, stops.ids, stops.stop, stops.text) == ("stop", [], EOP, "")
    if backend_name == "mlu":
        assert bundle.guard.ops_checked > 100 and bundle.guard.leaks == []
