"""Run a :class:`~glmport.launch.plan.LaunchPlan` through ``torch.distributed.run``, in this process.

This process becomes torchrun's elastic agent for this node: it starts the ranks, copies their output to
the console (each line prefixed ``[rankN]:``) and into a log file per rank, and when one rank fails it
stops the others (SIGTERM, then SIGKILL after torchrun's shutdown timeout) instead of leaving them waiting
in a collective. What torchrun reports about a failure is turned into one message: the rank, its exit
status, the error it recorded (:mod:`glmport.launch.worker`) and the last lines of its log. The launcher
exits with that rank's status, so a job controller sees 2 for bad input, 4 for the 64-bit policy, 5 for
divergence, 130 for an interruption, as from a single process.

A signal to the launcher (Ctrl-C, a scheduler's SIGTERM) is forwarded to every rank by the agent; the ranks
agree on the step to stop at and write its checkpoint (:mod:`glmport.train.signals`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
from pathlib import Path

from glmport import errors
from glmport.errors import EXIT_CODES, GlmportError, Interrupted
from glmport.launch.plan import LaunchPlan
from glmport.train.environment import EnvironmentChanges

log = logging.getLogger("glmport")

LOG_TAIL_LINES = 20
RELAYED = "RankFailed:"  # a rank that stopped because another one failed (glmport.train.ranks) says so


class LaunchFailed(GlmportError):
    """A rank of a launched run failed; the launcher exits with that rank's exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_plan(plan: LaunchPlan) -> None:
    """Start this node's ranks and wait for them; raises :class:`LaunchFailed` when a rank fails."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(plan.torchrun_args())
    log.info("starting %d process(es) on this node (node %d of %d) through torch.distributed.run; logs in %s",
             plan.request.nproc_per_node, plan.request.node_rank, plan.request.nnodes, plan.log_dir)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with EnvironmentChanges() as env:  # the ranks inherit the launcher's environment plus the plan's
        for key, value in plan.environment.items():
            env.set(key, value)
        try:
            run(args)
        except ChildFailedError as failed:
            raise LaunchFailed(*describe_failure(failed, plan.log_dir)) from None
        except SignalException as stopped:
            name = signal.Signals(stopped.sigval).name
            raise Interrupted(f"{name}: the ranks were told to stop; a run in training stops after the current step "
                              f"with a complete checkpoint (continue with --resume yes); their logs: {plan.log_dir}") from None
        finally:
            for signum, handler in handlers.items():  # the agent installs its own while it runs
                signal.signal(signum, handler)
    shutil.rmtree(plan.log_dir, ignore_errors=True)  # every rank's output went to the console too


def describe_failure(failed, log_dir: Path) -> tuple[str, int]:
    """(message, exit status) for torchrun's ``ChildFailedError``: the rank that failed first, preferring
    one that failed on its own over one that stopped because another did."""
    failures = sorted(failed.failures.items(), key=lambda item: (_blame(item[1]), item[1].timestamp, item[0]))
    rank, failure = failures[0]
    status = failure.exitcode
    if status < 0:  # killed by a signal
        name = signal.Signals(-status).name if -status in signal.Signals._value2member_map_ else f"signal {-status}"
        what = f"was killed by {name}"
        code = Interrupted.exit_code if -status in (signal.SIGINT, signal.SIGTERM) else 1
    else:
        what = f"exited with status {status}"
        code = status if status in EXIT_CODES and status != 0 else 1
    lines = [f"rank {rank} (local rank {failure.local_rank} on this node, pid {failure.pid}) {what}: {_message(failure)}"]
    others = [r for r, _ in failures[1:]]
    if others:
        lines.append(f"    {'rank' if len(others) == 1 else 'ranks'} {', '.join(map(str, others))} failed too")
    logfile, tail = _log_tail(log_dir, failure.local_rank)
    if tail:
        lines.append(f"    its last {len(tail)} log lines ({logfile}):")
        lines += [f"    | {line}" for line in tail]
    lines.append("    the other ranks of this node were stopped; complete checkpoints are kept: fix the cause, then run "
                 "the same command with --resume yes")
    return "\n".join(lines), code


def _relayed(failure) -> bool:
    return _message(failure).startswith(RELAYED)


# What a rank's collective raises when the peer it talks to has died: that rank failed because another did.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


# The signals a rank gets from outside when another one failed: the agent's SIGTERM (or SIGINT) and, after its
# shutdown timeout, SIGKILL. Any other signal (SIGABRT, SIGSEGV, SIGBUS, ...) is the rank's own crash.
STOPPED_BY_AGENT = (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)


def _blame(failure) -> int:
    """0: the rank failed on its own (an error, or a crash such as SIGABRT); 1: it was stopped by a signal
    the agent sends when another rank failed; 2: it only relayed another rank's failure (a stop agreed
    between ranks, or a collective whose peer had gone)."""
    if _relayed(failure) or any(text in _message(failure) for text in PEER_GONE):
        return 2
    return 1 if -failure.exitcode in STOPPED_BY_AGENT else 0


def _message(failure) -> str:
    """The error the rank recorded. torchrun's handler writes ``TypeName: text``; a glmport error's name adds
    nothing to its message (which says what to do), a bug's type is kept."""
    data = failure.message
    if isinstance(data, dict):  # the ErrorHandler format: {"message": ..., "extraInfo": {...}}
        data = data.get("message", "")
    text = str(data or "").strip()
    if text.startswith("To enable traceback"):  # torchrun's placeholder for a rank that recorded nothing
        return "it recorded no error (see its log)"
    name, sep, rest = text.partition(": ")
    if sep and name != "RankFailed" and isinstance(getattr(errors, name, None), type):
        return rest
    return text


def _log_tail(log_dir: Path, local_rank: int) -> tuple[Path | None, list[str]]:
    """The last lines of the rank's stderr (or stdout, when stderr is empty) in torchrun's log folder."""
    for stream in ("stderr.log", "stdout.log"):
        files = sorted(Path(log_dir).glob(f"*/attempt_*/{local_rank}/{stream}"))
        if not files:
            continue
        with contextlib.suppress(OSError):
            lines = [line for line in files[-1].read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
            if lines:
                return files[-1], lines[-LOG_TAIL_LINES:]
    return None, []
