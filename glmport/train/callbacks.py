"""Trainer callbacks: one progress line per logging step."""

from __future__ import annotations

import logging
import sys
import time

from transformers import TrainerCallback

log = logging.getLogger("glmport")


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


class ProgressCallback(TrainerCallback):
    """One line per logging step: step, loss, learning rate, tokens/s, ETA. Eval results get a line too."""

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
        if state.global_step:
            self._print(f"resumed at step {state.global_step}/{state.max_steps}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            done = state.global_step - self.start_step
            rate = (self.trainer.tokens_seen - self.start_tokens) / elapsed
            eta = (state.max_steps - state.global_step) * elapsed / max(done, 1)
            lr = logs.get("learning_rate")
            parts = [f"step {state.global_step}/{state.max_steps}", f"loss {logs['loss']:.4f}"]
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
