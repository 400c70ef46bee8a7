"""The output folder of a run: one run at a time, room and permission checked before the first step, a write
that fails (full disk, read-only folder) reported as one clear error that says where to resume from, and files
in the folder that explain the run.

Faults during a save are injected in a fresh interpreter by a shim around ``torch.save`` (the Trainer writes
optimizer state, scheduler state and ``training_args.bin`` with it, in checkpoints and in the result), raising
what a full disk raises; the resumed run then goes on without the shim.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_cli import summary, write_config
from safetensors import SafetensorError

from glmport.config import load_run_config
from glmport.errors import GlmportError, ResumeError
from glmport.testing import ok, run_cli
from glmport.testing.cli import CliResult
from glmport.train.faults import write_fault_reason, write_faults
from glmport.train.lock import OutputLock
from glmport.train.outputs import (
    CHECKPOINT_MARKER,
    CONFIG_FILE,
    ENV_FILE,
    LOCK_FILE,
    METRICS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
)
from glmport.train.resume import plan_resume

ENOSPC = "No space left on device"
# What torch.save raised on a real full tmpfs (torch 2.13): no errno, no "space" anywhere in it.
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
# What safetensors' save_file raised on the same full disk.
SAFETENSORS_FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"
# ... and what tokenizers' save raised (a bare Exception) when the checkpoint's tokenizer.json did not fit.
TOKENIZERS_FULL_DISK = "No space left on device (os error 28)"

FAILING_SAVE = f"""
import errno, os, sys
import torch
from glmport.cli import main

at, shape = os.environ["GLMPORT_TEST_FAIL_SAVE_AT"], os.environ.get("GLMPORT_TEST_FAIL_SHAPE", "oserror")
real_save = torch.save

def save(obj, f, *args, **kwargs):
    if at in str(f):
        if shape == "torch":
            raise RuntimeError({TORCH_FULL_DISK!r})
        raise OSError(errno.ENOSPC, {ENOSPC!r}, str(f))
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.exit(main(sys.argv[1:]))
"""


def _train_with_failing_save(at: str, *args, shape: str = "oserror", env: dict | None = None) -> CliResult:
    """``glmport train ARGS`` in a fresh interpreter whose ``torch.save`` fails for paths containing ``at``."""
    argv = ["train", *(str(a) for a in args)]
    full_env = {**os.environ, "GLMPORT_TEST_FAIL_SAVE_AT": at, "GLMPORT_TEST_FAIL_SHAPE": shape, **(env or {})}
    done = subprocess.run([sys.executable, "-c", FAILING_SAVE, *argv], env=full_env, capture_output=True,
                          text=True, timeout=600)
    return CliResult(tuple(argv), done.returncode, done.stdout, done.stderr, in_process=False)


def _backend_args(backend: str) -> tuple[list[str], dict]:
    return (["--backend", "mlu"], {"GLMPORT_EMULATE": "mlu"}) if backend == "mlu" else ([], {})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- the lock ------------------------------------------------------------------------------------------------

def test_the_lock_names_its_holder_refuses_a_second_and_is_gone_afterwards(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out, "glmport train first.yaml"):
        held = json.loads((out / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        assert held["command"] == "glmport train first.yaml" and held["started"]
        with pytest.raises(GlmportError) as refused:
            OutputLock(out, "glmport train second.yaml").acquire()
        message = str(refused.value)
        assert f"{out} is in use by another glmport run: pid {os.getpid()} on host {socket.gethostname()}" in message
        assert "since " in message and "glmport train first.yaml" in message and "training_args.output_dir" in message
        assert refused.value.exit_code == 2
    assert not (out / LOCK_FILE).exists()
    assert not out.exists()  # the lock created the folder and nothing else was written into it: it goes too


CONTENDER = """
import os, sys, time
from glmport.errors import GlmportError
from glmport.train.lock import OutputLock

