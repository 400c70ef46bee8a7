"""LoRA, P-Tuning v2 and full SFT end to end, on tiny native and remote-code models, on the cpu backend
and on mlu under emulation with the 64-bit guard on, through `glmport train DATA_DIR MODEL_DIR CONFIG`."""

from __future__ import annotations

import json
import math

import pytest
from e2e_cli import summary, write_config

from glmport.testing import ok, run_cli

pytestmark = pytest.mark.slow

EXPECTED_RESULT = {
    ("native", "lora"): ("adapter", ["adapter_config.json", "adapter_model.safetensors"]),
    ("native", "ptuning"): ("adapter", ["adapter_config.json", "adapter_model.safetensors"]),
    ("native", "sft"): ("full-model", ["config.json", "model.safetensors"]),
    ("remote", "lora"): ("adapter", ["adapter_config.json", "adapter_model.safetensors"]),
    ("remote", "ptuning"): ("prefix-encoder", ["prefix_encoder.safetensors"]),
    ("remote", "sft"): ("full-model", ["config.json", "model.safetensors", "modeling_chatglm.py"]),
    ("remote-glm4", "lora"): ("adapter", ["adapter_config.json", "adapter_model.safetensors"]),
    ("remote-glm4", "ptuning"): ("adapter", ["adapter_config.json", "adapter_model.safetensors"]),
}


@pytest.mark.parametrize("backend", ["cpu", "mlu"])
@pytest.mark.parametrize("method", ["lora", "ptuning", "sft"])
@pytest.mark.parametrize("kind", ["native", "remote"])
def test_train(kind, method, backend, models, data_dir, tmp_path):
    config = write_config(tmp_path, method)
    env = {"GLMPORT_EMULATE": "mlu"} if backend == "mlu" else {}
    result = ok(run_cli("train", data_dir, models[kind], config, "--backend", backend, "-q", env=env,
                        in_process=False))
    s = summary(tmp_path)
    assert s["steps"] == 4 and s["backend"] == backend and s["method"] == method
    assert math.isfinite(s["first_loss"]) and math.isfinite(s["last_loss"])
    assert "eval" in s and math.isfinite(s["eval"]["loss"]) and "rouge-1" in s["eval"]
    content, files = EXPECTED_RESULT[(kind, method)]
    final = tmp_path / "out" / "final"
    published = json.loads((final / "glmport_result.json").read_text())
    assert published["content"] == content
    assert published["family_detection"]["family"] == "chatglm3" and published["family_detection"]["evidence"]
    for name in files:
        assert (final / name).is_file(), name
    assert (tmp_path / "out" / "checkpoint-2" / "glmport_checkpoint.json").is_file()
    assert "glmport train:" in result.stdout and "loss" in result.stdout
    if backend == "mlu":
        assert s["emulated"] and s["guard_64bit"]["mode"] == "error"
        assert s["guard_64bit"]["ops_checked"] > 1000 and s["guard_64bit"]["leaks"] == []
        # chosen by capability: the MLU lacks 64-bit kernels and is an accelerator
        expected = ["int32/native-mask32"] if kind == "native" else \
            ["int32/int32-positions", "no-torchscript/torchscript-off", "accelerator/attention-varlen"]
        assert all(name in s["patches"] for name in expected), s["patches"]
    if kind == "remote":
        assert "compat/compat-generation" in s["patches"]


# ChatGLM2-6B: LoRA on both backends; P-Tuning v2 (its own prefix encoder) on emulated mlu, full SFT on cpu
CHATGLM2_RUNS = [("lora", "cpu"), ("lora", "mlu"), ("ptuning", "mlu"), ("sft", "cpu")]
CHATGLM2_RESULT = {"lora": ("adapter", "adapter_model.safetensors"), "ptuning": ("prefix-encoder", "prefix_encoder.safetensors"),
                   "sft": ("full-model", "modeling_chatglm.py")}


