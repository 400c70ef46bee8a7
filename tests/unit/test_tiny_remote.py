"""glmport's from-scratch remote-code fixtures (glmport.tiny.remote).

The fixtures stand in for the ChatGLM3-6B / GLM-4-9B-chat remote code in tests, so they must (a) compute
the same function as the native tiny GlmForCausalLM from the same weights and (b) fail on transformers 5
exactly where the upstream files fail, so that the compat patches are exercised. Transformers 5 cannot
build the unpatched code through from_pretrained, so most tests import the fixture modules directly.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import sys
import types
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from glmport.tiny.build import TinyShape, native_model, remote_config, remote_state_dict
from glmport.tiny.remote import (
    FIXTURE_REVISIONS,
    FixtureSourceError,
    fixture_files,
    imitated_revision,
    render_source,
    rendered_sources,
    source_dir,
    write_remote_tokenizer,
)
from glmport.tiny.tokenizer import LAYOUTS, build_fast_tokenizer

# ChatGLM-6B's fixture (no native counterpart, 2-D positions) is tested in test_chatglm6b_fixture.py
ALL = [(family, revision) for family, revisions in FIXTURE_REVISIONS.items() for revision in revisions
       if family != "chatglm"]
ALL_IDS = [revision for _, revision in ALL]
# The ChatGLM3 revisions share their numerics; code paths that do not differ run on the newest only.
NEWEST = [(family, revisions[-1]) for family, revisions in FIXTURE_REVISIONS.items() if family != "chatglm"]
NEWEST_IDS = [revision for _, revision in NEWEST]
# ChatGLM2's tokenizer (no role tokens, build_prompt) and chat() are tested in test_chatglm2_fixture.py
WITH_ROLES = [(family, revision) for family, revision in ALL if family != "chatglm2"]
NEWEST_WITH_ROLES = [(family, revision) for family, revision in NEWEST if family != "chatglm2"]
SHAPE = TinyShape(seq_length=64)
GLM4_SHAPE = TinyShape(seq_length=64, rope_ratio=3.0)  # a ratio != 1 checks that rope_ratio reaches the base
SEED_TEXT = "你好世界，训练模型"
TEXTS = ["Hello, world!", "line one\nline two\ttabbed", "你好世界 and 训练", "snow ☃ clef 𝄞 €", ""]


def shape_of(family: str) -> TinyShape:
    return GLM4_SHAPE if family == "glm4" else SHAPE


# ------------------------------------------------------------------------------------------- helpers

# the TorchScript flags importing remote code flips: captured and restored by the patch engine's own code
from glmport.patching.session import capture_process_state as jit_state  # noqa: E402
from glmport.patching.session import restore_process_state as set_jit_state  # noqa: E402


class jit_flags_restored:
    """Whatever happens inside (importing remote code flips TorchScript globals), restore them afterwards."""

    def __enter__(self):
        self.saved = jit_state()
        return self

    def __exit__(self, *exc):
        set_jit_state(self.saved)
        return False


@cache
def fixture_modules(family: str, revision: str) -> types.SimpleNamespace:
    """Import a fixture revision as a private package; record what the import did to the jit flags."""
    folder = fixture_files(family, revision)["modeling_chatglm.py"].parent
    package = "_glmport_test_fixture_" + revision.replace("-", "_")
    holder = types.ModuleType(package)
    holder.__path__ = [str(folder)]
    sys.modules[package] = holder
    with jit_flags_restored():
        set_jit_state({"jit_profiling_mode": True, "jit_profiling_executor": True,  # torch's defaults, so
                       "jit_fuse_cpu": False, "jit_fuse_gpu": False})              # that the flip is observable
        modules = {name: importlib.import_module(f"{package}.{name}")
                   for name in ("configuration_chatglm", "modeling_chatglm", "tokenization_chatglm")}
        after_import = jit_state()
    return types.SimpleNamespace(config=modules["configuration_chatglm"], modeling=modules["modeling_chatglm"],
                                 tokenization=modules["tokenization_chatglm"], jit_after_import=after_import)


@cache
def native(family: str):
    return native_model(shape_of(family), LAYOUTS[family], seed=0)


def make_config(family: str, revision: str, **overrides):
    config = fixture_modules(family, revision).config.ChatGLMConfig(
        **{**remote_config(shape_of(family), LAYOUTS[family], revision), **overrides})
    # What the compat patch restores: transformers 5 drops both from every config.
    config.max_length = shape_of(family).seq_length
    config.use_cache = True
    return config


def remote_model(family: str, revision: str, **overrides):
    config = make_config(family, revision, **overrides)
    model = fixture_modules(family, revision).modeling.ChatGLMForConditionalGeneration(config, empty_init=False)
    missing, unexpected = model.load_state_dict(remote_state_dict(native(family)), strict=False)
    # Only a P-Tuning prefix encoder (not part of the checkpoint) may stay as initialised.
    assert not unexpected and all(".prefix_encoder." in key for key in missing), (missing, unexpected)
    return model.eval()


@cache
def shared_model(family: str, revision: str):
    """One remote model per revision for the tests that only run it (eval mode, never modified)."""
    return remote_model(family, revision)


def batch(seed: int = 0, rows: int = 2, length: int = 9):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (rows, length), generator=generator)


@cache
def tokenizer_dir(family: str, tmp_root: str):
    from pathlib import Path

    folder = Path(tmp_root) / f"tok-{family}"
    folder.mkdir()
    write_remote_tokenizer(folder, LAYOUTS[family], SEED_TEXT)
    return folder


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny-remote-tokenizers"))

    def load(family: str, revision: str):
        module = fixture_modules(family, revision).tokenization
        cls = module.ChatGLM4Tokenizer if family == "glm4" else module.ChatGLMTokenizer
        return cls.from_pretrained(str(tokenizer_dir(family, root)))

    return load


# ------------------------------------------------------------------------------- fixture revisions

def test_fixture_api_and_deterministic_files():
    assert FIXTURE_REVISIONS == {"chatglm3": ["chatglm3-2023-12", "chatglm3-2024-06"], "glm4": ["glm4-2024-07"],
                                 "chatglm2": ["chatglm2-2023-07", "chatglm2-2023-10"], "chatglm": ["chatglm-2023-05"]}
    assert imitated_revision("chatglm3-2023-12") == "chatglm3-6b-2023-12"
    assert imitated_revision("chatglm3-2024-06") == "chatglm3-6b-2024-06"
    assert imitated_revision("glm4-2024-07") == "glm-4-9b-chat-2024-07"
    for family, revision in ALL:
        first = fixture_files(family, revision)
        assert sorted(first) == ["configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"]
        contents = {name: path.read_bytes() for name, path in first.items()}
        second = fixture_files(family, revision)
        assert second == first
        assert {name: path.read_bytes() for name, path in second.items()} == contents
        for text in contents.values():
            assert not any(line.startswith(("#?", "#|")) for line in text.decode().splitlines())
    with pytest.raises(KeyError):
        fixture_files("chatglm3", "glm4-2024-07")
    # The two ChatGLM3 revisions share configuration, differ in modeling and tokenizer.
    old, new = (fixture_files("chatglm3", rev) for rev in FIXTURE_REVISIONS["chatglm3"])
    assert old["configuration_chatglm.py"].read_bytes() == new["configuration_chatglm.py"].read_bytes()
    assert old["modeling_chatglm.py"].read_bytes() != new["modeling_chatglm.py"].read_bytes()
    assert old["tokenization_chatglm.py"].read_bytes() != new["tokenization_chatglm.py"].read_bytes()


def _methods(text: str, class_name: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(text)
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    return {node.name: node for node in cls.body if isinstance(node, ast.FunctionDef)}


def _checkpoint_keywords(text: str) -> set[str]:
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.utils.checkpoint.checkpoint":
            return {kw.arg for kw in node.keywords}
    raise AssertionError("no torch.utils.checkpoint.checkpoint call")


def test_chatglm3_revisions_differ_in_the_upstream_constructs():
    old, new = (rendered_sources("chatglm3", rev) for rev in FIXTURE_REVISIONS["chatglm3"])
    old_pre, new_pre = (_methods(r["modeling_chatglm.py"], "ChatGLMPreTrainedModel") for r in (old, new))
    assert "_set_gradient_checkpointing" in old_pre and "gradient_checkpointing_enable" not in old_pre
    assert "gradient_checkpointing_enable" in new_pre and "_set_gradient_checkpointing" not in new_pre
    assert "set_input_embeddings" not in _methods(old["modeling_chatglm.py"], "ChatGLMModel")
    assert "set_input_embeddings" in _methods(new["modeling_chatglm.py"], "ChatGLMModel")
    assert _checkpoint_keywords(old["modeling_chatglm.py"]) == set()
    assert _checkpoint_keywords(new["modeling_chatglm.py"]) == {"use_reentrant"}
    old_tok, new_tok = (vars(fixture_modules("chatglm3", rev).tokenization.ChatGLMTokenizer)
                        for rev in FIXTURE_REVISIONS["chatglm3"])
    for name in ("eos_token", "pad_token", "unk_token"):
        assert isinstance(old_tok[name], property) and old_tok[name].fset is None
        assert isinstance(new_tok[name], property) and new_tok[name].fset is not None
    assert "unk_token_id" not in old_tok and isinstance(new_tok["unk_token_id"], property)
    assert not hasattr(fixture_modules("chatglm3", "chatglm3-2023-12").tokenization, "logger")


def test_render_keeps_the_live_source_for_the_default_revision():
    revisions = FIXTURE_REVISIONS["chatglm3"] + FIXTURE_REVISIONS["chatglm2"]  # ChatGLM2 renders chatglm3's model code
    for name in ("modeling_chatglm.py", "tokenization_chatglm.py"):
        source = (source_dir("chatglm3") / name).read_text(encoding="utf-8")
        live = "".join(line for line in source.splitlines(keepends=True) if not line.startswith(("#?", "#|")))
        assert render_source(source, "chatglm3-2024-06", revisions) == live


@pytest.mark.parametrize("source, message", [
    ("#? chatglm3-2099-01\n#|x = 1\n#? end\n", "unknown revisions"),
    ("#? chatglm3-2023-12\n#|x = 1\n", "never closed"),
    ("#? chatglm3-2023-12\nx = 1\n#? end\n", "start with '#|'"),
    ("#|x = 1\n", "outside a revision block"),
    ("#? chatglm3-2023-12\n#? chatglm3-2023-12\n#? end\n", "do not nest"),
    ("#? end\n", "without an open block"),
    ("#? chatglm3-2023-12\n#|x = (\n#? end\n", "does not compile"),
    ("  #? chatglm3-2023-12\n", "column 1"),
])
def test_render_rejects_malformed_sources(source, message):
    with pytest.raises(FixtureSourceError, match=message):
        render_source(source, "chatglm3-2023-12", FIXTURE_REVISIONS["chatglm3"])


def test_render_selects_branches():
    source = "a = 0\n#? chatglm3-2023-12\n#|    b = 1\n#|\n#? else\nb = 2\n#? end\nc = 3\n"
    known = FIXTURE_REVISIONS["chatglm3"]
    assert render_source(source.replace("#|    b", "#|b"), "chatglm3-2023-12", known) == "a = 0\nb = 1\n\nc = 3\n"
    assert render_source(source, "chatglm3-2024-06", known) == "a = 0\nb = 2\nc = 3\n"


# ----------------------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("family, revision", ALL, ids=ALL_IDS)
def test_logits_match_native(family, revision):
    model, reference = shared_model(family, revision), native(family)
    ids = batch()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = reference(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation, class_name", [("eager", "CoreAttention"), ("sdpa", "SdpaAttention")])
def test_glm4_attention_classes_match_native(implementation, class_name):
    model = remote_model("glm4", "glm4-2024-07", attn_implementation=implementation)
    core = model.transformer.encoder.layers[0].self_attention.core_attention
    assert type(core).__name__ == class_name
    modeling = fixture_modules("glm4", "glm4-2024-07").modeling
    assert set(modeling.CORE_ATTENTION_CLASSES) == {"eager", "sdpa", "flash_attention_2"}
    ids = batch(1)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = native("glm4")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=0)


def test_chatglm3_torch1_attention_path_matches_native(monkeypatch):
    # CoreAttention picks SDPA by torch's major version; the explicit matmul path runs on "torch 1".
    model = shared_model("chatglm3", "chatglm3-2024-06")
    ids = batch(2)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    monkeypatch.setattr(torch, "__version__", "1.13.1")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        padded = model(input_ids=ids, attention_mask=mask).logits
    reference = native("chatglm3")
    with torch.no_grad():
        torch.testing.assert_close(plain, reference(input_ids=ids).logits, atol=1e-5, rtol=0)
        expected = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(padded[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, revision", NEWEST, ids=NEWEST_IDS)
def test_loss_matches_reference(family, revision):
    model = shared_model(family, revision)
    ids = batch(3)
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        expected = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        native_loss = native(family)(input_ids=ids, labels=labels).loss
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, native_loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, revision", NEWEST, ids=NEWEST_IDS)
def test_kv_cache_decoding_matches_full_forward(family, revision):
    model = shared_model(family, revision)
    ids = batch(4, length=8)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        prompt = model(input_ids=ids[:, :6], use_cache=True)
        cache = prompt.past_key_values
        seq_dim = 2 if family == "glm4" else 0  # ChatGLM2/3: sequence first
        assert isinstance(cache, tuple) and len(cache) == SHAPE.num_layers
        assert all(isinstance(layer, tuple) and len(layer) == 2 for layer in cache)
        assert cache[0][0].shape[seq_dim] == 6
        for step in (6, 7):
            out = model(input_ids=ids[:, step:step + 1], position_ids=torch.full((2, 1), step),
                        past_key_values=cache, use_cache=True, return_last_logit=True)
            torch.testing.assert_close(out.logits[:, -1], full[:, step], atol=1e-5, rtol=0)
            cache = out.past_key_values
        assert cache[0][0].shape[seq_dim] == 8
        reordered = type(model)._reorder_cache(cache, torch.tensor([1, 0]))
        batch_dim = 0 if family == "glm4" else 1
        torch.testing.assert_close(reordered[0][0].select(batch_dim, 0), cache[0][0].select(batch_dim, 1))


def test_chatglm3_prefix_encoder():
    for projection in (False, True):
        model = remote_model("chatglm3", "chatglm3-2024-06", pre_seq_len=3, prefix_projection=projection)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(name.startswith("transformer.prefix_encoder.") for name in trainable)
        prompt = model.transformer.get_prompt(2, torch.device("cpu"), dtype=torch.float32)
        assert len(prompt) == SHAPE.num_layers
        assert prompt[0].shape == (2, 3, 2, SHAPE.kv_groups, SHAPE.head_dim)
        ids = batch(5)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert logits.shape == (2, ids.shape[1], LAYOUTS["chatglm3"].padded_vocab_size)
        assert torch.isfinite(logits).all()


# --------------------------------------------------------------------- upstream failure modes kept

@pytest.mark.parametrize("family, revision", ALL, ids=ALL_IDS)
def test_import_flips_torchscript_flags(family, revision):
    modules = fixture_modules(family, revision)
    flags = modules.jit_after_import
    assert (flags["jit_profiling_mode"], flags["jit_profiling_executor"], flags["jit_fuse_cpu"]) == (False, False, True)
    assert isinstance(modules.modeling.apply_rotary_pos_emb, torch.jit.ScriptFunction)
    assert modules.modeling.skip_init is torch.nn.utils.skip_init


@pytest.mark.parametrize("family, revision", ALL, ids=ALL_IDS)
def test_unpatched_build_reads_max_length_and_use_cache(family, revision):
    modules = fixture_modules(family, revision)
    config = modules.config.ChatGLMConfig(**remote_config(shape_of(family), LAYOUTS[family], revision))
    assert not hasattr(config, "use_cache") and not hasattr(config, "max_length")  # dropped by transformers 5
    with pytest.raises(AttributeError, match="'ChatGLMConfig' object has no attribute 'max_length'"):
        modules.modeling.ChatGLMForConditionalGeneration(config, empty_init=False)
    config.max_length = 64
    model = modules.modeling.ChatGLMForConditionalGeneration(config, empty_init=False)
    with pytest.raises(AttributeError, match="use_cache"):
        model(input_ids=batch())


@pytest.mark.parametrize("family, revision", ALL, ids=ALL_IDS)
def test_generation_hooks_predate_transformers_5(family, revision):
    model = shared_model(family, revision)
    assert not hasattr(model, "generate")  # no GenerationMixin, like upstream
    ids = batch()
    with torch.no_grad():
        outputs = model(input_ids=ids, use_cache=True)
    kwargs = {"attention_mask": torch.ones_like(ids), "position_ids": model.get_position_ids(ids, ids.device)}
    with pytest.raises(AttributeError, match="_extract_past_from_model_output"):
        model._update_model_kwargs_for_generation(outputs, kwargs)
    prepared = model.prepare_inputs_for_generation(ids, past_key_values=outputs.past_key_values,
                                                   is_first_forward=False)
    assert prepared["input_ids"].shape == (2, 1) and prepared["return_last_logit"] is True
    assert prepared["position_ids"].tolist() == [[ids.shape[1] - 1]] * 2


def test_gradient_checkpointing_hooks_per_revision():
    old = fixture_modules("chatglm3", "chatglm3-2023-12").modeling.ChatGLMPreTrainedModel
    assert "_set_gradient_checkpointing" in vars(old) and "gradient_checkpointing_enable" not in vars(old)
    for family, revision in [("chatglm3", "chatglm3-2024-06"), ("glm4", "glm4-2024-07")]:
        model = remote_model(family, revision)
        assert "gradient_checkpointing_enable" in vars(type(model).__mro__[1])
        model.gradient_checkpointing_enable()
        assert model.transformer.encoder.gradient_checkpointing is False
        with pytest.raises(TypeError, match="every_n_layers"):
            model.gradient_checkpointing_enable(every_n_layers=1)


def test_chatglm3_2023_old_checkpointing_hook_still_works():
    model = remote_model("chatglm3", "chatglm3-2023-12")
    model.gradient_checkpointing_enable()
    assert model.transformer.encoder.gradient_checkpointing is True
    model.train()
    ids = batch(6)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert model.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight.grad is not None


@pytest.mark.parametrize("family, revision", [("chatglm3", "chatglm3-2023-12"), ("glm4", "glm4-2024-07")])
def test_auto_classes_fail_like_upstream(tmp_path, family, revision):
    """Through transformers' own loaders: the same errors as the upstream files on transformers 5."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from glmport.tiny import build_tiny_model

    folder = build_tiny_model("tiny-remote", tmp_path / f"remote-{revision}", family=family, revision=revision,
                              seq_length=64)
    with jit_flags_restored():
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        with pytest.raises(AttributeError, match="no attribute 'max_length'"):
            AutoModelForCausalLM.from_config(config, trust_remote_code=True)
        with pytest.raises(AttributeError, match="no attribute 'max_length'"):
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        with pytest.raises(TypeError, match="_pad\\(\\) got an unexpected keyword argument 'padding_side'"):
            tokenizer("hello")
        remote_class = get_class_from_dynamic_module("modeling_chatglm.ChatGLMForConditionalGeneration", str(folder))

    class WithMaxLength(remote_class):
        def __init__(self, config, *args, **kwargs):
            config.max_length, config.use_cache = config.seq_length, True
            super().__init__(config, *args, **kwargs)

    # Next on the ladder: the remote classes never call post_init(), which transformers 5 loading needs.
    with pytest.raises(AttributeError, match="all_tied_weights_keys"):
        WithMaxLength.from_pretrained(folder)

    class Compatible(WithMaxLength):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            self.post_init()

    model = Compatible.from_pretrained(folder).eval()
    from glmport.tiny.build import native_model as build_native_model
    from glmport.tiny.build import used_token_ids

    reference = build_native_model(TinyShape(seq_length=64), LAYOUTS[family], 0, used_token_ids(LAYOUTS[family], ""))
    ids = batch(7)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_default_skip_init_model_takes_checkpoint_weights():
    # empty_init=True (the default) leaves parameters uninitialised until the checkpoint arrives.
    config = make_config("chatglm3", "chatglm3-2024-06")
    model = fixture_modules("chatglm3", "chatglm3-2024-06").modeling.ChatGLMForConditionalGeneration(config)
    model.load_state_dict(remote_state_dict(native("chatglm3")), strict=True)
    ids = batch(8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, native("chatglm3")(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def _with_generation_fixes(base):
    """The model with the fixes the compat patch set makes for generation (emulated by subclassing)."""
    from transformers import GenerationMixin

    class Compatible(base, GenerationMixin):
        @classmethod
        def _supports_default_dynamic_cache(cls):
            return False  # keep the legacy tuple cache the remote code understands

        def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, **kwargs):
            model_kwargs["past_key_values"] = outputs.past_key_values
            mask = model_kwargs.get("attention_mask")
            if mask is not None:
                model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            if "position_ids" in model_kwargs:
                positions = model_kwargs["position_ids"]
                model_kwargs["position_ids"] = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
            model_kwargs["is_first_forward"] = False
            return model_kwargs

    return Compatible


def _with_tokenizer_fixes(base):
    from transformers.utils import PaddingStrategy

    class Compatible(base):
        def _pad(self, encoded_inputs, max_length=None, padding_strategy=PaddingStrategy.DO_NOT_PAD,
                 pad_to_multiple_of=None, padding_side=None, return_attention_mask=None):
            return super()._pad(encoded_inputs, max_length, padding_strategy, pad_to_multiple_of, return_attention_mask)

        def batch_encode_plus(self, *args, **kwargs):
            return self(*args, **kwargs)

    return Compatible


@pytest.mark.parametrize("family, revision", NEWEST_WITH_ROLES, ids=[r for _, r in NEWEST_WITH_ROLES])
def test_generation_works_once_the_compat_fixes_are_in(tmp_path, family, revision):
    modules = fixture_modules(family, revision)
    config = make_config(family, revision)
    model = _with_generation_fixes(modules.modeling.ChatGLMForConditionalGeneration)(config, empty_init=False)
    del config.max_length  # the patched read falls back to seq_length; generate() rejects it on the config
    model.load_state_dict(remote_state_dict(native(family)), strict=True)
    model.eval()
    prompt = batch(9, rows=1, length=5)
    generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                               do_sample=False)
    greedy = prompt
    with torch.no_grad():
        for _ in range(3):
            step = model(input_ids=greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, step], dim=-1)
    assert generated.tolist() == greedy.tolist()

    write_remote_tokenizer(tmp_path, LAYOUTS[family])
    tokenizer_class = modules.tokenization.ChatGLM4Tokenizer if family == "glm4" else modules.tokenization.ChatGLMTokenizer
    tokenizer = _with_tokenizer_fixes(tokenizer_class).from_pretrained(str(tmp_path))
    encoded = tokenizer(["hi", "hello there"], padding=True, return_tensors="pt")
    assert encoded["attention_mask"][0].tolist() == [0] * 9 + [1] * 4  # [gMASK] sop h i, left padded
    assert encoded["position_ids"][0].tolist() == [0] * 9 + [0, 1, 2, 3]
    assert model.generate(**encoded, max_new_tokens=2, do_sample=False).shape == (2, 15)
    reply, history = model.chat(tokenizer, "hello", history=[{"role": "system", "content": "be brief"}],
                                max_length=None, max_new_tokens=2, do_sample=False)
    assert isinstance(reply, str) and [turn["role"] for turn in history] == ["system", "user", "assistant"]


