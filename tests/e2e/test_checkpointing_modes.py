"""glmport.gradient_checkpointing (off | full | selective | auto) and glmport.compile, on cpu and emulated mlu."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from e2e_cli import summary, write_config

from glmport.testing import ok, run_cli
from glmport.testing.emulation import emulating

MODES = ("off", "selective", "full", "auto")


def _losses(folder) -> list[float]:
    lines = (folder / "out" / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record and "step" in record]


def _train(folder, models, data_dir, backend="cpu", env=None, **glmport):
    folder.mkdir()
    config = write_config(folder, "lora", training_args__max_steps=2, training_args__save_strategy="no",
                          training_args__eval_strategy="no", training_args__predict_with_generate=False,
                          training_args__lr_scheduler_type="constant",
                          data_config={"train_file": "train.jsonl"}, glmport={"dtype": "fp32", **glmport})
    return ok(run_cli("train", data_dir, models["remote"], config, "--backend", backend, env=env or {}))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "mlu"])
def test_every_mode_trains_to_the_loss_of_off(backend, models, data_dir, tmp_path):
    env = {"GLMPORT_EMULATE": "mlu"} if backend == "mlu" else {}
    losses, plans = {}, {}
    for mode in MODES:
        result = _train(tmp_path / mode, models, data_dir, backend, env, gradient_checkpointing=mode)
        losses[mode], plans[mode] = _losses(tmp_path / mode), summary(tmp_path / mode)["gradient_checkpointing"]
        if mode == "auto":  # a tiny model fits anywhere: no recompute, and the decision is shown with its numbers
            assert "gradient checkpointing auto: off" in result.stderr and "free" in result.stderr, result.stderr[-2000:]
    assert [plans[m]["mode"] for m in MODES] == ["off", "selective", "full", "off"]
    assert plans["selective"]["recomputed_modules"] == 2  # the tiny model's two layers
    assert set(plans["auto"]["estimated_bytes"]) == {"off", "selective", "full"} and plans["auto"]["free_bytes"] > 0
    assert len(losses["off"]) == 2
    for mode in MODES[1:]:
        assert max(abs(a - b) for a, b in zip(losses[mode], losses["off"])) < 1e-5, losses


@pytest.mark.slow
def test_auto_checkpoints_fully_when_the_emulated_device_is_small(models, data_dir, tmp_path):
    result = _train(tmp_path / "small", models, data_dir, "mlu",
                    {"GLMPORT_EMULATE": "mlu", "GLMPORT_EMULATE_MEMORY": "64MiB"}, gradient_checkpointing="auto")
    plan = summary(tmp_path / "small")["gradient_checkpointing"]
    assert plan["mode"] == "full" and plan["free_bytes"] < plan["estimated_bytes"]["off"], plan
    assert "gradient checkpointing auto: full" in result.stderr


def _step_counts(model_dir, mode, backend_name="cpu"):
    """(attention-core forwards, MLP forwards) of one forward and backward pass of a LoRA model."""
    from glmport.modeling import inspect_model_dir, load_model
    from glmport.plugins import PluginManager
    from glmport.train.checkpointing import apply_checkpointing, attention_cores
    from glmport.train.methods import apply_method

    plugins = PluginManager(autoload=False)
    backend = plugins.backends.get(backend_name)
    info = inspect_model_dir(model_dir)
    loaded = load_model(info, backend, mode="train", dtype=torch.float32, patch_sets=plugins.patch_sets)
    calls = {"core": 0, "mlp": 0}
    try:
        model = apply_method(loaded.model, info, "lora", {"peft_type": "LORA", "r": 4, "lora_alpha": 8}).train()
        apply_checkpointing(model, info, mode)
        core_class = type(attention_cores(model)[0])
        mlp_class = type(model.get_base_model().transformer.encoder.layers[0].mlp)
        originals = {core_class: core_class.forward, mlp_class: mlp_class.forward}

        def counted(cls, name):
            def forward(self, *args, **kwargs):
                calls[name] += 1
                return originals[cls](self, *args, **kwargs)
            return forward

        core_class.forward, mlp_class.forward = counted(core_class, "core"), counted(mlp_class, "mlp")
        try:
            ids = torch.randint(3, 1000, (2, 12))
            batch = backend.coerce({"input_ids": ids, "labels": ids})
            with backend.compute_context():
                model(**batch).loss.backward()
        finally:
            for cls, forward in originals.items():
                cls.forward = forward
    finally:
        loaded.patches.undo()
    return calls["core"], calls["mlp"]


@pytest.mark.parametrize("backend", ["cpu", "mlu"])
def test_selective_recomputes_the_attention_core_and_not_the_mlp(backend, models):
    layers = 2
    with emulating("mlu") if backend == "mlu" else contextlib.nullcontext():
        assert _step_counts(models["remote"], "off", backend) == (layers, layers)
        assert _step_counts(models["remote"], "selective", backend) == (2 * layers, layers)
        assert _step_counts(models["remote"], "full", backend) == (2 * layers, 2 * layers)


def test_both_keys_disagreeing_is_a_config_error(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", training_args__gradient_checkpointing=True,
                          glmport={"dtype": "fp32", "gradient_checkpointing": "selective"})
    result = ok(run_cli("train", data_dir, models["remote"], config, "-q"), exit_code=2)
    assert "glmport.gradient_checkpointing: selective" in result.stderr
    assert "training_args.gradient_checkpointing: true" in result.stderr and "disagree" in result.stderr


def test_selective_is_refused_where_there_is_no_attention_core(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", glmport={"dtype": "fp32", "gradient_checkpointing": "selective"})
    result = ok(run_cli("train", data_dir, models["native"], config, "-q"), exit_code=2)
    assert "glmport.gradient_checkpointing" in result.stderr and "use full" in result.stderr, result.stderr[-2000:]


def test_compile_is_refused_on_emulated_mlu_before_the_model_loads(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", glmport={"dtype": "fp32", "compile": True})
    result = ok(run_cli("train", data_dir, models["remote"], config, "--backend", "mlu", "-q",
                        env={"GLMPORT_EMULATE": "mlu"}), exit_code=2)
    assert "glmport.compile" in result.stderr and "backend mlu" in result.stderr and "emulated" in result.stderr
    assert not (tmp_path / "out" / "run_summary.json").exists()


@pytest.mark.slow  # inductor builds C++ for each layer: about 50 s on a 2-core machine with a cold cache
def test_compiled_layers_train_to_the_eager_loss_on_cpu(models, data_dir, tmp_path):
    _train(tmp_path / "eager", models, data_dir)
    result = _train(tmp_path / "compiled", models, data_dir, compile=True)
    assert "compiled 2 transformer layers" in result.stderr
    assert summary(tmp_path / "compiled")["gradient_checkpointing"]["compiled_layers"] == 2
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == 2 and max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4, (eager, compiled)


@pytest.mark.slow
def test_bench_measures_glmport_with_selective_checkpointing(tmp_path):
    result = ok(run_cli("bench", "--shape", "tiny", "--steps", "2", "--warmup", "1", "--allow-few-steps",
                        "--samples-per-step", "4", "--row-tokens", "1024", "--model-cache", tmp_path,
                        "--checkpointing", "selective", "--json", "-q"))
    reference, ours = json.loads(result.stdout)["results"]
    assert (reference["checkpointing"], ours["checkpointing"]) == ("full", "selective")
    assert "checkpointing selective" in ours["change"] and not ours["compile"]
    assert ours["max_loss_diff_vs_reference"] < 1e-3


def test_auto_takes_the_least_recompute_that_fits():
    from glmport.train.checkpointing import choose

    estimates = {"off": {"above_loaded_model": 900}, "selective": {"above_loaded_model": 500},
                 "full": {"above_loaded_model": 100}}
    assert choose(estimates, 2000)[0] == "off"
    assert choose(estimates, 1000)[0] == "selective"  # off needs 900 of the 800 usable (80%)
    assert choose(estimates, 200)[0] == "full"
    mode, why = choose(estimates, 50)
    assert mode == "full" and "none fits" in why
    assert choose(estimates, None)[0] == "full"  # a backend that does not report free memory: the safe choice


def test_auto_leaves_selective_out_where_the_model_has_no_attention_core(models):
    from types import SimpleNamespace

    from glmport.modeling import inspect_model_dir, load_model
    from glmport.plugins import PluginManager
    from glmport.train.checkpointing import apply_checkpointing
    from glmport.train.methods import apply_method

    plugins = PluginManager(autoload=False)
    cpu = plugins.backends.get("cpu")
    info = inspect_model_dir(models["native"])
    lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    config = SimpleNamespace(training_args={"per_device_train_batch_size": 4}, max_input_length=64,
                             max_output_length=32, peft_config=lora,
                             glmport=SimpleNamespace(packing=None, quantization="none"))
    loaded = load_model(info, cpu, mode="train", dtype=torch.float32, patch_sets=plugins.patch_sets)
    try:
        model = apply_method(loaded.model, info, "lora", lora)
        plan = apply_checkpointing(model, info, "auto", backend=cpu, config=config, method="lora")
    finally:
        loaded.patches.undo()
    assert plan["mode"] == "off" and set(plan["estimated_bytes"]) == {"off", "full"}
    assert plan["tokens_per_micro_batch"] == 4 * 97 and plan["free_bytes"] > 0
