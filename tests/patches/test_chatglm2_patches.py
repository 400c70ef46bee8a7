"""ChatGLM2-6B under the patch sets: its revisions in the manifest, the patches only ChatGLM2 needs (golden),
and, when ``GLMPORT_UPSTREAM_DIR`` holds the real files with the real ``tokenizer.model``, the real tokenizer
through the compat set and glmport's template against ChatGLM2's own recipe.

ChatGLM2 also runs every parametrized test of this directory (plans, apply/undo, numerics against the native
model, the 64-bit guard, overlays) as the fixture revisions ``chatglm2-2023-07`` / ``chatglm2-2023-10`` and the
``upstream-chatglm2-6b-*`` folders.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from patchkit import (
    build_upstream_folder,
    fixture_sources,
    manager,
    model_info,
    native_reference,
    patched_model,
    source_params,
    token_batch,
)

from glmport.data.records import Conversation, Message
from glmport.data.templates import detect_family, get_template
from glmport.patching import PatchSet
from glmport.patching.manifest import load_manifest
from glmport.patching.registry import PatchRegistry
from glmport.patching.session import patch_session

REVISIONS = ["chatglm2-6b-2023-07", "chatglm2-6b-2023-09", "chatglm2-6b-2023-10"]
SOURCES = {s.name: s for s in fixture_sources()}
ALL_CHATGLM2 = source_params(families=("chatglm2",))
# The configuration_chatglm.py ChatGLM3-6B ships unchanged; ChatGLM2-6B has had it since Sep 2023.
SHARED_CONFIGURATION = "351ba435758670b27c160b7657c7ab1d32053c4e8c0606a5a9b8f9908249dec8"


def test_chatglm2_revisions_in_the_manifest():
    manifest = load_manifest()
    chatglm2 = sorted(name for name, meta in manifest["revisions"].items() if meta["family"] == "chatglm2")
    assert chatglm2 == REVISIONS
    listed = {name: sorted({e["revision"] for e in entries.values() if e["revision"] in REVISIONS})
              for name, entries in manifest["files"].items()}
    assert listed == {"modeling_chatglm.py": REVISIONS,
                      "configuration_chatglm.py": ["chatglm2-6b-2023-07", "chatglm2-6b-2023-09"],
                      "tokenization_chatglm.py": ["chatglm2-6b-2023-07", "chatglm2-6b-2023-10"]}
    for name, entries in manifest["files"].items():
        for entry in entries.values():
            if entry["revision"] in REVISIONS:  # an HF-history clone, at a full commit
                assert re.fullmatch(rf"chatJeffrey/GLM2-6B@[0-9a-f]{{40}}:{name}", entry["source"]), entry
    assert manifest["files"]["configuration_chatglm.py"][SHARED_CONFIGURATION]["revision"] == "chatglm2-6b-2023-09"


def _registry_without(patch_id: str) -> PatchRegistry:
    """The builtin sets for ChatGLM2 with one patch left out."""
    from glmport.patches import builtin_patch_sets

    registry = PatchRegistry()
    for patch_set in builtin_patch_sets():
        kept = [p for p in patch_set.patches if not (p.family == "chatglm2" and p.id == patch_id)]
        registry.add(PatchSet(patch_set.name, patch_set.description, kept))
    return registry


def _fp32_rotary_table(model, positions: int) -> torch.Tensor:
    """The rotary table computed in fp32 from the model's geometry: half of each head rotates, in pairs."""
    n_elem = model.config.kv_channels // 2
    inverse = 1.0 / (10000 ** (torch.arange(0, n_elem, 2, dtype=torch.float32) / n_elem))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inverse)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


@pytest.mark.parametrize("source", ALL_CHATGLM2)
def test_rotary_angles_are_computed_in_fp32_in_a_bf16_model(source, model_dir):
    """Golden: the patched bf16 table is the fp32 table stored in bf16; unpatched, position 257 is position 256."""
    folder = model_dir(source)
    with patched_model(folder, "cpu", "infer", dtype=torch.bfloat16) as (model, session):
        assert "compat-rotary-fp32" in {e.patch.id for e in session.plan.to_apply}
        table = model.transformer.rotary_pos_emb(300)
        golden = _fp32_rotary_table(model, 300).to(torch.bfloat16)
        assert table.dtype == torch.bfloat16 and torch.equal(table, golden)
    with patched_model(folder, "cpu", "infer", dtype=torch.bfloat16,
                       registry=_registry_without("compat-rotary-fp32")) as (model, session):
        assert "compat-rotary-fp32" not in {e.patch.id for e in session.plan.to_apply}
        unpatched = model.transformer.rotary_pos_emb(300)
        assert torch.equal(unpatched[257], unpatched[256]) and not torch.equal(golden[257], golden[256])
    with patched_model(folder, "cpu", "infer") as (model, _):  # fp32: the same numbers with or without it
        assert torch.equal(model.transformer.rotary_pos_emb(300), _fp32_rotary_table(model, 300))


@pytest.mark.parametrize("source", ALL_CHATGLM2)
def test_generation_without_a_cache_sees_the_whole_sequence(source, model_dir):
    """P-Tuning v2 builds the model with use_cache off; generation must still feed the whole sequence."""
    ids = token_batch("chatglm2", rows=1, length=6, seed=3)
    expected = native_reference("chatglm2").generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                     max_new_tokens=3, do_sample=False, use_cache=False)
    with patched_model(model_dir(source), "cpu", "infer", config_overrides={"use_cache": False}) as (model, session):
        applied = "compat-generation-use-cache" in {e.patch.id for e in session.plan.to_apply}
        assert applied == (source.imitated != "chatglm2-6b-2023-10")  # fixed upstream in Oct 2023
        prepared = model.prepare_inputs_for_generation(ids, past_key_values=None, is_first_forward=False,
                                                       use_cache=False)
        assert prepared["input_ids"].shape == ids.shape and prepared["use_cache"] is False
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                       do_sample=False, use_cache=False)
    assert generated.tolist() == expected.tolist()