# ---------------------------------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("family, revision", WITH_ROLES, ids=[r for _, r in WITH_ROLES])
def test_tokenizer_ids_match_native(tokenizers, family, revision):
    tokenizer = tokenizers(family, revision)
    reference = build_fast_tokenizer(LAYOUTS[family], SEED_TEXT)
    for text in TEXTS:
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(ids) == text
    for token, token_id in LAYOUTS[family].specials.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        if family == "chatglm3":
            assert tokenizer.get_command(token) == token_id
    prefix = [LAYOUTS[family].specials["[gMASK]"], LAYOUTS[family].specials["sop" if family == "chatglm3" else "<sop>"]]
    assert tokenizer.build_inputs_with_special_tokens([7, 8]) == prefix + [7, 8]
    user = LAYOUTS[family].specials["<|user|>"]
    expected = [user] + reference.encode("meta\n", add_special_tokens=False) + reference.encode("你好", add_special_tokens=False)
    assert tokenizer.build_single_message("user", "meta", "你好") == expected


@pytest.mark.parametrize("family, revision", WITH_ROLES, ids=[r for _, r in WITH_ROLES])
def test_tokenizer_pad_predates_padding_side(tokenizers, family, revision):
    from transformers.utils import PaddingStrategy

    tokenizer = tokenizers(family, revision)
    assert "padding_side" not in inspect.signature(type(tokenizer)._pad).parameters
    assert type(tokenizer).model_input_names == ["input_ids", "attention_mask", "position_ids"]
    with pytest.raises(TypeError, match="_pad\\(\\) got an unexpected keyword argument 'padding_side'"):
        tokenizer("hello")
    # The method itself works when called the old way: left padding, position ids.
    padded = tokenizer._pad({"input_ids": [11, 12]}, max_length=4, padding_strategy=PaddingStrategy.MAX_LENGTH)
    pad_id = LAYOUTS[family].specials.get("<|endoftext|>", 0)
    assert padded == {"input_ids": [pad_id, pad_id, 11, 12], "attention_mask": [0, 0, 1, 1],
                      "position_ids": [0, 0, 0, 1]}
    tokenizer.padding_side = "right"
    try:
        with pytest.raises(AssertionError):
            tokenizer._pad({"input_ids": [1]}, max_length=2, padding_strategy=PaddingStrategy.MAX_LENGTH)
    finally:
        tokenizer.padding_side = "left"


