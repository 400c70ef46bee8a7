"""Native GLM-4-0414 folders (``model_type: glm4``, transformers' ``Glm4ForCausalLM``): detection, the patch
plan, apply/undo on ``modeling_glm4``, the int32 patches' numbers on an emulated MLU, LoRA and P-Tuning."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from glmport.testing import ok, run_cli
from glmport.testing.emulation import emulating

GLM4_MODULE = "transformers.models.glm4.modeling_glm4"
GLM_MODULE = "transformers.models.glm.modeling_glm"
INT32 = [("int32", "native-mask32", "apply"), ("int32", "native-positions32", "apply")]
COMBOS = [(b, m) for b in ("cpu", "cuda", "mlu") for m in ("infer", "train")]


@pytest.fixture(scope="module")
def glm4_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glm4-0414") / "tiny"
    ok(run_cli("init-model", "tiny-native", folder, "--arch", "glm4"))
    return folder


@pytest.fixture(autouse=True)
def _forget_device_probes():
    yield
    from glmport.backends._emulation import forget_device_probes

    forget_device_probes()


def _manager():
    from glmport.plugins import PluginManager

    return PluginManager(autoload=False)


def _info(folder):
    from glmport.modeling import inspect_model_dir

    return inspect_model_dir(folder)


def test_a_glm4_folder_is_native_glm4(glm4_dir):
    from transformers import AutoTokenizer

    from glmport.data.templates import detect_family

    config = json.loads((glm4_dir / "config.json").read_text())
    assert config["model_type"] == "glm4" and config["architectures"] == ["Glm4ForCausalLM"]
    info = _info(glm4_dir)
    assert (info.kind, info.family, info.family_from) == ("native", "glm4", "config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(glm4_dir))
    detection = detect_family(tokenizer, config)
    assert detection.family == "glm4"
    assert any("[gMASK]<sop>" in line for line in detection.evidence), detection.evidence
    marker = json.loads((glm4_dir / "glmport_tiny.json").read_text())
    assert marker["arch"] == "glm4" and marker["family"] == "glm4"


def test_init_model_refuses_glm4_arch_with_the_chatglm3_tokenizer(tmp_path):
    result = ok(run_cli("init-model", "tiny-native", tmp_path / "m", "--arch", "glm4", "--family", "chatglm3"),
                exit_code=2)
    assert "glm4 tokenizer" in result.stderr
    result = ok(run_cli("init-model", "tiny-remote", tmp_path / "r", "--arch", "glm4"), exit_code=2)
    assert "only tiny-native" in result.stderr


@pytest.mark.parametrize("backend, mode", COMBOS, ids=[f"{b}-{m}" for b, m in COMBOS])
def test_plan_has_the_int32_native_patches_on_mlu_only(backend, mode, glm4_dir):
    from glmport.patching.session import load_modules, make_plan

    plugins = _manager()
    info = _info(glm4_dir)
    modules, _ = load_modules(info)
    assert modules["transformers"].__name__ == GLM4_MODULE
    plan = make_plan(info, plugins.backends.get(backend), mode, plugins.patch_sets, modules=modules)
    assert plan.problems == [] and (plan.kind, plan.family) == ("native", "glm4-native")
    rows = [(e.set_name, e.patch.id, e.status) for e in plan.entries]
    assert rows == (INT32 if backend == "mlu" else [])
    if backend == "mlu":
        positions = next(e.patch for e in plan.entries if e.patch.id == "native-positions32")
        assert positions.replaces == ("Glm4Model.forward",)


def test_cli_plan_shows_the_glm4_patches(glm4_dir, capsys):
    from glmport.cli import main

    assert main(["patch", "plan", str(glm4_dir), "--backend", "mlu", "--mode", "train", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "native" and data["family"] == "glm4-native" and data["problems"] == []
    assert [(p["set"], p["id"], p["status"]) for p in data["patches"]] == INT32
    assert [p["replaces"] for p in data["patches"]] == [["create_causal_mask"], ["Glm4Model.forward"]]


def _state(module) -> dict:
    return {"module": dict(vars(module)), "Glm4Model": dict(vars(module.Glm4Model))} if hasattr(module, "Glm4Model") \
        else {"module": dict(vars(module)), "GlmModel": dict(vars(module.GlmModel))}


def _changed(before: dict, module) -> set[str]:
    """What differs, but the process state load_modules keeps on the module from its first import on."""
    from glmport.patching.session import STATE_ATTR

    after = _state(module)
    return {f"{part}.{name}" for part in before for name in before[part].keys() | after[part].keys()
            if before[part].get(name, None) is not after[part].get(name, None) and name != STATE_ATTR}


@pytest.mark.parametrize("backend_name", ["cpu", "mlu"])
def test_apply_and_undo_restore_modeling_glm4(backend_name, glm4_dir):
    from glmport.patching.session import patch_session

    glm4, glm = importlib.import_module(GLM4_MODULE), importlib.import_module(GLM_MODULE)
    before, before_glm = _state(glm4), _state(glm)
    original_forward = glm4.Glm4Model.forward
    session = patch_session(_info(glm4_dir), _manager().backends.get(backend_name), "infer",
                            registry=_manager().patch_sets)
    try:
        expected = {"module._glmport_patch_session"}
        if backend_name == "mlu":
            expected |= {"module.create_causal_mask", "Glm4Model.forward"}
            assert "2 applied" in session.summary()
        else:
            assert "none needed" in session.summary()
        assert _changed(before, glm4) == expected
        assert _changed(before_glm, glm) == set()  # modeling_glm is not the glm4 folder's code
        assert session.recorder.verify() == []
    finally:
        session.undo()
    assert _changed(before, glm4) == set() and glm4.Glm4Model.forward is original_forward


def _batch():
    ids = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    left = torch.ones_like(ids)
    left[1, :4] = 0
    left[2, :2] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[left == 0] = -100
    labels[:, 1:][left[:, :-1] == 0] = -100
    return [("unpadded", ids, torch.ones_like(ids), None), ("left-padded", ids, left, labels)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager: no causal flag, the mask must be built
def test_mlu_patches_keep_the_numbers_and_the_guard_clean(attention, glm4_dir):
    from transformers import AutoModelForCausalLM

    from glmport.guard import sixty_four_bit_guard
    from glmport.modeling import load_model

    reference = AutoModelForCausalLM.from_pretrained(str(glm4_dir), dtype=torch.float32, attn_implementation=attention)
    expected = {}
    with torch.no_grad():  # before patching: the patches change transformers' own classes
        for name, ids, mask, labels in _batch():
            expected[name] = reference(input_ids=ids, attention_mask=mask, labels=labels)
    with emulating("mlu"):
        plugins = _manager()
        mlu = plugins.backends.get("mlu")
        assert mlu.emulated and mlu.sixty_four_bit_policy().lacks_64bit
        loaded = load_model(_info(glm4_dir), mlu, mode="infer", dtype=torch.float32, patch_sets=plugins.patch_sets,
                            config_overrides={"_attn_implementation": attention})
        try:
            assert [e.patch.id for e in loaded.patches.plan.to_apply] == ["native-mask32", "native-positions32"]
            model = loaded.model.eval()
            for name, ids, mask, labels in _batch():
                batch = mlu.coerce({"input_ids": ids, "attention_mask": mask}
                                   | ({"labels": labels} if labels is not None else {}))
                assert {v.dtype for v in batch.values()} == {torch.int32}
                guard = sixty_four_bit_guard(mlu.sixty_four_bit_policy().narrow.keys(), label="mlu", mode="error")
                with mlu.compute_context(), guard as report, torch.no_grad():
                    out = model(**batch)
                assert report.clean and report.ops_checked > 50
                keep = mask.bool()
                torch.testing.assert_close(out.logits[keep], expected[name].logits[keep], atol=1e-5, rtol=0)
                if labels is not None:
                    torch.testing.assert_close(out.loss, expected[name].loss, atol=1e-5, rtol=0)
        finally:
            loaded.patches.undo()


def _load_cpu(folder):
    from glmport.modeling import load_model

    plugins = _manager()
    return load_model(_info(folder), plugins.backends.get("cpu"), mode="train", dtype=torch.float32,
                      patch_sets=plugins.patch_sets)


def test_lora_targets_the_glm4_attention_projections(glm4_dir):
    from glmport.train.methods import apply_method

    loaded = _load_cpu(glm4_dir)
    try:
        model = apply_method(loaded.model, loaded.info, "lora", {"peft_type": "LORA", "r": 4, "lora_alpha": 8})
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        wrapped = {name.split(".")[-4] for name in trainable}  # ...q_proj.lora_A.default.weight
        assert wrapped == {"q_proj", "k_proj", "v_proj"}, wrapped
        assert len(trainable) == 2 * 3 * loaded.model.config.num_hidden_layers  # lora_A and lora_B
    finally:
        loaded.patches.undo()


def test_prefix_tuning_uses_the_key_value_geometry(glm4_dir):
    from glmport.train.methods import apply_method

    loaded = _load_cpu(glm4_dir)
    try:
        config = loaded.model.config
        model = apply_method(loaded.model, loaded.info, "ptuning", {"peft_type": "PREFIX_TUNING",
                                                                    "num_virtual_tokens": 4})
        peft_config = model.peft_config["default"]
        assert peft_config.num_attention_heads == config.num_key_value_heads == 2
        assert peft_config.token_dim == config.num_key_value_heads * config.head_dim
        ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        loaded.patches.undo()