@pytest.mark.parametrize("method, backend", CHATGLM2_RUNS, ids=[f"{m}-{b}" for m, b in CHATGLM2_RUNS])
def test_chatglm2_remote_code(method, backend, models, data_dir, tmp_path):
    config = write_config(tmp_path, method)
    env = {"GLMPORT_EMULATE": "mlu"} if backend == "mlu" else {}
    ok(run_cli("train", data_dir, models["remote-chatglm2"], config, "--backend", backend, "-q", env=env,
               in_process=False))
    s = summary(tmp_path)
    assert (s["model_family"], s["method"], s["backend"], s["steps"]) == ("chatglm2", method, backend, 4)
    assert math.isfinite(s["last_loss"]) and math.isfinite(s["eval"]["loss"]) and "rouge-1" in s["eval"]
    final = tmp_path / "out" / "final"
    published = json.loads((final / "glmport_result.json").read_text())
    content, file = CHATGLM2_RESULT[method]
    assert published["content"] == content and (final / file).is_file()
    assert (published["template"], published["family_detection"]["family"]) == ("chatglm2", "chatglm2")
    assert "compat/compat-rotary-fp32" in s["patches"]
    if backend == "mlu":
        assert s["guard_64bit"]["mode"] == "error" and s["guard_64bit"]["leaks"] == []
        assert "int32/int32-positions" in s["patches"] and "accelerator/attention-varlen" in s["patches"]


# ChatGLM-6B: LoRA on both backends, P-Tuning v2 (its own prefix encoder) on emulated mlu, full SFT on cpu
CHATGLM6B_RUNS = [("lora", "cpu"), ("lora", "mlu"), ("ptuning", "mlu"), ("sft", "cpu")]
CHATGLM6B_RESULT = {"lora": ("adapter", "adapter_model.safetensors"),
                    "ptuning": ("prefix-encoder", "prefix_encoder.safetensors"), "sft": ("full-model", "modeling_chatglm.py")}


@pytest.mark.parametrize("method, backend", CHATGLM6B_RUNS, ids=[f"{m}-{b}" for m, b in CHATGLM6B_RUNS])
def test_chatglm6b_remote_code(method, backend, models, data_dir, tmp_path):
    config = write_config(tmp_path, method)
    env = {"GLMPORT_EMULATE": "mlu"} if backend == "mlu" else {}
    ok(run_cli("train", data_dir, models["remote-chatglm"], config, "--backend", backend, "-q", env=env,
               in_process=False))
    s = summary(tmp_path)
    assert (s["model_family"], s["method"], s["backend"], s["steps"]) == ("chatglm", method, backend, 4)
    assert math.isfinite(s["last_loss"]) and math.isfinite(s["eval"]["loss"]) and "rouge-1" in s["eval"]
    final = tmp_path / "out" / "final"
    published = json.loads((final / "glmport_result.json").read_text())
    content, file = CHATGLM6B_RESULT[method]
    assert published["content"] == content and (final / file).is_file()
    assert (published["template"], published["family_detection"]["family"]) == ("chatglm", "chatglm")
    expected = ["compat/compat-tokenizer-init", "compat/compat-transformers-inputs", "compat/compat-generation"]
    if backend == "mlu":
        assert s["guard_64bit"]["mode"] == "error" and s["guard_64bit"]["leaks"] == []
        assert s["guard_64bit"]["ops_checked"] > 1000
        expected += ["int32/int32-positions", "accelerator/attention-sdpa", "no-torchscript/torchscript-off"]
    assert all(name in s["patches"] for name in expected), s["patches"]


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_glm4_remote_code_on_emulated_mlu(method, models, data_dir, tmp_path):
    config = write_config(tmp_path, method, combine=True)
    ok(run_cli("train", data_dir, models["remote-glm4"], config, "--backend", "mlu", "-q",
               env={"GLMPORT_EMULATE": "mlu"}, in_process=False))
    s = summary(tmp_path)
    assert s["model_family"] == "glm4" and s["guard_64bit"]["leaks"] == [] and s["steps"] == 4
    content, files = EXPECTED_RESULT[("remote-glm4", method)]
    for name in files:
        assert (tmp_path / "out" / "final" / name).is_file()


