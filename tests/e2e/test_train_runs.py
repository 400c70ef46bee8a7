"""Runs of `glmport train` as users start them: resume, crashes, plugins, upstream arguments, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from e2e_cli import summary, write_config
from safetensors.torch import load_file

from glmport.testing import ok, run_cli

HERE = Path(__file__).resolve().parent


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resume_gives_the_same_adapter_as_a_straight_run(models, data_dir, tmp_path):
    """6 steps straight vs 3 steps, then resume to 6: same final adapter (CPU, constant learning rate)."""
    settings = dict(training_args__lr_scheduler_type="constant", training_args__save_steps=3,
                    training_args__eval_strategy="no", training_args__predict_with_generate=False,
                    training_args__max_steps=6, data_config={"train_file": "train.jsonl"})
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    straight.mkdir()
    halves.mkdir()
    ok(run_cli("train", data_dir, models["native"], write_config(straight, "lora", **settings), "-q", in_process=False))
    first = write_config(halves, "lora", **settings)
    ok(run_cli("train", data_dir, models["native"], first, "-q", "training_args.max_steps=3", in_process=False))
    assert summary(halves)["steps"] == 3
    ok(run_cli("train", data_dir, models["native"], first, "yes", "-q", in_process=False))
    resumed = summary(halves)
    assert resumed["steps"] == 6 and resumed["resumed_from"].endswith("checkpoint-3")
    a, b = _adapter(straight / "out" / "final"), _adapter(halves / "out" / "final")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


@pytest.mark.slow
def test_hooks_are_called_and_a_crash_leaves_no_result(models, data_dir, tmp_path):
    events = tmp_path / "events.jsonl"
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "GLMPORT_TEST_HOOKS_OUT": str(events), "GLMPORT_TEST_CRASH_AT_STEP": "3"}
    config = write_config(tmp_path, "lora", training_args__eval_strategy="no")
    crashed = run_cli("-p", "hooks_plugin", "train", data_dir, models["native"], config, "-q", env=env, in_process=False)
    assert crashed.exit_code == 1 and "simulated crash at step 3" in crashed.stderr, crashed  # a plugin's bug
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "glmport_checkpoint.json").is_file()
    assert not (out / "final").exists() and not (out / "run_summary.json").exists()
    assert not list(out.glob(".final*"))

    env["GLMPORT_TEST_CRASH_AT_STEP"] = "never"
    ok(run_cli("-p", "hooks_plugin", "train", data_dir, models["native"], config, "yes", "-q", env=env, in_process=False))
    seen = [json.loads(line) for line in events.read_text().splitlines()]
    hooks = [e["hook"] for e in seen]
    assert hooks.count("glmport_trainer_callbacks") == 2 and hooks.count("glmport_before_train") == 2
    assert hooks.count("glmport_after_train") == 1  # not after the crash
    assert seen[hooks.index("glmport_trainer_callbacks")] == {"hook": "glmport_trainer_callbacks", "method": "lora",
                                                                "backend": "cpu"}
    resumed = [e for e in seen if e["hook"] == "glmport_before_train"][1]
    assert resumed["resume_from"].endswith("checkpoint-2")
    steps_after_resume = [e["step"] for e in seen[len(seen) // 2:] if e["hook"] == "callback"]
    assert steps_after_resume[-1] == 4
    assert seen[-1]["hook"] == "glmport_after_train" and seen[-1]["steps"] == 4
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_upstream_form_with_the_advertisegen_file(models, shared_data, tmp_path, repo_root):
    """`glmport train DATA_DIR MODEL_DIR configs/lora.yaml` with the real AdvertiseGen file."""
    overrides = ["data_config.train_file=dev.jsonl", "data_config.val_file=dev.jsonl", "data_config.test_file=null",
                 "training_args.max_steps=3", "training_args.save_steps=3", "training_args.eval_steps=3",
                 f"training_args.output_dir={tmp_path / 'out'}", "training_args.per_device_eval_batch_size=4",
                 "training_args.generation_config.max_new_tokens=4", "training_args.report_to=none",
                 "training_args.dataloader_num_workers=0", "glmport.eval_samples=4"]
    result = ok(run_cli("train", shared_data / "advertisegen", models["remote"], repo_root / "configs" / "lora.yaml",
                        *overrides, in_process=False))
    s = summary(tmp_path)
    assert s["steps"] == 3 and s["data"]["train"]["records"] == 1070 and s["model_kind"] == "remote"
    assert "evaluation_strategy" not in result.stderr  # the shipped config already uses eval_strategy


@pytest.mark.slow
def test_skip_invalid_writes_every_skipped_record(models, data_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = (data_dir / "train.jsonl").read_text().splitlines()
    lines.insert(2, '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}')
    lines.insert(5, "{not json")
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "dev.jsonl").write_text((data_dir / "dev.jsonl").read_text())
    config = write_config(tmp_path, "lora", training_args__max_steps=2, training_args__eval_strategy="no",
                          training_args__save_strategy="no")
    failed = run_cli("train", data, models["native"], config, "-q")  # fails before the model loads
    assert failed.exit_code == 2, failed
    assert "train.jsonl:3" in failed.stderr and "train.jsonl:6" in failed.stderr
    assert not (tmp_path / "out" / "final").exists()
    ok(run_cli("train", data, models["native"], config, "-q", "glmport.skip_invalid=true", in_process=False))
    report = [json.loads(line) for line in (tmp_path / "out" / "skipped_records.jsonl").read_text().splitlines()]
    assert [r["source"].rsplit(":", 1)[-1] for r in report] == ["3", "6"]
    assert summary(tmp_path)["data"]["train"]["skipped"] == 2


@pytest.mark.parametrize("case", ["bad_type", "missing_file", "missing_checkpoint", "unavailable_backend", "use_cpu_conflict"])
def test_bad_input_fails_before_the_model_loads(case, models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora")
    args, env, expected = [], {}, ""
    if case == "bad_type":
        args, expected = ["training_args.max_steps=many"], "training_args.max_steps: expected int, got 'many'"
    elif case == "missing_file":
        args, expected = ["data_config.val_file=nope.jsonl"], "data_config.val_file:"
    elif case == "missing_checkpoint":
        args, expected = ["7"], "RESUME 7:"
    elif case == "unavailable_backend":
        args, expected = ["--backend", "mlu"], "torch_mlu is not installed"
    else:
        args, expected = ["training_args.use_cpu=true", "--backend", "mlu"], "use_cpu: true asks for the CPU"
        env = {"GLMPORT_EMULATE": "mlu"}
    result = run_cli("train", data_dir, models["native"], config, *args, env=env)
    assert result.exit_code == (3 if case == "unavailable_backend" else 2), result
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_quickstart_config_trains_and_the_loss_falls(repo_root, tmp_path):
    result = ok(run_cli("train", repo_root / "configs" / "quickstart.yaml", "-q",
                        f"training_args.output_dir={tmp_path / 'out'}", f"glmport.model_dir={tmp_path / 'model'}",
                        f"glmport.data_dir={tmp_path / 'data'}", "training_args.report_to=none",
                        "training_args.max_steps=80", "training_args.eval_steps=80", "training_args.save_steps=80",
                        in_process=False))
    s = summary(tmp_path)
    assert s["steps"] == 80 and s["first_loss"] - s["last_loss"] > 3.0
    assert (tmp_path / "out" / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "predictions.jsonl").is_file()
    assert "glmport train: lora" in result.stdout


@pytest.mark.slow
def test_a_diverging_run_stops_and_publishes_nothing(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", training_args__eval_strategy="no", training_args__save_steps=1,
                          training_args__learning_rate=1e30, training_args__max_grad_norm=0.0)
    result = run_cli("train", data_dir, models["native"], config, "-q", in_process=False)
    assert result.returncode == 5 and "became NaN/inf at step" in result.stderr, result.stderr
    out = tmp_path / "out"
    assert not (out / "final").exists() and not (out / "run_summary.json").exists()
    for folder in out.glob("checkpoint-*"):  # only steps from before the divergence are marked complete
        state = json.loads((folder / "trainer_state.json").read_text())
        assert all(isinstance(e.get("loss", 0.0), float) for e in state["log_history"])


@pytest.mark.slow
def test_backend_flag_works_with_emulation_set_in_the_config(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", glmport={"emulate": "mlu", "dtype": "fp32", "eval_samples": 2},
                          training_args__max_steps=2, training_args__save_strategy="no", training_args__eval_strategy="no")
    ok(run_cli("train", data_dir, models["native"], config, "--backend", "mlu", "-q", in_process=False))
    assert summary(tmp_path)["emulated"] is True
