"""``glmport.testing.run_cli`` and ``ok``: what an in-process run captures, and what it puts back."""

from __future__ import annotations

import logging
import os

import pytest

import glmport.cli.info
from glmport.testing import CliResult, ok, run_cli


@pytest.fixture
def plugins_command(monkeypatch):
    """``plugins_command(handler)``: ``glmport plugins`` runs ``handler(args, manager)`` instead."""
    def install(handler):
        monkeypatch.setattr(glmport.cli.info, "cmd_plugins", handler)

    return install


def test_in_process_captures_output_logging_and_applies_the_environment(plugins_command, monkeypatch, tmp_path):
    monkeypatch.setenv("GLMPORT_TEST_KEPT", "outer")
    monkeypatch.setenv("GLMPORT_TEST_REMOVED", "outer")
    root_handlers = logging.getLogger().handlers[:]
    seen = {}

    def handler(args, manager):
        seen.update(cwd=os.getcwd(), kept=os.environ.get("GLMPORT_TEST_KEPT"),
                    removed=os.environ.get("GLMPORT_TEST_REMOVED"), added=os.environ.get("GLMPORT_TEST_ADDED"))
        os.environ["GLMPORT_TEST_SET_BY_COMMAND"] = "1"
        print("to stdout")
        logging.getLogger("glmport.somewhere").warning("a warning through logging")
        return 0

    plugins_command(handler)
    result = ok(run_cli("plugins", cwd=tmp_path, env={"GLMPORT_TEST_ADDED": "yes", "GLMPORT_TEST_REMOVED": None}))
    assert seen == {"cwd": str(tmp_path), "kept": "outer", "removed": None, "added": "yes"}
    assert result.stdout == "to stdout\n" and "a warning through logging" in result.stderr
    assert result.in_process and result.returncode == result.exit_code == 0
    assert os.getcwd() != str(tmp_path) and logging.getLogger().handlers == root_handlers
    assert os.environ["GLMPORT_TEST_REMOVED"] == "outer"
    assert "GLMPORT_TEST_ADDED" not in os.environ and "GLMPORT_TEST_SET_BY_COMMAND" not in os.environ


def test_argparse_exits_become_exit_statuses():
    assert ok(run_cli("--version")).stdout.startswith("glmport ")
    assert "usage: glmport" in ok(run_cli("--help")).stdout
    assert "invalid choice" in ok(run_cli("no-such-command"), exit_code=2).stderr


def test_pythonpath_is_refused_in_process():
    with pytest.raises(ValueError, match="in_process=False"):
        run_cli("plugins", env={"PYTHONPATH": "/somewhere"})


def test_ok_shows_the_command_and_its_output_when_the_status_is_wrong():
    result = CliResult(("train", "x.yaml"), 2, "out " * 2000, "glmport: error: x.yaml: not found\n", in_process=True)
    with pytest.raises(AssertionError) as failure:
        ok(result)
    message = str(failure.value)
    assert "expected exit status 0" in message and "glmport train x.yaml  (in process) exited 2" in message
    assert "glmport: error: x.yaml: not found" in message and len(message) < 5000  # the tail of stdout only
    assert ok(result, exit_code=2) is result


def test_a_subprocess_runs_python_dash_m_glmport():
    result = ok(run_cli("--version", in_process=False))
    assert not result.in_process and result.stdout.startswith("glmport ")