@pytest.mark.parametrize("revision", FIXTURE_REVISIONS["chatglm3"])
def test_chatglm3_tokenizer_special_token_properties(tokenizers, revision, caplog):
    tokenizer = tokenizers("chatglm3", revision)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<unk>", 0)
    assert tokenizer.unk_token_id == (None if revision == "chatglm3-2023-12" else 0)
    tokenizer.eos_token = "<|user|>"  # transformers 5 swallows the assignment in both revisions
    assert tokenizer.eos_token == "</s>"
    prop = vars(type(tokenizer))["eos_token"]
    assert (prop.fset is None) == (revision == "chatglm3-2023-12")
    with pytest.raises(AttributeError, match="batch_encode_plus"):
        tokenizer.build_chat_input("hi", history=[{"role": "system", "content": "be brief"}])


def test_glm4_chat_template(tokenizers):
    tokenizer = tokenizers("glm4", "glm4-2024-07")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"city": "string"}}}
    messages = [
        {"role": "system", "content": "", "tools": [tool]},
        {"role": "user", "content": "天气?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
        {"role": "observation", "content": ""},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tools_json = json.dumps(tool["function"], ensure_ascii=False, indent=4)
    assert text.startswith("[gMASK]<sop><|system|>\n")
    assert f"\n\n## get_weather\n\n{tools_json}" in text
    assert text.endswith('<|user|>\n天气?<|assistant|>get_weather\n{"city": "北京"}<|assistant|>')
    assert "<|observation|>" not in text  # empty content renders nothing
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "[gMASK]<sop><|user|>\nhi"
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(plain))
    assert ids == tokenizer.get_prefix_tokens() + tokenizer.build_single_message("user", "", "hi")
    with pytest.raises(TypeError, match="padding_side"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)


def test_written_tokenizer_files(tmp_path):
    for family, class_name in (("chatglm3", "ChatGLMTokenizer"), ("glm4", "ChatGLM4Tokenizer")):
        folder = tmp_path / family
        folder.mkdir()
        write_remote_tokenizer(folder, LAYOUTS[family])
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert config["auto_map"] == {"AutoTokenizer": [f"tokenization_chatglm.{class_name}", None]}
        assert config["tokenizer_class"] == class_name and config["padding_side"] == "left"
        vocab = json.loads((folder / "tiny_vocab.json").read_text(encoding="utf-8"))
        assert vocab["size"] == LAYOUTS[family].first_special
        assert vocab["pieces"][:3] == ["<unk>", "<s>", "</s>"]
        if family == "glm4":
            decoder = {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()}
            assert decoder == {v: k for k, v in LAYOUTS["glm4"].specials.items()}
            assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
            assert "chat_template" in config
        else:
            assert "added_tokens_decoder" not in config and "chat_template" not in config


def test_process_response_parses_tool_calls_without_executing_them():
    chatglm3 = shared_model("chatglm3", "chatglm3-2024-06")
    history = [{"role": "system", "content": "", "tools": [{"name": "f"}]}]
    reply, new_history = chatglm3.process_response("f\n```python\ntool_call(city='北京', days=2)\n```", history)
    assert reply == {"name": "f", "parameters": {"city": "北京", "days": 2}}
    assert new_history[-1]["metadata"] == "f" and len(history) == 1
    with pytest.raises(ValueError):
        chatglm3.process_response("f\n```\n__import__('os').getcwd()\n```", history)
    assert chatglm3.process_response(" \n hello ", [])[0] == "hello"
    glm4 = shared_model("glm4", "glm4-2024-07")
    assert glm4.process_response('f\n{"city": "北京"}', history)[0] == {"name": "f", "parameters": {"city": "北京"}}