out, held = sys.argv[1], 0
deadline = time.monotonic() + 2.0
while time.monotonic() < deadline:
    try:
        with OutputLock(out, "contender"):
            # only the holder may create this file: a second holder at the same time fails here
            fd = os.open(os.path.join(out, "holder"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            os.remove(os.path.join(out, "holder"))
            held += 1
    except GlmportError:
        pass  # busy: try again
print(held)
"""


def test_the_lock_is_exclusive_while_runs_come_and_go(tmp_path):
    """Holders remove the lock file (and the folder they created) when they end, while others open it: the
    lock must still be held by one process at a time."""
    out = tmp_path / "out"
    contenders = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(out)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [c.communicate(timeout=60) for c in contenders]
    assert all(c.returncode == 0 for c in contenders), results
    assert sum(int(stdout) for stdout, _ in results) > 4
    assert not out.exists() or not any(out.iterdir())  # no lock file left, whoever held it last


@pytest.mark.parametrize("where", ["this host", "another host"])
def test_a_lock_file_left_by_a_killed_run_is_taken_over_with_a_note(where, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pid, host = (_dead_pid(), socket.gethostname()) if where == "this host" else (12345, "node-7.cluster")
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host, "started": "2026-01-02T03:04:05+00:00",
                                             "command": "glmport train old.yaml"}))
    with OutputLock(out, "glmport train new.yaml") as lock:
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        (note,) = lock.notes
        assert f"pid {pid} on host {host}" in note and "glmport train old.yaml" in note
        if where == "this host":
            assert "that process no longer exists" in note
        else:
            assert "cannot see processes on node-7.cluster" in note
    assert not (out / LOCK_FILE).exists() and out.is_dir()  # a folder that existed before stays


def test_run_files_go_with_the_run_when_it_starts_over_and_the_lock_never_does(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in (RUN_FILE, CONFIG_FILE, ENV_FILE, METRICS_FILE):
        (out / name).write_text("{}")
    with pytest.raises(ResumeError, match="already holds a run"):  # a run started here (its files say so)
        plan_resume(out, None)
    with OutputLock(out, "glmport train again.yaml"):
        plan = plan_resume(out, "no")
        archived = next(out.glob("superseded-*"))
        assert sorted(p.name for p in archived.iterdir()) == sorted([RUN_FILE, CONFIG_FILE, ENV_FILE, METRICS_FILE])
        assert (out / LOCK_FILE).is_file() and plan.checkpoint is None


# --- write faults ----------------------------------------------------------------------------------------------

def test_failed_writes_are_recognised_by_what_the_libraries_raise(tmp_path, monkeypatch):
    assert write_fault_reason(OSError(errno.ENOSPC, ENOSPC, "x")) == ENOSPC
    assert write_fault_reason(PermissionError(errno.EACCES, "Permission denied")) == "Permission denied"
    assert write_fault_reason(SafetensorError(SAFETENSORS_FULL_DISK)) == ENOSPC
    assert write_fault_reason(Exception(TOKENIZERS_FULL_DISK)) == ENOSPC
    assert write_fault_reason(RuntimeError(TORCH_FULL_DISK)).startswith("torch.save failed")
    assert write_fault_reason(RuntimeError("CUDA error: an illegal memory access")) is None  # not a write
    assert write_fault_reason(ValueError("bad")) is None


def test_a_write_fault_without_a_complete_checkpoint_says_there_is_none(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)  # cut short: no marker
    with pytest.raises(GlmportError) as failed, write_faults("checkpoint-2", out / "checkpoint-2", out,
                                                             resume_flag="RESUME"):
        raise OSError(errno.ENOSPC, ENOSPC, str(out / "checkpoint-2" / "optimizer.pt"))
    message = str(failed.value)
    assert f"could not write checkpoint-2 ({out / 'checkpoint-2' / 'optimizer.pt'}): {ENOSPC}" in message
    assert "no complete checkpoint" in message and "RESUME yes" in message and "free some space" in message
    with pytest.raises(ValueError), write_faults("x", out, out):  # anything else is not a write fault
        raise ValueError("a bug")


# --- before the model loads -----------------------------------------------------------------------------------

def test_an_output_folder_that_cannot_be_created_fails_before_the_model_loads(models, data_dir, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")  # fails for root too, unlike chmod
    config = write_config(tmp_path, "lora", training_args__output_dir=str(blocker / "out"))
    result = run_cli("train", data_dir, models["native"], config, "-q")
    assert result.exit_code == 2, result
    assert f"{blocker / 'out'}: cannot create the output folder" in result.stderr, result.stderr
    assert "Not a directory" in result.stderr and "training_args.output_dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_read_only_output_folder_fails_before_the_model_loads(models, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # what a read-only mount answers, root or not
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    config = write_config(tmp_path, "lora")
    result = run_cli("train", data_dir, models["native"], config, "-q")
    monkeypatch.undo()
    assert result.exit_code == 2, result
    assert f"{out}: cannot write into the output folder" in result.stderr, result.stderr
    assert "Read-only file system" in result.stderr and "Traceback" not in result.stderr
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_not_enough_free_space_stops_before_the_first_step(models, data_dir, tmp_path, monkeypatch):
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=10_000))
    config = write_config(tmp_path, "lora")
    result = run_cli("train", data_dir, models["native"], config, "-q")
    monkeypatch.undo()
    assert result.exit_code == 2, result
    out = tmp_path / "out"
    assert f"{out}: not enough free space" in result.stderr, result.stderr
    assert "trainable parameters" in result.stderr and "9.8 KiB free" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists() and not (out / SUMMARY_FILE).exists()
    run = json.loads((out / RUN_FILE).read_text())
    assert run["outcome"] == "failed" and "not enough free space" in run["error"]


# --- two runs, one folder -------------------------------------------------------------------------------------

def _wait_for_lock(out: Path, process: subprocess.Popen, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the first run ended before it held the lock:\n{process.communicate()}")
        try:
            held = json.loads((out / LOCK_FILE).read_text())
            if held.get("pid") == process.pid:
                return held
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("the first run did not take the lock")


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_fails_at_once_and_the_first_finishes(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", training_args__max_steps=200, training_args__save_steps=100,
                          training_args__logging_steps=50, training_args__eval_strategy="no",
                          training_args__predict_with_generate=False)
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "glmport", "train", str(data_dir), str(models["native"]),
                              str(config), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(out, first)
        for extra, (flags, env) in ((), _backend_args("cpu")), (("yes",), _backend_args("mlu")):
            # `yes` would rename the first run's checkpoint in progress as incomplete: refused before that
            second = run_cli("train", data_dir, models["native"], config, *extra, "-q", *flags, env=env)
            assert second.exit_code == 2, second
            assert f"{out} is in use by another glmport run: pid {first.pid} on host {socket.gethostname()}, " \
                   "since " in second.stderr, second.stderr
            assert f"glmport train {data_dir} {models['native']} {config} -q" in second.stderr
            assert "Traceback" not in second.stderr
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    s = summary(tmp_path)
    assert s["steps"] == 200 and (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-100" / CHECKPOINT_MARKER).is_file() and (out / "checkpoint-200" / CHECKPOINT_MARKER).is_file()
    assert not (out / LOCK_FILE).exists()


# --- faults while saving --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "mlu"])
def test_a_full_disk_at_a_checkpoint_is_one_clear_error_and_resume_continues(backend, models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", training_args__max_steps=6, training_args__eval_strategy="no",
                          training_args__predict_with_generate=False)
    flags, env = _backend_args(backend)
    out = tmp_path / "out"
    failed = _train_with_failing_save("checkpoint-4", data_dir, models["native"], config, "-q", *flags, env=env)
    assert failed.exit_code == 2, failed
    assert f"could not write checkpoint-4 ({out / 'checkpoint-4'}" in failed.stderr, failed.stderr
    assert f"{ENOSPC}" in failed.stderr and "the last complete checkpoint is checkpoint-2" in failed.stderr
    assert "--resume yes" in failed.stderr and "Traceback" not in failed.stderr
    assert (out / "checkpoint-2" / CHECKPOINT_MARKER).is_file()
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / CHECKPOINT_MARKER).exists()
    assert not (out / "final").exists() and not (out / SUMMARY_FILE).exists() and not (out / LOCK_FILE).exists()
    assert json.loads((out / RUN_FILE).read_text())["outcome"] == "failed"

    ok(run_cli("train", data_dir, models["native"], config, "yes", "-q", *flags, env=env, in_process=False))
    s = summary(tmp_path)
    assert s["steps"] == 6 and s["resumed_from"].endswith("checkpoint-2")
    assert (out / "checkpoint-4.incomplete").is_dir() and (out / "checkpoint-4" / CHECKPOINT_MARKER).is_file()
    assert (out / "final" / "adapter_model.safetensors").is_file()
    # one history: the steps the failed run logged after checkpoint-2 were dropped when the resumed run began
    assert [e["step"] for e in _metrics(out) if "loss" in e] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_full_disk_at_publish_publishes_nothing_and_resume_publishes(models, data_dir, tmp_path):
    config = write_config(tmp_path, "lora", training_args__eval_strategy="no", training_args__predict_with_generate=False)
    out = tmp_path / "out"
    failed = _train_with_failing_save(".final.partial", data_dir, models["native"], config, "-q", shape="torch")
    assert failed.exit_code == 2, failed
    assert f"could not write the result ({out / '.final.partial'}): torch.save failed" in failed.stderr, failed.stderr
    assert "nothing was published" in failed.stderr and "the last complete checkpoint is checkpoint-4" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not (out / "final").exists() and not list(out.glob(".final*")) and not (out / SUMMARY_FILE).exists()
    assert (out / "checkpoint-4" / CHECKPOINT_MARKER).is_file()

    ok(run_cli("train", data_dir, models["native"], config, "yes", "-q", in_process=False))
    assert summary(tmp_path)["steps"] == 4 and (out / "final" / "adapter_model.safetensors").is_file()


# --- a run folder explains itself -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_folder_explains_itself(models, data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()  # a run killed with SIGKILL left its lock file behind
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead, "host": socket.gethostname(),
                                             "started": "2026-01-02T03:04:05+00:00", "command": "glmport train x"}))
    config = write_config(tmp_path, "lora", training_args__eval_steps=2, training_args__predict_with_generate=False)
    result = ok(run_cli("train", data_dir, models["native"], config, "-q", "training_args.learning_rate=1e-3",
                        in_process=False))
    assert f"took over the lock file left by pid {dead} on host {socket.gethostname()}" in result.stderr, result
    assert not (out / LOCK_FILE).exists()

    text = (out / CONFIG_FILE).read_text()
    assert f"# source: {config}" in text and "# overrides: training_args.learning_rate=1e-3" in text
    again = load_run_config(out / CONFIG_FILE)  # the resolved config trains again as it is
    assert again.training_args["learning_rate"] == 1e-3 and again.training_args["max_steps"] == 4
    assert again.model_dir == Path(models["native"]).resolve() and again.data_dir == Path(data_dir).resolve()

    env = json.loads((out / ENV_FILE).read_text())
    assert env.keys() >= json.loads(ok(run_cli("env", "--json")).stdout).keys()

    run = json.loads((out / RUN_FILE).read_text())
    assert run["command"].startswith("python -m glmport train") and run["pid"] and run["host"]
    assert run["config"]["overrides"] == ["training_args.learning_rate=1e-3"]
    assert run["patches"] and run["model"]["kind"] == "native" and run["trainable_parameters"] > 0
    assert run["outcome"] == "finished" and run["ended"]

    metrics = _metrics(out)
    assert [e["step"] for e in metrics if "loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in metrics if "eval_loss" in e] == [2, 4]
    assert any(n.startswith("WARNING: took over the lock file") for n in summary(tmp_path)["notes"])
