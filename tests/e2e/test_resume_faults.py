"""Resume edge cases, checkpoint manifests and preemption: each case checks the exit status, the message
and what is left on disk (no result that looks complete after a failure, no lost checkpoint)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from e2e_cli import summary, write_config
from safetensors.torch import load_file

from glmport.testing import ok, run_cli
from glmport.train.checkpoints import read_manifest, sha256_file

pytestmark = pytest.mark.slow

BACKENDS = [pytest.param({}, id="cpu"), pytest.param({"GLMPORT_EMULATE": "mlu"}, id="mlu-emulated")]
# four quick steps, a checkpoint every two, no evaluation: the runs these cases start from
QUICK = dict(training_args__max_steps=4, training_args__save_steps=2, training_args__eval_strategy="no",
             training_args__predict_with_generate=False, training_args__lr_scheduler_type="constant",
             data_config={"train_file": "train.jsonl"}, glmport={"dtype": "fp32", "plot": False})


def _train(data_dir, model, config, *args, env=None):
    backend = ["--backend", "mlu"] if env else []
    return run_cli("train", data_dir, model, config, *args, *backend, "-q", env=env, in_process=False)


def _adapter_bytes(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("env", BACKENDS)
def test_resume_on_a_finished_run_publishes_without_training(models, data_dir, tmp_path, env):
    config = write_config(tmp_path, "lora", **QUICK)
    ok(_train(data_dir, models["native"], config, env=env))
    first = _adapter_bytes(tmp_path / "out" / "final")
    for _ in range(2):  # twice: each time nothing is left to train ("41/40" before)
        result = ok(_train(data_dir, models["native"], config, "yes", env=env))
        s = summary(tmp_path)
        assert (s["steps"], s["max_steps"], s["trained_steps"]) == (4, 4, 0)
        assert "nothing left to train" in result.stdout
        assert s["history"] == [{"from_step": 0, "to_step": 4, "backend": "mlu" if env else "cpu", "dtype": "float32",
                                 "emulated": bool(env)}]
        assert _adapter_bytes(tmp_path / "out" / "final") == first
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_resume_on_another_backend_says_where_the_steps_ran(models, data_dir, tmp_path):
    """A finished CPU fp32 run published again from emulated mlu is not relabelled as trained there."""
    config = write_config(tmp_path, "lora", **QUICK)
    ok(_train(data_dir, models["native"], config))
    ok(_train(data_dir, models["native"], config, "yes", env={"GLMPORT_EMULATE": "mlu"}))
    s = summary(tmp_path)
    assert s["backend"] == "mlu" and s["trained_steps"] == 0
    assert [(h["backend"], h["dtype"]) for h in s["history"]] == [("cpu", "float32")]


def test_checkpoint_past_max_steps_is_refused_and_an_earlier_one_publishes(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", **QUICK)
    ok(_train(data_dir, models["native"], config))
    final_before = _adapter_bytes(tmp_path / "out" / "final")
    refused = _train(data_dir, models["native"], config, "yes", "training_args.max_steps=2")
    assert refused.returncode == 2, refused.stderr
    assert "checkpoint-4 is at step 4, past training_args.max_steps 2" in refused.stderr
    assert "RESUME N; complete: checkpoint-2" in refused.stderr
    assert _adapter_bytes(tmp_path / "out" / "final") == final_before  # nothing touched
    ok(_train(data_dir, models["native"], config, "2", "training_args.max_steps=2"))
    s = summary(tmp_path)
    assert (s["steps"], s["trained_steps"]) == (2, 0)
    checkpoint_2 = load_file(str(tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors"))
    published = load_file(str(tmp_path / "out" / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(checkpoint_2[k], published[k]) for k in checkpoint_2)


def test_every_checkpoint_has_a_manifest(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", **QUICK)
    ok(_train(data_dir, models["native"], config))
    folder = tmp_path / "out" / "checkpoint-4"
    manifest = read_manifest(folder)
    assert manifest["step"] == 4
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert entry["size"] == (folder / name).stat().st_size
        assert entry["sha256"] == sha256_file(folder / name)
    fingerprint = manifest["fingerprint"]
    assert fingerprint["settings"]["peft_config"]["r"] == 4
    assert fingerprint["settings"]["training_args.learning_rate"] == 5e-3
    assert set(fingerprint["hashes"]) == {"model config.json", "data_config.train_file"}
    assert {"glmport", "torch", "transformers", "peft"} <= set(manifest["versions"])


@pytest.mark.parametrize("damage", ["truncate-adapter", "truncate-optimizer", "delete-state"])
def test_a_corrupt_checkpoint_is_skipped_and_the_newest_good_one_used(models, data_dir, tmp_path, damage):
    config = write_config(tmp_path, "lora", **QUICK)
    ok(_train(data_dir, models["native"], config))
    straight = _adapter_bytes(tmp_path / "out" / "final")
    latest = tmp_path / "out" / "checkpoint-4"
    if damage == "delete-state":
        (latest / "trainer_state.json").unlink()
    else:
        victim = latest / ("adapter_model.safetensors" if damage == "truncate-adapter" else "optimizer.pt")
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    result = ok(_train(data_dir, models["native"], config, "yes"))
    assert "checkpoint-4 is corrupt" in result.stderr + result.stdout
    assert (tmp_path / "out" / "checkpoint-4.corrupt").is_dir()
    s = summary(tmp_path)
    assert s["resumed_from"].endswith("checkpoint-2") and (s["steps"], s["trained_steps"]) == (4, 2)
    assert _adapter_bytes(tmp_path / "out" / "final") == straight  # retrained to the same weights
    # naming the corrupt one explicitly is an error saying what is wrong
    (tmp_path / "out" / "checkpoint-4").rename(tmp_path / "out" / "retrained-4")
    (tmp_path / "out" / "checkpoint-4.corrupt").rename(tmp_path / "out" / "checkpoint-4")
    refused = _train(data_dir, models["native"], config, "4")
    assert refused.returncode == 2 and "RESUME 4:" in refused.stderr and "is corrupt" in refused.stderr


@pytest.mark.parametrize("change, forceable, expected", [
    ("peft_config.r=8", False, "peft_config: {"),
    ("training_args.learning_rate=0.001", True, "training_args.learning_rate: 0.005 -> 0.001"),
    ("data", True, "data_config.train_file: content changed"),
])
def test_resuming_a_changed_run_is_refused(models, data_dir, tmp_path, change, forceable, expected):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes((data_dir / "train.jsonl").read_bytes())
    config = write_config(tmp_path, "lora", **QUICK)
    ok(_train(data, models["native"], config, "training_args.max_steps=2"))
    overrides = []
    if change == "data":
        lines = (data / "train.jsonl").read_text().splitlines()
        (data / "train.jsonl").write_text("\n".join(lines[1:]) + "\n")
    else:
        overrides.append(change)
    refused = _train(data, models["native"], config, "yes", *overrides)
    assert refused.returncode == 2, refused.stderr
    assert expected in refused.stderr
    assert ("--force-resume" in refused.stderr) is forceable
    assert summary(tmp_path)["steps"] == 2  # the earlier run's result is untouched
    forced = _train(data, models["native"], config, "yes", *overrides, "--force-resume")
    if forceable:
        ok(forced)
        assert "--force-resume: continuing although the run changed" in forced.stderr + forced.stdout
        assert summary(tmp_path)["steps"] == 4
    else:
        assert forced.returncode == 2 and "weights do not fit this run" in forced.stderr


def test_save_total_limit_keeps_the_last_complete_checkpoint_until_the_next_is_complete(
        models, data_dir, tmp_path, monkeypatch):
    """The Trainer rotates old checkpoints before glmport marks the new one complete; a crash in between
    must still leave one complete checkpoint (in-process, with the manifest write failing at step 4)."""
    import glmport.train.trainer as trainer_module

    real = trainer_module.write_manifest

    def failing(folder, step, **kwargs):
        if step == 4:
            raise OSError(28, "No space left on device")
        return real(folder, step, **kwargs)

    monkeypatch.setattr(trainer_module, "write_manifest", failing)
    config = write_config(tmp_path, "lora", **QUICK, training_args__save_total_limit=1)
    failed = run_cli("train", data_dir, models["native"], config, "-q")
    assert failed.exit_code != 0
    out = tmp_path / "out"
    assert read_manifest(out / "checkpoint-2") is not None  # still there, still complete
    assert not (out / "final").exists() and not (out / "run_summary.json").exists()
    monkeypatch.setattr(trainer_module, "write_manifest", real)
    ok(run_cli("train", data_dir, models["native"], config, "yes", "-q"))
    assert summary(tmp_path)["resumed_from"].endswith("checkpoint-2")
    assert read_manifest(out / "checkpoint-4") is not None


# --------------------------------------------------------------------------------------------- signals


def _start(data_dir, model, config, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glmport", "train", str(data_dir), str(model), str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(process: subprocess.Popen, text: str, seen: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return
        assert time.monotonic() < deadline, "".join(seen[-40:])
    raise AssertionError(f"the run ended before printing {text!r}:\n" + "".join(seen[-40:]))


LONG = dict(QUICK, training_args__max_steps=12, training_args__save_steps=100, training_args__logging_steps=1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_resume_is_exact(models, data_dir, tmp_path, signum):
    straight = tmp_path / "straight"
    straight.mkdir()
    ok(_train(data_dir, models["native"], write_config(straight, "lora", **LONG)))
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    config = write_config(stopped, "lora", **LONG)
    process, seen = _start(data_dir, models["native"], config), []
    _wait_for(process, "step 3/12", seen)
    process.send_signal(signum)
    rest, _ = process.communicate(timeout=300)
    output = "".join(seen) + rest
    assert process.returncode == 130, output
    assert "finishing this step and writing a checkpoint" in output
    step = int(output.split(f"stopped by {signal.Signals(signum).name} after step ")[1].split(":")[0])
    assert 3 <= step < 12
    out = stopped / "out"
    assert read_manifest(out / f"checkpoint-{step}") is not None
    assert not (out / "final").exists() and not (out / "run_summary.json").exists()
    ok(_train(data_dir, models["native"], config, "yes"))
    assert summary(stopped)["resumed_from"].endswith(f"checkpoint-{step}")
    a = load_file(str(straight / "out" / "final" / "adapter_model.safetensors"))
    b = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed after a signal, the adapter differs from a straight run"


def test_a_second_signal_aborts_at_once_and_keeps_the_last_complete_checkpoint(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", **dict(LONG, training_args__save_steps=2))
    process, seen = _start(data_dir, models["native"], config), []
    _wait_for(process, "step 5/12", seen)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=300)
    output = "".join(seen) + rest
    assert process.returncode == 130, output
    out = tmp_path / "out"
    complete = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                      if p.name.split("-")[1].isdigit() and read_manifest(p) is not None)
    assert complete and complete[0] == 2  # earlier complete checkpoints are untouched
    assert not (out / "final").exists() and not (out / "run_summary.json").exists()
    ok(_train(data_dir, models["native"], config, "yes"))
    assert summary(tmp_path)["steps"] == 12


def test_sigterm_before_training_says_so(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", **LONG)
    process, seen = _start(data_dir, models["native"], config), []
    _wait_for(process, "patches for", seen)  # loading the model
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=300)
    output = "".join(seen) + rest
    assert process.returncode == 130 and "SIGTERM" in output, output
    assert not (tmp_path / "out" / "final").exists()
