"""Each exit status of ``glmport`` means one thing (``glmport.errors.EXIT_CODES``), seen through the command line.

Bad input, an unavailable backend and a bug are real commands; the statuses that need a long run to reach
(the 64-bit policy, a diverging loss, an interruption) come from a command whose handler raises what the
run would raise. SIGTERM is sent for real, to a fresh interpreter.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import glmport.cli.info
from glmport.cli import REPORT_LINE
from glmport.errors import (
    BackendUnavailable,
    ConfigError,
    Interrupted,
    SixtyFourBitError,
    TrainingDiverged,
)
from glmport.testing import ok, run_cli

CHAT = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "chat.jsonl"


def _plugins_command_raises(monkeypatch, exc: BaseException) -> None:
    def handler(args, manager):
        raise exc

    monkeypatch.setattr(glmport.cli.info, "cmd_plugins", handler)


def test_a_bad_config_exits_2_with_every_problem_and_no_traceback(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("training_args:\n  max_steps: many\n")
    result = ok(run_cli("train", config), exit_code=2)
    assert f"{config}:2: training_args.max_steps: expected int, got 'many'" in result.stderr
    assert "no model folder given" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_usage_error_exits_2():
    result = ok(run_cli("train"), exit_code=2)
    assert "the following arguments are required" in result.stderr


def test_an_unavailable_backend_exits_3_and_says_why():
    result = ok(run_cli("--backend", "mlu", "data", "check", CHAT), exit_code=3)
    assert "backend 'mlu' is not available: torch_mlu is not installed" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_internal_error_exits_1_with_the_traceback_and_a_request_to_report_it(monkeypatch):
    _plugins_command_raises(monkeypatch, ZeroDivisionError("a bug"))
    result = ok(run_cli("plugins"), exit_code=1)
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: a bug" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == REPORT_LINE


@pytest.mark.parametrize("exc, status, message", [
    (ConfigError("training_args.max_steps: expected int"), 2, "glmport: error: training_args.max_steps: expected int"),
    (BackendUnavailable("backend 'npu' is not available"), 3, "glmport: error: backend 'npu' is not available"),
    (SixtyFourBitError("aten.mm got an int64 tensor"), 4, "glmport: error: aten.mm got an int64 tensor"),
    (TrainingDiverged("the training loss became NaN/inf at step 3"), 5,
     "glmport: error: the training loss became NaN/inf at step 3"),
    (KeyboardInterrupt(), 130, "glmport: interrupted"),
    (Interrupted("interrupted by SIGTERM"), 130, "glmport: interrupted by SIGTERM"),
], ids=["bad-input", "backend-unavailable", "64-bit", "diverged", "ctrl-c", "sigterm"])
def test_each_error_exits_with_its_own_status(monkeypatch, exc, status, message):
    _plugins_command_raises(monkeypatch, exc)
    result = ok(run_cli("plugins"), exit_code=status)
    assert result.stderr.strip() == message


SIGTERM_SCRIPT = textwrap.dedent('''
    import multiprocessing, os, signal, sys, time
    import glmport.cli.info
    from glmport.cli import main

    def sleep_in_child():
        time.sleep(30)

    def handler(args, manager):
        # a worker forked during the command (a data loader, a datasets pool) dies the default way
        child = multiprocessing.get_context("fork").Process(target=sleep_in_child)
        child.start()
        child.terminate()
        child.join(10)
        print(f"child exit code {child.exitcode}", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        return 0

    glmport.cli.info.cmd_plugins = handler
    status = main(["plugins"])
    print(f"handler restored {signal.getsignal(signal.SIGTERM) is signal.SIG_DFL}", flush=True)
    sys.exit(status)
''')


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_exits_130_and_leaves_forked_workers_alone():
    """In a fresh interpreter: SIGTERM unwinds the command like Ctrl-C, then the default action is back."""
    done = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stdout + done.stderr
    assert done.stderr.strip() == "glmport: interrupted by SIGTERM"
    assert done.stdout.splitlines() == [f"child exit code {-signal.SIGTERM}", "handler restored True"]
