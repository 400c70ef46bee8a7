"""QLoRA (``glmport.quantization: 4bit``): LoRA on a base model quantized by bitsandbytes, where its kernels exist
(cuda; cpu with bitsandbytes 0.48+), refused before the model loads everywhere else."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from e2e_cli import summary, write_config

from glmport.testing import ok, run_cli

needs_bitsandbytes = pytest.mark.skipif(
    __import__("importlib").util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'glmport[qlora]')")

QUICK = dict(training_args__eval_strategy="no", training_args__predict_with_generate=False,
             training_args__max_steps=3, training_args__save_steps=3, training_args__learning_rate=1e-2,
             training_args__lr_scheduler_type="constant", data_config={"train_file": "train.jsonl"})


def _losses(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def _quantized_linears(stderr: str) -> int:
    """The count of the training log's ``base model in 4bit through bitsandbytes X: N Linear4bit`` line."""
    found = re.search(r"base model in 4bit through bitsandbytes \S+: (\d+) Linear4bit", stderr)
    assert found, stderr[-3000:]
    return int(found.group(1))


def _train(models, data_dir, tmp_path, model: str, **settings) -> Path:
    config = write_config(tmp_path, "lora", glmport__quantization="4bit", **{**QUICK, **settings})
    result = ok(run_cli("train", data_dir, models[model], config, in_process=False))
    losses = _losses(tmp_path)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    final = tmp_path / "out" / "final"
    assert (final / "adapter_model.safetensors").is_file()
    record = json.loads((final / "glmport_result.json").read_text())
    assert record["quantization"] == "4bit" and record["method"] == "lora"
    assert any("QLoRA" in note for note in summary(tmp_path)["notes"])
    return result


def _load(path: Path, **options):
    from glmport.infer import load_for_inference
    from glmport.plugins import PluginManager

    manager = PluginManager(autoload=False)
    return load_for_inference(path, manager.backends.get("cpu"), patch_sets=manager.patch_sets, dtype="fp32",
                              **options)


def _logits(bundle, ids: torch.Tensor) -> torch.Tensor:
    try:
        with torch.no_grad():
            return bundle.model(input_ids=ids).logits.float()
    finally:
        bundle.close()


@needs_bitsandbytes
@pytest.mark.slow
def test_qlora_on_remote_chatglm3_trains_infers_and_merges(models, data_dir, tmp_path):
    """Remote code (compat patches applied) with its linear layers swapped for 4-bit ones, and gradient
    checkpointing on; the result infers on a 4-bit base again and exports merged into the fp32 base."""
    trained = _train(models, data_dir, tmp_path, "remote", training_args__gradient_checkpointing=True)
    # every linear layer of the two blocks (query_key_value, dense, dense_h_to_4h, dense_4h_to_h); the output
    # layer stays in full precision, as transformers keeps the output embedding
    assert _quantized_linears(trained.stderr) == 8
    final = tmp_path / "out" / "final"

    from glmport.train.quantization import quantized_modules
    bundle = _load(final)
    try:
        assert quantized_modules(bundle.model) == {"Linear4bit": 8}
    finally:
        bundle.close()
    reply = ok(run_cli("infer", final, "--prompt", "hello", "--max-new-tokens", "3", in_process=False))
    assert "loading the base model in 4bit, as the result trained on it" in reply.stderr
    # where bitsandbytes has no kernels, the adapter still answers, on the full-precision base
    elsewhere = ok(run_cli("infer", final, "--prompt", "hello", "--max-new-tokens", "3", in_process=False,
                           env={"GLMPORT_EMULATE": "mlu"}))
    assert "trained on a 4bit base (QLoRA); loading the base in full precision instead" in elsewhere.stderr
    assert "cannot run on backend mlu" in elsewhere.stderr

    out = tmp_path / "merged"
    ok(run_cli("export", final, out, "--merge", in_process=False))
    assert json.loads((out / "glmport_export.json").read_text())["trained_quantization"] == "4bit"
    ids = torch.tensor([[64790, 64792, 64795, 30, 31, 32, 64796]])
    merged_bundle = _load(out)
    assert quantized_modules(merged_bundle.model) == {}  # plain fp32 weights: any tool loads them
    merged = _logits(merged_bundle, ids)
    full = _logits(_load(final, quantization="none"), ids)  # fp32 base + the adapter, unmerged
    base = _logits(_load(models["remote"]), ids)
    assert torch.allclose(merged, full, atol=1e-4), (merged - full).abs().max()
    assert not torch.allclose(merged, base, atol=1e-4)  # the adapter is in the merged weights


