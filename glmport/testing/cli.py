"""Run the ``glmport`` command line from tests: in this process, or in a fresh interpreter.

::

    from glmport.testing import ok, run_cli

    result = ok(run_cli("backends", "--json"))            # exit status 0, else fail showing the output
    assert json.loads(result.stdout)["selected"] == "npu"

    result = run_cli("train", "run.yaml", "--backend", "npu", env={"GLMPORT_EMULATE": None})
    ok(result, exit_code=3)                               # backend unavailable: see glmport.errors.EXIT_CODES

    ok(run_cli("train", "run.yaml", in_process=False))    # `python -m glmport train run.yaml`

**In process** (the default) calls :func:`glmport.cli.main` with ``sys.stdout``, ``sys.stderr`` and
logging captured (the root logger starts without handlers, as in a fresh interpreter, and is restored
afterwards: pytest's ``caplog`` does not see these records; a logger with a handler of its own, such as
transformers', writes where that handler does), ``env`` applied to ``os.environ``, and ``cwd``
as the working directory. Afterwards the environment is restored as a whole, whatever the command set.
It costs no interpreter start-up (importing torch and transformers takes seconds), and the tests see
the exit status ``main`` returns, the one ``python -m glmport`` exits with.

**In a subprocess** (``in_process=False``) runs ``python -m glmport`` with the same interpreter. Use it
when the process itself is what you test: what importing does (import-time state, import time), a plugin
found through ``PYTHONPATH``, signals, or a run that leaves state behind in the interpreter (a whole
training run loads remote code and sets global torch state).

``env`` adds to the current environment; a value of ``None`` removes the variable. In process,
``PYTHONPATH`` cannot take effect and is refused: put the folder on ``sys.path`` instead (pytest's
``monkeypatch.syspath_prepend``), or run in a subprocess. ``timeout`` (seconds) bounds a subprocess only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CliResult", "ok", "run_cli"]

SHOWN_STDOUT = 4000  # characters of each stream that a failure message shows (the end: where errors are)
SHOWN_STDERR = 6000


@dataclass(frozen=True)
class CliResult:
    """What one ``glmport`` command did. ``returncode`` is ``exit_code`` under subprocess's name."""

    args: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    in_process: bool

    @property
    def returncode(self) -> int:
        return self.exit_code

    def __str__(self) -> str:
        how = "in process" if self.in_process else "in a subprocess"
        return (f"glmport {' '.join(self.args)}  ({how}) exited {self.exit_code}\n"
                f"--- stdout (last {SHOWN_STDOUT} characters) ---\n{self.stdout[-SHOWN_STDOUT:]}\n"
                f"--- stderr (last {SHOWN_STDERR} characters) ---\n{self.stderr[-SHOWN_STDERR:]}")


def ok(result: CliResult, exit_code: int = 0) -> CliResult:
    """Return ``result`` if the command exited with ``exit_code`` (0 by default); otherwise fail with the
    command, its exit status and the end of its stdout and stderr."""
    __tracebackhide__ = True
    if result.exit_code != exit_code:
        raise AssertionError(f"expected exit status {exit_code}\n{result}")
    return result


def run_cli(*args, env: Mapping[str, str | None] | None = None, cwd: str | Path | None = None,
            in_process: bool = True, timeout: float = 600) -> CliResult:
    """Run ``glmport ARGS`` (each argument passed through ``str``) and return a :class:`CliResult`."""
    argv = tuple(str(a) for a in args)
    if not in_process:
        full_env = dict(os.environ)
        _apply(full_env, env or {})
        done = subprocess.run([sys.executable, "-m", "glmport", *argv], env=full_env, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
        return CliResult(argv, done.returncode, done.stdout, done.stderr, in_process=False)

    if env and "PYTHONPATH" in env:
        raise ValueError("run_cli(env={'PYTHONPATH': ...}) has no effect in process: put the folder on sys.path "
                         "(monkeypatch.syspath_prepend) or pass in_process=False")
    from glmport.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _environment(env or {}), _working_directory(cwd), _fresh_root_logger(), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse: --help, --version and usage errors
            code = _exit_status(exc.code)
    return CliResult(argv, code, out.getvalue(), err.getvalue(), in_process=True)


def _apply(environ: MutableMapping[str, str], overrides: Mapping[str, str | None]) -> None:
    for name, value in overrides.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = str(value)


@contextlib.contextmanager
def _environment(overrides: Mapping[str, str | None]):
    saved = dict(os.environ)
    _apply(os.environ, overrides)
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        for name, value in saved.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


@contextlib.contextmanager
def _working_directory(cwd):
    if cwd is None:
        yield
        return
    before = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _fresh_root_logger():
    """The root logger as a new interpreter has it (no handlers, level WARNING), so that a command's
    ``logging.basicConfig`` takes effect and writes to the captured stderr; restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers = handlers
        root.setLevel(level)


def _exit_status(code) -> int:
    """The status ``sys.exit(code)`` gives a process: None is 0, a message is printed and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