# The rest of the README's model table: GLM-4-9B-chat remote code on cpu (LoRA, full SFT) and the native
# GLM-4-0414 class with P-Tuning v2 (peft prefix tuning) and full SFT.
GLM4_RUNS = [("remote-glm4", "lora", "cpu"), ("remote-glm4", "sft", "cpu"), ("native-glm4", "ptuning", "mlu"),
             ("native-glm4", "sft", "cpu")]
GLM4_RESULT = {"lora": ("adapter", "adapter_model.safetensors"), "ptuning": ("adapter", "adapter_model.safetensors"),
               "sft": ("full-model", "model.safetensors")}


@pytest.mark.parametrize("kind, method, backend", GLM4_RUNS, ids=["-".join(run) for run in GLM4_RUNS])
def test_glm4_generations(kind, method, backend, models, data_dir, tmp_path):
    config = write_config(tmp_path, method, combine=kind == "remote-glm4")
    env = {"GLMPORT_EMULATE": "mlu"} if backend == "mlu" else {}
    ok(run_cli("train", data_dir, models[kind], config, "--backend", backend, "-q", env=env, in_process=False))
    s = summary(tmp_path)
    assert (s["model_family"], s["method"], s["backend"], s["steps"]) == ("glm4", method, backend, 4)
    assert math.isfinite(s["first_loss"]) and math.isfinite(s["last_loss"]) and math.isfinite(s["eval"]["loss"])
    if backend == "mlu":
        assert s["guard_64bit"]["leaks"] == [] and s["guard_64bit"]["ops_checked"] > 1000
    content, name = GLM4_RESULT[method]
    published = json.loads((tmp_path / "out" / "final" / "glmport_result.json").read_text())
    assert published["content"] == content and (tmp_path / "out" / "final" / name).is_file()
    if kind == "remote-glm4" and method == "sft":
        assert (tmp_path / "out" / "final" / "modeling_chatglm.py").is_file()


def test_bf16_on_emulated_mlu(models, data_dir, tmp_path):
    """The backend's own dtype choice: bf16 base weights with fp32 LoRA weights (2 steps: bf16 is slow on CPUs)."""
    config = write_config(tmp_path, "lora", glmport={"eval_samples": 2}, training_args__max_steps=2,
                          training_args__save_steps=2, training_args__eval_steps=2)
    ok(run_cli("train", data_dir, models["native"], config, "--backend", "mlu", "-q", env={"GLMPORT_EMULATE": "mlu"},
               in_process=False))
    s = summary(tmp_path)
    assert s["dtype"] == "bfloat16" and s["guard_64bit"]["leaks"] == []


@pytest.mark.parametrize("kind, method", [("remote", "lora"), ("remote", "ptuning"), ("native", "ptuning"),
                                          ("native", "sft")])
def test_every_result_generates_through_glmport_infer_on_every_backend(kind, method, models, data_dir, tmp_path):
    """LoRA adapter, ChatGLM3 prefix encoder, peft prefix tuning, full model: trained on the CPU, then
    `glmport infer` on plain cpu (where adapters once failed to load: "device cpu:0 is invalid") and on
    emulated mlu with the infer patch set and the 64-bit guard."""
    config = write_config(tmp_path, method)
    ok(run_cli("train", data_dir, models[kind], config, "-q", in_process=False))
    content, _ = EXPECTED_RESULT[(kind, method)]
    for backend, env in (("cpu", {}), ("mlu", {"GLMPORT_EMULATE": "mlu"})):
        out = ok(run_cli("infer", tmp_path / "out" / "final", "--prompt", "Sort these words alphabetically: b a",
                         "--max-new-tokens", "4", "--json", "--backend", backend, env=env, in_process=False))
        reply = json.loads(out.stdout.strip().splitlines()[-1])
        assert reply["backend"] == backend and isinstance(reply["reply"], str)
        assert f" + {content} " in reply["model"]
        if backend == "mlu":
            assert ("int32/native-mask32" if kind == "native" else "int32/int32-positions") in reply["patches"]