@needs_bitsandbytes
@pytest.mark.slow
def test_qlora_on_a_native_glm_model(models, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    trained = _train(models, data_dir, tmp_path, "native")
    plain = AutoModelForCausalLM.from_pretrained(models["native"], dtype=torch.float32)
    linears = [name for name, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    assert _quantized_linears(trained.stderr) == len(linears) > 0  # every linear layer but the output one


def _refused(models, data_dir, tmp_path, method: str = "lora", env=None, **settings):
    config = write_config(tmp_path, method, glmport__quantization="4bit", **{**QUICK, **settings})
    result = ok(run_cli("train", data_dir, models["native"], config, env=env), 2)
    assert "glmport.quantization" in result.stderr and f"{config}:" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written
    return result.stderr


@pytest.mark.parametrize(("device", "reason"), [
    ("mlu", "cannot run on backend mlu: bitsandbytes has no MLU kernels"),
    ("cuda", "cannot run on backend cuda: bitsandbytes' CUDA kernels need a real GPU, and cuda is emulated here")])
def test_emulated_devices_are_refused_naming_the_backend(models, data_dir, tmp_path, device, reason):
    stderr = _refused(models, data_dir, tmp_path, env={"GLMPORT_EMULATE": device})
    assert reason in stderr, stderr
    assert "quantization: none" in stderr or "LoRA without quantization" in stderr  # what to do instead


@pytest.mark.parametrize(("method", "named"), [("ptuning", "P-Tuning v2"), ("sft", "full SFT")])
def test_methods_other_than_lora_are_refused(models, data_dir, tmp_path, method, named):
    stderr = _refused(models, data_dir, tmp_path, method)
    assert "4bit is QLoRA" in stderr and named in stderr and "peft_type: LORA" in stderr


class _NoBitsandbytes:
    """A meta path finder for which bitsandbytes is not there, as on a host without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def test_missing_bitsandbytes_is_refused_naming_the_extra(models, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_NoBitsandbytes(), *sys.meta_path])
    for name in [n for n in sys.modules if n == "bitsandbytes" or n.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    stderr = _refused(models, data_dir, tmp_path)
    assert "needs the bitsandbytes package, which is not installed" in stderr
    assert "pip install 'glmport[qlora]'" in stderr


def test_unknown_quantization_is_refused(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", glmport__quantization="3bit", **QUICK)
    result = ok(run_cli("train", data_dir, models["native"], config), 2)
    assert "glmport.quantization: '3bit' is not one of 4bit, 8bit, none" in result.stderr


@needs_bitsandbytes
@pytest.mark.slow  # builds a model folder with the real vocabulary
def test_estimate_counts_the_bytes_a_4bit_base_holds(tmp_path):
    """`glmport bench --estimate --quantization 4bit`'s weights term against the bytes of the "tiny" shape (real vocabulary) loaded
    as glmport trains it (nf4 blocks, double-quantized constants, fp32 embedding and output layer after peft's
    k-bit preparation)."""
    from glmport.bench.estimate import estimate_peak
    from glmport.bench.shapes import SHAPES, model_folder
    from glmport.modeling import inspect_model_dir, load_model
    from glmport.plugins import PluginManager
    from glmport.train.quantization import bitsandbytes_config, prepare_for_training, quantized_modules

    shape = SHAPES["tiny"]
    manager = PluginManager(autoload=False)
    loaded = load_model(inspect_model_dir(model_folder(shape, 0, cache=tmp_path)), manager.backends.get("cpu"),
                        mode="train", dtype=torch.float32, patch_sets=manager.patch_sets,
                        quantization_config=bitsandbytes_config("4bit", torch.float32))
    try:
        model = prepare_for_training(loaded.model)
        assert quantized_modules(model) == {"Linear4bit": 4 * shape.num_layers}
        held = 0
        for param in model.parameters():
            held += param.numel() * param.element_size()
            state = getattr(param, "quant_state", None)
            if state is not None:  # the nf4 blocks' absmax (8-bit) and its own fp32 constants
                held += state.absmax.numel() * state.absmax.element_size()
                held += state.state2.absmax.numel() * state.state2.absmax.element_size()
    finally:
        loaded.patches.undo()
    estimate = estimate_peak(shape, dtype="fp32", quantization="4bit")["terms"]["weights"]
    assert abs(estimate - held) <= 1e-4 * held, (estimate, held)
    full = estimate_peak(shape, dtype="fp32")["terms"]["weights"]
    assert estimate < full


def test_estimate_refuses_quantization_without_lora():
    result = ok(run_cli("bench", "--estimate", "--shape", "chatglm3-6b", "--method", "sft", "--quantization", "4bit"), 2)
    assert "--quantization 4bit" in result.stderr and "--method lora" in result.stderr
