"""``glmport export RESULT OUT --merge`` and ``glmport convert SRC OUT --to native``, as users run them.

* export: the merged folder computes what base + adapter (or base + prefix) computed, and loads with
  ``AutoModelForCausalLM.from_pretrained`` in a process that never imports glmport;
* convert: the native folder computes what the remote-code model computed (ChatGLM2, ChatGLM3, GLM-4
  fixtures, rope_ratio included), loads without remote code, and its tokenizer and chat template give the
  ids glmport's tokenizer and template module give.

The adapters of the fast tests are made with peft directly (a bare adapter folder, as peft writes one);
the ``slow`` tests train with ``glmport train`` first. Real upstream files: test_convert_upstream.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from e2e_cli import write_config

from glmport.testing import ok, run_cli

ATOL = 1e-5  # fp32: native vs remote code, the same arithmetic
MERGE_ATOL = 1e-4  # fp32: W + s*B*A once, instead of W*x + s*B*(A*x) on every call


# --- helpers ------------------------------------------------------------------------------------------------------

def token_ids(rows: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    """Ids of ordinary tokens the tiny tokenizers produce, long enough for positions to matter."""
    return torch.randint(3, 300, (rows, length), generator=torch.Generator().manual_seed(seed))


def glmport_logits(path: Path, ids: torch.Tensor, **options) -> torch.Tensor:
    """Logits of a model folder or result as glmport loads it (patched remote code, adapter on top), fp32."""
    from glmport.infer import load_for_inference
    from glmport.plugins import PluginManager

    manager = PluginManager(autoload=False)
    bundle = load_for_inference(path, manager.backends.get("cpu"), patch_sets=manager.patch_sets, dtype="fp32",
                                **options)
    try:
        with torch.no_grad():
            return bundle.model(input_ids=ids).logits.float()
    finally:
        bundle.close()


PLAIN_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
jobs, ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
reports = []
for folder, out, remote in jobs:
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, out)
        prompt = tokenizer("你好", return_tensors="pt")["input_ids"]
        generated = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    chat = None
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    reports.append({"model_class": type(model).__name__, "generated": generated.shape[1] - prompt.shape[1],
                    "prompt": prompt[0].tolist(), "chat": chat})
print(json.dumps({"glmport_imported": any(m == "glmport" or m.startswith("glmport.") for m in sys.modules),
                  "reports": reports}))
"""


def load_without_glmport(folders: list[tuple[Path, bool]], ids: torch.Tensor, tmp_path: Path):
    """Load each ``(folder, remote code?)`` with plain transformers in one fresh interpreter that never imports
    glmport; ``[(report, logits on ids)]``."""
    jobs = [(str(folder), str(tmp_path / f"plain-logits-{n}.pt"), remote) for n, (folder, remote) in enumerate(folders)]
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, json.dumps(jobs), json.dumps(ids.tolist())],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["glmport_imported"] is False
    return [(report, torch.load(out)) for report, (_, out, _) in zip(result["reports"], jobs)]


