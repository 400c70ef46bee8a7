"""Real multi-process runs of `glmport train --nproc-per-node 2` on the CPU (gloo), and on emulated MLU.

Two processes with half the per-device batch each see the same global batch as one process: with the same
seed they train the same weights. Measured on a 2-core CPU (tiny models, 4 steps): LoRA adapters differ by
at most 7e-8 and full SFT weights by 4e-5 (output layer 3e-6) between one and two processes, the logged
losses agree to 5 digits. (P-Tuning v2 of ChatGLM3 is not compared: its prefix goes through a dropout that
draws other masks for two half batches than for one whole.) The tolerances below leave room for reduction order, nothing more: a head whose
gradients were not synchronized, or a rank that trained on its own, is off by orders of magnitude.

These tests start two training processes each and are kept in one xdist group: on a 2-core machine two of
them at once would only slow each other down.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from e2e_cli import summary, write_config
from safetensors.torch import load_file

from glmport.launch.plan import free_port
from glmport.testing import ok, run_cli

HERE = Path(__file__).resolve().parent
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]

TWO = ("--nproc-per-node", "2", "training_args.per_device_train_batch_size=2")  # global batch 4, as one process
QUICK = dict(training_args__eval_strategy="no", training_args__predict_with_generate=False,
             training_args__lr_scheduler_type="constant", training_args__save_steps=10,
             data_config={"train_file": "train.jsonl"})


def _plugin_env(**values) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            **{f"GLMPORT_TEST_{key.upper()}": str(value) for key, value in values.items()}}


def _train(*args, env=None):
    return run_cli("train", *args, "-q", env=env, in_process=False)


def _losses(folder: Path) -> list[float]:
    lines = (folder / "out" / "metrics.jsonl").read_text().splitlines()
    return [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]


def _ranks_per_step(steps_file: Path) -> dict[int, set[int]]:
    seen: dict[int, set[int]] = {}
    for entry in map(json.loads, steps_file.read_text().splitlines()):
        seen.setdefault(entry["step"], set()).add(entry["rank"])
    return seen


def _assert_close(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], atol: float) -> None:
    assert one.keys() == two.keys()
    worst = max(((one[k] - two[k]).abs().max().item(), k) for k in one)
    assert worst[0] <= atol, f"{worst[1]} differs by {worst[0]:.2e} between one and two processes"


def test_lora_on_two_processes_matches_one_and_resumes_after_sigterm(models, data_dir, tmp_path):
    """One process, batch 4; two processes, batch 2 each: same losses, same adapter. The two-process run is
    preempted (SIGTERM to the launcher at step 2): every rank stops after the same step with one complete
    checkpoint, and `--resume yes` finishes it."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    ok(_train(data_dir, models["native"], write_config(one, "lora", **QUICK)))

    config = write_config(two, "lora", **QUICK)
    steps = tmp_path / "steps.jsonl"
    env = {**_plugin_env(rank=1, at_step=2, action="sigterm-launcher", steps_out=steps), "TMPDIR": str(tmp_path)}
    stopped = _train("-p", "multiprocess_plugin", data_dir, models["native"], config, *TWO, env=env)
    ok(stopped, exit_code=130)
    at = int(re.search(r"stopped by \S+ after step (\d+)", stopped.stdout + stopped.stderr).group(1))
    out = two / "out"
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{at}"]
    assert (out / f"checkpoint-{at}" / "glmport_checkpoint.json").is_file()  # complete: every rank wrote its part
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (out / f"checkpoint-{at}").iterdir()}
    assert not (out / "final").exists()
    assert json.loads((out / "glmport_run.json").read_text())["outcome"] == "interrupted"
    assert _ranks_per_step(steps)[1] == {0, 1}  # both ranks trained

    ok(_train("-p", "multiprocess_plugin", data_dir, models["native"], config, *TWO, "--resume", "yes", env=env))
    resumed = summary(two)
    assert (resumed["steps"], resumed["processes"]) == (4, 2)
    assert resumed["resumed_from"].endswith(f"checkpoint-{at}")
    assert resumed["history"][-1]["processes"] == 2
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    _assert_close(load_file(str(one / "out" / "final" / "adapter_model.safetensors")),
                  load_file(str(out / "final" / "adapter_model.safetensors")), atol=1e-6)