def test_without_the_patch_the_old_revision_generates_from_one_token(model_dir):
    folder = model_dir(SOURCES["chatglm2-2023-07"])
    ids = token_batch("chatglm2", rows=1, length=6, seed=3)
    with patched_model(folder, "cpu", "infer", config_overrides={"use_cache": False},
                       registry=_registry_without("compat-generation-use-cache")) as (model, _):
        prepared = model.prepare_inputs_for_generation(ids, past_key_values=None, is_first_forward=False)
    assert prepared["input_ids"].tolist() == ids[:, -1:].tolist()


def test_the_jul_2023_tokenizer_loads_once_patched(model_dir):
    folder = model_dir(SOURCES["chatglm2-2023-07"])
    plugins = manager()
    session = patch_session(model_info(folder), plugins.backends.get("cpu"), "infer", registry=plugins.patch_sets)
    try:
        assert "compat-tokenizer-init" in {e.patch.id for e in session.plan.to_apply}
        tokenizer = session.remote_classes[2].from_pretrained(str(folder))
        assert tokenizer.encode("hi") == [64790, 64792, *tokenizer.encode("hi", add_special_tokens=False)]
        assert tokenizer(["a", "abc"], padding=True)["attention_mask"][0] == [0, 0, 1, 1, 1]
    finally:
        session.undo()
    with pytest.raises(TypeError, match="'property' object cannot be interpreted as an integer"):
        session.remote_classes[2].from_pretrained(str(folder))  # undone: the upstream failure again


# ------------------------------------------------------------------ the real tokenizer (GLMPORT_UPSTREAM_DIR)

UPSTREAM = [p for p in source_params(fixtures=False, families=("chatglm2",))]


@pytest.fixture(scope="module")
def real_tokenizer_folder(tmp_path_factory):
    """A tiny model folder around one upstream revision, with the real tokenizer.model next to its code."""
    built = {}

    def get(source):
        if not (source.folder / "tokenizer.model").is_file():
            pytest.skip(f"{source.folder} has no tokenizer.model (the real SentencePiece model of chatglm2-6b)")
        if source.name not in built:
            folder = build_upstream_folder(source, tmp_path_factory.mktemp("real-tokenizer") / source.name)
            shutil.copyfile(source.folder / "tokenizer.model", folder / "tokenizer.model")
            (folder / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "ChatGLMTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
            built[source.name] = folder
        return built[source.name]

    return get


ADVERTISEGEN = ("类型#裙*版型#显瘦*风格#文艺*图案#印花", "这款裙子采用文艺的印花图案，显瘦的版型，穿着舒适。")


@pytest.mark.parametrize("source", UPSTREAM)
def test_the_real_tokenizer_gets_chatglm2_s_own_recipe(source, real_tokenizer_folder):
    folder = real_tokenizer_folder(source)
    plugins = manager()
    session = patch_session(model_info(folder), plugins.backends.get("cpu"), "train", registry=plugins.patch_sets)
    try:
        tokenizer = session.remote_classes[2].from_pretrained(str(folder))
        detection = detect_family(tokenizer, model_info(folder).config)
        assert detection.family == "chatglm2"
        assert detection.evidence[0] == ("tokenizer has [gMASK] 64790, sop 64792; no role tokens (<|user|>...), "
                                         "<sop>, <|endoftext|>")
        template = get_template("auto", tokenizer)
        question, answer = ADVERTISEGEN
        sample = template.train_sample(Conversation([Message("user", question), Message("assistant", answer)],
                                                    "dev.jsonl:1"), 512, 512)
        # ChatGLM2-6B ptuning/main.py, preprocess_function_train, with the tokenizer's own methods:
        a_ids = tokenizer.encode(text=tokenizer.build_prompt(question, None), add_special_tokens=True)
        b_ids = tokenizer.encode(text=answer, add_special_tokens=False)
        assert sample.input_ids == a_ids + b_ids + [tokenizer.eos_token_id]
        assert sample.labels == [-100] * len(a_ids) + b_ids + [tokenizer.eos_token_id]
        assert a_ids[:2] == [64790, 64792] and tokenizer.eos_token_id == 2
        # one round: the prompt of model.chat (build_inputs); later rounds: stream_chat's continuation of its
        # cache (build_stream_inputs: the round alone, without its first piece), after the reply as generated
        assert template.prompt_ids([Message("user", question)]) == a_ids
        first = tokenizer.encode(text=tokenizer.build_prompt("你好"), add_special_tokens=True)
        reply = tokenizer.encode(text="你好，有什么可以帮你？", add_special_tokens=False)
        later = tokenizer.encode(f"\n\n[Round 2]\n\n问：{question}\n\n答：", add_special_tokens=False)
        assert later[0] == 30910 and tokenizer.convert_ids_to_tokens(later[0]) == "▁"
        history = [Message("user", "你好"), Message("assistant", "你好，有什么可以帮你？"), Message("user", question)]
        assert template.prompt_ids(history) == first + reply + later[1:]
        text = tokenizer.decode(template.prompt_ids(history))
        assert text == tokenizer.build_prompt(question, [("你好", " 你好，有什么可以帮你？")])  # the reply's "▁"
    finally:
        session.undo()
