"""Trainer callbacks: one progress line per logging step, and ``metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from glmport.train.faults import write_faults
from glmport.train.outputs import write_text_atomic

log = logging.getLogger("glmport")


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


class ProgressCallback(TrainerCallback):
    """One line per logging step: step, loss, learning rate, tokens/s, ETA. Eval results get a line too.

    Printed by rank 0 only (the loss the Trainer logs is already the mean over ranks); tokens/s is rank 0's
    rate times the number of processes, an estimate: the summary has the measured total."""

    def __init__(self, trainer, stream=None):
        self.trainer = trainer
        self.stream = stream or sys.stdout
        self.start = None
        self.start_step = 0
        self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()
        self.start_step = state.global_step
        self.start_tokens = self.trainer.tokens_seen
        if state.global_step and state.is_world_process_zero:
            self._print(f"resumed at step {state.global_step}/{state.max_steps}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if not state.is_world_process_zero:
            return
        if "loss" in logs:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            done = state.global_step - self.start_step
            rate = (self.trainer.tokens_seen - self.start_tokens) / elapsed * max(args.world_size, 1)
            eta = (state.max_steps - state.global_step) * elapsed / max(done, 1)
            lr = logs.get("learning_rate")
            # transformers' NaN filter logs a stand-in value for a NaN/inf step; say what really happened
            diverged = getattr(self.trainer, "first_nonfinite_step", None)
            shown = "nan (diverged)" if diverged is not None and state.global_step >= diverged else f"{logs['loss']:.4f}"
            parts = [f"step {state.global_step}/{state.max_steps}", f"loss {shown}"]
            if lr is not None:
                parts.append(f"lr {lr:.2e}")
            parts += [f"{rate:,.0f} tok/s", f"eta {format_duration(eta)}"]
            self._print(" | ".join(parts))
        elif "eval_loss" in logs:
            shown = {k[5:]: v for k, v in logs.items() if k.startswith("eval_") and isinstance(v, (int, float))
                     and not k.endswith(("runtime", "per_second"))}
            text = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
            self._print(f"eval at step {state.global_step}: {text}")

    def _print(self, line: str) -> None:
        print(f"[glmport] {line}", file=self.stream, flush=True)


class MetricsLog(TrainerCallback):
    """``metrics.jsonl``: one JSON line per logged step or evaluation (``step``, ``epoch``, ``time``, then what
    the Trainer logged), appended and flushed as it happens, so that a run still going, or killed, can be
    followed and plotted. A resumed run first drops the lines of steps after its checkpoint: they belong to
    the continuation it abandons, and the file keeps reading as one history."""

    def __init__(self, path: Path, *, resume_flag: str = "--resume"):
        self.path = Path(path)
        self.resume_flag = resume_flag

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _step(line) <= state.global_step]
        if len(kept) != len(lines):
            with self._faults():
                write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        entry = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **(logs or {})}
        with self._faults(), open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(entry, default=str) + "\n")
            out.flush()

    def _faults(self):
        return write_faults(self.path.name, self.path, self.path.parent, resume_flag=self.resume_flag,
                            left="training stopped at this step")


def _step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")  # a torn or foreign line: not part of the history being kept