def bare_lora_adapter(base: Path, target: Path, seed: int = 1) -> Path:
    """A LoRA adapter as peft saves one (adapter_config.json names the base), with non-zero weights."""
    from peft import LoraConfig, get_peft_model

    from glmport.infer import load_for_inference
    from glmport.plugins import PluginManager
    from glmport.train.methods import LORA_TARGETS

    manager = PluginManager(autoload=False)
    bundle = load_for_inference(base, manager.backends.get("cpu"), patch_sets=manager.patch_sets, dtype="fp32")
    try:
        kind = bundle.loaded.info.kind
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[kind], task_type="CAUSAL_LM")
        model = get_peft_model(bundle.model, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        model.peft_config["default"].base_model_name_or_path = str(base)
        model.save_pretrained(str(target))
    finally:
        bundle.close()
    return target


# --- export -------------------------------------------------------------------------------------------------------

def test_merged_lora_exports_equal_base_plus_adapter_and_load_without_glmport(models, tmp_path):
    """ChatGLM3 and GLM-4 remote code, and a native GLM model: one interpreter without glmport loads all three."""
    ids, exported = token_ids(), []
    for name in ("remote", "remote-glm4", "native"):
        base = models[name]
        adapter = bare_lora_adapter(base, tmp_path / f"adapter-{name}")
        want = glmport_logits(adapter, ids)
        assert (want - glmport_logits(base, ids)).abs().max() > 1e-2  # the adapter changes the model

        out = tmp_path / f"merged-{name}"
        ok(run_cli("export", adapter, out, "--merge", "--max-shard-size", "300KB"))
        names = {p.name for p in out.iterdir()}
        assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 1
        assert not (tmp_path / f"merged-{name}.partial").exists()
        record = json.loads((out / "glmport_export.json").read_text())
        assert record["content"] == "adapter" and record["merged"] and record["dtype"] == "float32"
        generation = json.loads((out / "generation_config.json").read_text())
        assert len(generation["eos_token_id"]) == 3  # </s> or <|endoftext|>, <|user|>, <|observation|>
        remote = name != "native"
        assert ("glmport_compat.py" in names) == remote and ("modeling_chatglm.py" in names) == remote
        if remote:  # the code as it was; loading goes through glmport_compat, which the auto_map names
            assert (out / "modeling_chatglm.py").read_bytes() == (base / "modeling_chatglm.py").read_bytes()
            assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
                "glmport_compat.ChatGLMForConditionalGeneration"
        assert torch.allclose(glmport_logits(out, ids), want, atol=MERGE_ATOL)  # glmport loads the export too
        exported.append((out, remote, want))
    for (report, plain), (_, _, want) in zip(load_without_glmport([(o, r) for o, r, _ in exported], ids, tmp_path),
                                             exported):
        assert torch.allclose(plain, want, atol=MERGE_ATOL)
        assert report["generated"] == 3


def test_earlier_generations_export_merged_and_load_without_glmport(models, tmp_path):
    """ChatGLM2-6B and ChatGLM-6B remote code: the merged folder computes base+adapter, in glmport and in plain
    transformers (their remote code through the written-out compat patches)."""
    for name in ("remote-chatglm2", "remote-chatglm"):
        ids = token_ids()
        if name == "remote-chatglm":  # ChatGLM-6B finds the prompt's end by its [gMASK] <sop> (2-D positions)
            ids = torch.cat([ids[:, :12], chatglm6b_specials(models[name]).expand(len(ids), 2), ids[:, 12:]], dim=1)
        adapter = bare_lora_adapter(models[name], tmp_path / f"adapter-{name}")
        want = glmport_logits(adapter, ids)
        assert (want - glmport_logits(models[name], ids)).abs().max() > 1e-2
        out = tmp_path / f"merged-{name}"
        ok(run_cli("export", adapter, out, "--merge"))
        assert (out / "glmport_compat.py").is_file() and (out / "modeling_chatglm.py").is_file()
        assert torch.allclose(glmport_logits(out, ids), want, atol=MERGE_ATOL)
        (tmp_path / name).mkdir()
        (report, plain), = load_without_glmport([(out, True)], ids, tmp_path / name)
        assert torch.allclose(plain, want, atol=MERGE_ATOL)
        assert report["generated"] == 3


def chatglm6b_specials(folder: Path) -> torch.Tensor:
    """``[gMASK] <sop>`` of a ChatGLM-6B folder, their ids read from its tokenizer."""
    from glmport.infer import load_for_inference
    from glmport.plugins import PluginManager

    manager = PluginManager(autoload=False)
    bundle = load_for_inference(folder, manager.backends.get("cpu"), patch_sets=manager.patch_sets, dtype="fp32")
    try:
        return torch.tensor([bundle.tokenizer.convert_tokens_to_ids(t) for t in ("[gMASK]", "<sop>")])
    finally:
        bundle.close()


def test_export_writes_the_dtype_asked_for_and_the_same_weights_on_emulated_mlu(models, tmp_path):
    from safetensors.torch import load_file

    adapter = bare_lora_adapter(models["remote"], tmp_path / "adapter")
    ok(run_cli("export", adapter, tmp_path / "cpu", "--merge", "--dtype", "bf16"))
    ok(run_cli("export", adapter, tmp_path / "mlu", "--merge", "--dtype", "bf16", "--backend", "mlu",
               env={"GLMPORT_EMULATE": "mlu"}))
    a, b = load_file(str(tmp_path / "cpu" / "model.safetensors")), load_file(str(tmp_path / "mlu" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["transformer.output_layer.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "cpu" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_refuses_what_it_cannot_write(models, tmp_path):
    adapter = bare_lora_adapter(models["native"], tmp_path / "adapter")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    result = ok(run_cli("export", adapter, taken, "--merge"), exit_code=2)
    assert "folder is not empty" in result.stderr and "--force" in result.stderr
    assert (taken / "keep.txt").read_text() == "mine"
    result = ok(run_cli("export", adapter, tmp_path / "new"), exit_code=2)
    assert "needs --merge" in result.stderr
    result = ok(run_cli("export", adapter, adapter, "--merge", "--force"), exit_code=2)
    assert "would replace what it is made from" in result.stderr and (adapter / "adapter_config.json").is_file()
    result = ok(run_cli("export", adapter, tmp_path / "new", "--merge", "--max-shard-size", "big"), exit_code=2)
    assert "--max-shard-size" in result.stderr
    ok(run_cli("export", adapter, taken, "--merge", "--force"))
    assert not (taken / "keep.txt").exists() and (taken / "config.json").is_file()


def test_export_takes_the_base_from_base_when_it_moved(models, tmp_path):
    """Adapters pin the absolute path of their base model; --base says where it is now."""
    import shutil

    base = shutil.copytree(models["remote"], tmp_path / "base")
    adapter = bare_lora_adapter(base, tmp_path / "adapter")
    ids = token_ids()
    want = glmport_logits(adapter, ids)
    base.rename(tmp_path / "moved")
    result = ok(run_cli("export", adapter, tmp_path / "out", "--merge"), exit_code=2)
    assert "--base" in result.stderr and not (tmp_path / "out").exists()
    ok(run_cli("export", adapter, tmp_path / "out", "--merge", "--base", tmp_path / "moved"))
    assert torch.allclose(glmport_logits(tmp_path / "out", ids), want, atol=MERGE_ATOL)
    assert json.loads((tmp_path / "out" / "glmport_export.json").read_text())["base_model"] == str(tmp_path / "moved")


def test_peft_prefix_tuning_cannot_be_merged_and_says_what_to_do(models, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = models["native"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(str(tmp_path / "prefix"))
    result = ok(run_cli("export", tmp_path / "prefix", tmp_path / "out", "--merge"), exit_code=2)
    assert "cannot be merged into the weights" in result.stderr and "glmport infer" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_failed_write_leaves_nothing_behind(models, tmp_path, monkeypatch):
    import huggingface_hub

    adapter = bare_lora_adapter(models["native"], tmp_path / "adapter")

    def disk_full(state, folder, **kwargs):
        (Path(folder) / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device", str(Path(folder) / "model-00002-of-00002.safetensors"))

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", disk_full)
    result = ok(run_cli("export", adapter, tmp_path / "out", "--merge"), exit_code=2)
    assert "No space left on device" in result.stderr and "nothing was written" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# --- convert ------------------------------------------------------------------------------------------------------

def _fixture_revisions():
    from glmport.tiny.remote import FIXTURE_REVISIONS

    return [pytest.param(family, revision, id=revision) for family, revisions in FIXTURE_REVISIONS.items()
            for revision in revisions if family != "chatglm"]  # ChatGLM-6B is refused: see below


def _native_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _check_tokenizer_and_template(source_folder: Path, native_folder: Path, family: str) -> None:
    """The saved fast tokenizer and its chat template against the model's own tokenizer and glmport's template."""
    from transformers import AutoTokenizer

    from glmport.convert.chat_template import as_dicts, expected_ids, sample_conversations
    from glmport.convert.tokenizer import SAMPLE_TEXTS, mismatches
    from glmport.data.templates import get_template
    from glmport.modeling import inspect_model_dir
    from glmport.patching.session import patch_session
    from glmport.plugins import PluginManager

    manager = PluginManager(autoload=False)
    session = patch_session(inspect_model_dir(source_folder), manager.backends.get("cpu"), "infer",
                            registry=manager.patch_sets)
    try:
        source = session.remote_classes[2].from_pretrained(str(source_folder))
        fast = AutoTokenizer.from_pretrained(str(native_folder))
        assert type(fast).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
        assert mismatches(fast, source, SAMPLE_TEXTS) == []
        template = get_template(family, source)
        for _, messages in sample_conversations(family):
            want, prompt = expected_ids(template, messages)
            assert fast.apply_chat_template(as_dicts(messages), add_generation_prompt=prompt, tokenize=True,
                                            return_dict=False) == want, messages
    finally:
        session.undo()


@pytest.mark.parametrize("family, revision", _fixture_revisions())
def test_converted_native_model_equals_the_remote_code_model(family, revision, tmp_path):
    from glmport.tiny import build_tiny_model

    source = build_tiny_model("tiny-remote", tmp_path / revision, family=family, revision=revision)
    out = tmp_path / "native"
    result = ok(run_cli("convert", source, out, "--to", "native"))
    assert "GlmForCausalLM" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm" and config["architectures"] == ["GlmForCausalLM"]
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert not list(out.glob("*.py"))  # nothing to trust: no remote code in the folder
    ids = token_ids()
    assert torch.allclose(_native_logits(out, ids), glmport_logits(source, ids), atol=ATOL)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast" and tokenizer_config["chat_template"]
    _check_tokenizer_and_template(source, out, family)


def test_rope_theta_comes_from_rope_ratio(tmp_path):
    """GLM-4's rope_ratio multiplies the rotary base: 500 -> rope_theta 5e6 (transformers' own conversion
    script writes 10000). With the wrong base the logits differ, so the parity check would catch it."""
    from transformers import AutoModelForCausalLM

    from glmport.tiny import build_tiny_model

    source = build_tiny_model("tiny-remote", tmp_path / "glm4", family="glm4", rope_ratio=500.0)
    out = tmp_path / "native"
    ok(run_cli("convert", source, out, "--to", "native"))
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_theta"] == 5_000_000.0
    ids = token_ids(length=48)
    remote = glmport_logits(source, ids)
    assert torch.allclose(_native_logits(out, ids), remote, atol=ATOL)
    wrong = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                  "partial_rotary_factor": 0.5}).eval()
    with torch.no_grad():
        assert (wrong(input_ids=ids).logits - remote).abs().max() > 1e-3


def test_converted_folder_loads_without_remote_code_or_glmport(models, tmp_path):
    out = tmp_path / "native"
    ok(run_cli("convert", models["remote"], out, "--to", "native", "--dtype", "bf16"))
    ids = token_ids()
    [(report, logits)] = load_without_glmport([(out, False)], ids, tmp_path)
    assert torch.allclose(logits.float(), _native_logits(out, ids), atol=1e-2)  # bf16 weights
    assert report["model_class"] == "GlmForCausalLM" and report["generated"] == 3
    assert report["prompt"][:2] == [64790, 64792]  # [gMASK] sop, as the ChatGLM3 tokenizer starts a text
    assert report["chat"][:3] == [64790, 64792, 64795] and report["chat"][-1] == 64796  # ... <|user|> ... <|assistant|>
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    record = json.loads((out / "glmport_convert.json").read_text())
    assert record["tokenizer"]["original"] == "original_tokenizer" and record["tokenizer"]["differences"]


@pytest.fixture(scope="module")
def native_glm4(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "glm4-native"
    ok(run_cli("convert", models["remote-glm4"], out, "--to", "native"))
    return out


@pytest.mark.parametrize("backend", ["cpu", "mlu"])
def test_glmport_runs_the_converted_folder_on_cpu_and_emulated_mlu(native_glm4, backend):
    env = {"GLMPORT_EMULATE": "mlu"} if backend == "mlu" else {}
    result = ok(run_cli("infer", native_glm4, "--prompt", "你好", "--max-new-tokens", "4", "--backend", backend,
                        "--json", env=env))
    assert json.loads(result.stdout.strip().splitlines()[-1])["backend"] == backend


def test_convert_refuses_chatglm6b_adapters_and_native_folders(models, tmp_path):
    from glmport.tiny.remote import FIXTURE_REVISIONS

    chatglm6b = tmp_path / "chatglm-6b"
    if "chatglm" in FIXTURE_REVISIONS:
        ok(run_cli("init-model", "tiny-remote", chatglm6b, "--family", "chatglm"))
    else:  # a checkout without the ChatGLM-6B fixture: its config is what decides
        chatglm6b.mkdir()
        (chatglm6b / "config.json").write_text(json.dumps({
            "model_type": "chatglm", "vocab_size": 130528, "position_encoding_2d": True, "num_layers": 28}))
        (chatglm6b / "modeling_chatglm.py").write_text("# stands in for the remote code; never imported\n")
    result = ok(run_cli("convert", chatglm6b, tmp_path / "out", "--to", "native"), exit_code=2)
    assert "ChatGLM-6B" in result.stderr and "2D position ids" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    adapter = bare_lora_adapter(models["remote"], tmp_path / "adapter")
    result = ok(run_cli("convert", adapter, tmp_path / "out", "--to", "native"), exit_code=2)
    assert "glmport export" in result.stderr and "--merge" in result.stderr

    result = ok(run_cli("convert", models["native"], tmp_path / "out", "--to", "native"), exit_code=2)
    assert "native transformers folder already" in result.stderr
    result = ok(run_cli("convert", models["remote"], tmp_path / "out"), exit_code=2)
    assert "--to" in result.stderr


# --- from training to a merged and a native folder (slow: trains) ------------------------------------------------

def _train(data_dir: Path, model: Path, folder: Path, method: str) -> Path:
    folder.mkdir()
    config = write_config(folder, method, training_args__max_steps=2, training_args__save_steps=2,
                          training_args__eval_strategy="no", training_args__predict_with_generate=False,
                          data_config={"train_file": "train.jsonl"})
    ok(run_cli("train", data_dir, model, config, "-q", in_process=False))
    return folder / "out" / "final"


@pytest.mark.slow
def test_trained_lora_exports_and_the_export_converts(models, data_dir, tmp_path):
    result = _train(data_dir, models["remote"], tmp_path / "lora", "lora")
    ids = token_ids()
    want = glmport_logits(result, ids)
    merged = tmp_path / "merged"
    ok(run_cli("export", result, merged, "--merge"))
    [(_, plain)] = load_without_glmport([(merged, True)], ids, tmp_path)
    assert torch.allclose(plain, want, atol=MERGE_ATOL)
    native = tmp_path / "native"
    ok(run_cli("convert", merged, native, "--to", "native"))
    assert torch.allclose(_native_logits(native, ids), plain, atol=ATOL)
    assert json.loads((native / "glmport_convert.json").read_text())["source_code"]["modeling"].startswith(
        "glmport-fixture-chatglm3")


@pytest.mark.slow
def test_ptuning_exports_with_its_prefix(models, data_dir, tmp_path):
    """ChatGLM3's own P-Tuning v2: the prefix encoder goes into the state dict, pre_seq_len into config.json."""
    result = _train(data_dir, models["remote"], tmp_path / "ptuning", "ptuning")
    ids = token_ids()
    want = glmport_logits(result, ids)
    assert (want - glmport_logits(models["remote"], ids)).abs().max() > 1e-4  # the prefix changes the model
    out = tmp_path / "exported"
    ok(run_cli("export", result, out, "--merge"))
    config = json.loads((out / "config.json").read_text())
    assert config["pre_seq_len"] == 4 and config["prefix_projection"] is False
    [(_, plain)] = load_without_glmport([(out, True)], ids, tmp_path)
    assert torch.allclose(plain, want, atol=ATOL)
    refused = ok(run_cli("convert", out, tmp_path / "native", "--to", "native"), exit_code=2)
    assert "pre_seq_len" in refused.stderr


@pytest.mark.slow
def test_full_sft_result_converts_to_native(models, data_dir, tmp_path):
    result = _train(data_dir, models["remote-glm4"], tmp_path / "sft", "sft")
    native = tmp_path / "native"
    ok(run_cli("convert", result, native, "--to", "native"))
    ids = token_ids()
    assert torch.allclose(_native_logits(native, ids), glmport_logits(result, ids), atol=ATOL)