def test_full_sft_under_plain_torchrun_trains_the_output_layer_like_one_process(models, data_dir, tmp_path):
    """Full SFT of ChatGLM3 remote code, the two processes started by torchrun itself (as a user or a job
    script does): the output layer trains, and the label-row loss applies it inside DDP's forward, so its
    gradients are reduced like every other layer's."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    ok(_train(data_dir, models["remote"], write_config(one, "sft", **QUICK)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "-m", "glmport", "train", str(data_dir), str(models["remote"]),
                str(write_config(two, "sft", **QUICK)), "training_args.per_device_train_batch_size=2", "-q"]
    done = subprocess.run(torchrun, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary(two)["processes"] == 2
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    first = load_file(str(one / "out" / "final" / "model.safetensors"))
    second = load_file(str(two / "out" / "final" / "model.safetensors"))
    _assert_close(first, second, atol=2e-4)
    head = "transformer.output_layer.weight"
    assert (second[head] - first[head]).abs().max() < 1e-5
    assert not torch.equal(second[head], load_file(str(models["remote"] / "model.safetensors"))[head])  # it trained


def test_two_emulated_mlu_processes_run_the_mlu_path_with_the_guard(models, data_dir, tmp_path):
    """Each rank binds its own mlu:N under MLU_VISIBLE_DEVICES, cncl runs as gloo (and the log says so), and
    the 64-bit guard checks every rank's steps, evaluation and the test split's generation."""
    config = write_config(tmp_path, "lora", training_args__eval_steps=4, data_config={
        "train_file": "train.jsonl", "val_file": "dev.jsonl", "test_file": "dev.jsonl"})
    env = {"GLMPORT_EMULATE": "mlu", "GLMPORT_EMULATE_DEVICE_COUNT": "2"}
    result = ok(run_cli("train", data_dir, models["remote"], config, *TWO, env=env, in_process=False))
    log = result.stdout + result.stderr
    assert "collective cncl, run as gloo by the emulator" in log
    assert "rank 0: mlu:0 (emulated on the CPU)" in log and "rank 1: mlu:1 (emulated on the CPU)" in log
    s = summary(tmp_path)
    assert (s["backend"], s["emulated"], s["processes"]) == ("mlu", True, 2)
    guard = s["guard_64bit"]
    assert guard["mode"] == "error" and guard["leaks"] == [] and guard["ops_checked"] > 1000
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [row["source"] for row in rows] == [f"{data_dir / 'dev.jsonl'}:{n}" for n in range(1, 9)]
    env_file = json.loads((tmp_path / "out" / "glmport_env.json").read_text())["environment"]
    assert env_file["MLU_VISIBLE_DEVICES"] == "0,1" and env_file["WORLD_SIZE"] == "2"


def test_a_failing_rank_is_reported_with_its_number_and_its_last_lines(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", **QUICK)
    env = {**_plugin_env(rank=1, at_step=1, action="raise"), "TMPDIR": str(tmp_path)}  # the kept rank logs
    result = ok(_train("-p", "multiprocess_plugin", data_dir, models["native"], config, *TWO, env=env), exit_code=1)
    report = result.stderr[result.stderr.index("glmport: error: "):]
    assert report.startswith("glmport: error: rank 1 (local rank 1 on this node")
    assert "RuntimeError: simulated failure on rank 1 at step 1" in report.splitlines()[0]
    tail = [line for line in report.splitlines() if line.startswith("    | ")]
    assert tail and "simulated failure on rank 1" in tail[-2] + tail[-1]
    log = re.search(r"its last \d+ log lines \((.+)\):", report).group(1)
    assert Path(log).is_relative_to(tmp_path) and "simulated failure on rank 1" in Path(log).read_text()
    assert "the other ranks of this node were stopped" in report
    out = tmp_path / "out"
    assert not (out / "final").exists() and not (out / "run_summary.json").exists()


def test_bad_input_stops_every_rank_with_its_message(models, data_dir, tmp_path):
    """Every rank checks the data; none is left waiting for a rank that stopped. Bad input exits 2, as one
    process does."""
    (tmp_path / "bad.jsonl").write_text((data_dir / "train.jsonl").read_text() + '{"conversations": 7}\n')
    config = write_config(tmp_path, "lora", **{**QUICK, "data_config": {"train_file": str(tmp_path / "bad.jsonl")}})
    result = ok(_train(data_dir, models["native"], config, *TWO, env={"TMPDIR": str(tmp_path)}), exit_code=2)
    assert re.search(r"glmport: error: rank \d \(local rank \d on this node, pid \d+\) exited with status 2", result.stderr)
    assert "bad.jsonl:33" in result.stderr
    assert not (tmp_path / "out").exists()


def test_ranks_do_not_outlive_a_launcher_that_was_killed(models, data_dir, tmp_path):
    """SIGKILL to the launcher (the OOM killer, a node agent) leaves it no chance to stop the ranks: the kernel
    sends them SIGTERM when it dies, and they stop as on a preemption, at an agreed step with a complete
    checkpoint, instead of training on or waiting in a collective with nobody to report to."""
    config = write_config(tmp_path, "lora", **{**QUICK, "training_args__max_steps": 40})
    steps = tmp_path / "steps.jsonl"
    env = {**_plugin_env(rank=1, at_step=2, action="sigkill-launcher", steps_out=steps), "TMPDIR": str(tmp_path)}
    killed = _train("-p", "multiprocess_plugin", data_dir, models["native"], config, *TWO, env=env)
    assert killed.returncode == -9
    pids = {entry["pid"] for entry in map(json.loads, steps.read_text().splitlines())}
    assert len(pids) == 2
    deadline = time.monotonic() + 120
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids), "a rank outlived its launcher"
    last = max(entry["step"] for entry in map(json.loads, steps.read_text().splitlines()))
    assert last < 40  # stopped, not trained to the end
    checkpoints = list((tmp_path / "out").glob("checkpoint-*"))
    assert checkpoints and all((c / "glmport_checkpoint.json").is_file() for c in checkpoints)
    assert not (tmp_path / "out" / "final").exists()
    assert json.loads((tmp_path / "out" / "glmport_run.json").read_text())["outcome"] == "interrupted"
    logs = [log.read_text() for log in tmp_path.glob("glmport-*/*/attempt_0/*/stderr.log")]
    assert len(logs) == 2 and all("stopped by SIGHUP after step" in log for log in logs), logs
