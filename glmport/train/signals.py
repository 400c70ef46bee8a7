"""Preemption: SIGTERM and SIGINT during training stop the run cleanly at a step boundary.

Clusters preempt jobs with SIGTERM and people press Ctrl-C. While the Trainer trains:

* the first signal lets the current optimizer step finish, writes a complete checkpoint of that step
  (manifest last, like every checkpoint), prints where it stopped, and the run exits with the
  "interrupted" status (130) without publishing a result;
* a second signal aborts at once. Whatever checkpoint was being written stays unmarked and is renamed
  ``checkpoint-N.incomplete`` by the next resume; earlier complete checkpoints are untouched.

Outside training (loading, evaluation after the last step, publishing) the command line's own handling
applies: the run unwinds at once and publishes nothing.

Several processes (the scale-out issue) must agree on the stop step; that belongs with the launcher.
"""

from __future__ import annotations

import signal
import threading

from transformers import TrainerCallback

from glmport.errors import Interrupted, SignalInterrupt

HANDLED = (signal.SIGINT, signal.SIGTERM)


class GracefulStop(TrainerCallback):
    """Installed around ``trainer.train()`` (a context manager) and added to the trainer as a callback."""

    def __init__(self) -> None:
        self.requested: str | None = None  # the signal's name, once one arrived during training
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    # --- the signal handlers, installed for the duration of training ---------------------------------
    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise SignalInterrupt(f"aborted at once by a second signal ({name}); checkpoints marked complete are intact "
                              "(resume with --resume yes)")
        self.requested = name
        print(f"[glmport] {name}: finishing this step and writing a checkpoint, then stopping "
              "(send it again to abort at once)", flush=True)

    # --- the trainer side: stop at the next step boundary, with a checkpoint -------------------------
    def on_step_end(self, args, state, control, **kwargs):
        if self.requested is not None and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def raise_if_stopped(self, resume_flag: str) -> None:
        """After ``train()``: a run stopped by a signal publishes nothing and says how to go on."""
        if self.stopped_at is not None:
            raise Interrupted(f"stopped by {self.requested} after step {self.stopped_at}: checkpoint-{self.stopped_at} "
                              f"is complete; continue with {resume_flag} yes")
