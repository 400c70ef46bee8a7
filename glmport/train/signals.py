"""Preemption: SIGTERM and SIGINT during training stop the run cleanly at a step boundary.

Clusters preempt jobs with SIGTERM and people press Ctrl-C. While the Trainer trains:

* the first signal lets the current optimizer step finish, writes a complete checkpoint of that step
  (manifest last, like every checkpoint), prints where it stopped, and the run exits with the
  "interrupted" status (130) without publishing a result;
* a second signal aborts at once. Whatever checkpoint was being written stays unmarked and is renamed
  ``checkpoint-N.incomplete`` by the next resume; earlier complete checkpoints are untouched.

Outside training (loading, evaluation after the last step, publishing) the command line's own handling
applies: the run unwinds at once and publishes nothing.

Several processes stop at the same step: a launcher forwards the signal to each of them, and they do not
get it at the same moment. At every step end the ranks share whether any of them was signalled (and
whether any saw the loss diverge: one collective for both), so all of them stop after the same step and
save that step's checkpoint together. Without it one rank would leave the loop while the others wait for
it in the next step's gradient reduction. Each rank counts only the signals it received itself: the
launcher's copy that reaches a rank after the ranks agreed to stop is its first, not a second that aborts.

A launched rank also stops this way when its launcher dies without stopping it (killed outright): the kernel
sends it SIGHUP then (:func:`glmport.launch.worker.stop_with_launcher`), once for every thread of the dead
launcher it is handed on to, so repeated SIGHUPs count as one and never abort. In a single process, a
SIGHUP that was ignored when training started (``nohup``) stays ignored.
"""

from __future__ import annotations

import signal
import threading

from transformers import TrainerCallback

from glmport.errors import Interrupted, SignalInterrupt

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class GracefulStop(TrainerCallback):
    """Installed around ``trainer.train()`` (a context manager) and added to the trainer as a callback.

    ``ranks`` (:class:`glmport.train.ranks.Ranks`) are the run's processes; ``trainer`` (optional) is asked
    whether this rank saw the loss diverge, so that every rank stops at the step where one did."""

    def __init__(self, ranks=None, trainer=None) -> None:
        self.requested: str | None = None  # the name of the signal this process received during training
        self.reason: str | None = None  # why the run stops: this process's signal, or another rank's
        self.stopped_at: int | None = None
        self.ranks = ranks
        self.trainer = trainer
        self._previous: dict[int, object] = {}

    # --- the signal handlers, installed for the duration of training ---------------------------------
    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # nohup: the user asked for hangups to be ignored
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP and self.requested is not None:
            return  # the launcher's death announced again, not a second request
        if self.requested is not None:
            raise SignalInterrupt(f"aborted at once by a second signal ({name}); checkpoints marked complete are intact "
                              "(resume with --resume yes)")
        self.requested = name
        print(f"[glmport] {name}: finishing this step and writing a checkpoint, then stopping "
              "(send it again to abort at once)", flush=True)

    # --- the trainer side: stop at the next step boundary, with a checkpoint -------------------------
    def on_step_end(self, args, state, control, **kwargs):
        # Read once: a signal may arrive while the ranks agree, and then waits for the next step end here,
        # as it does on the ranks that contributed before it came (deciding on it now would split the ranks).
        signalled = self.requested is not None
        if self.ranks is not None and self.ranks.distributed:
            signalled = self._agree(args, state, control, signalled)
        if signalled and self.stopped_at is None:
            self.reason = self.requested or "a signal to another rank"
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def _agree(self, args, state, control, signalled: bool) -> bool:
        """Whether any rank was signalled, and (same collective) whether any saw the loss diverge."""
        diverged = self.trainer is not None and self.trainer.first_nonfinite_step is not None
        signalled_anywhere, diverged_anywhere = self.ranks.any_of([signalled, diverged], args.device)
        if diverged_anywhere and not diverged:
            self.trainer.first_nonfinite_step = state.global_step  # stop here too, save nothing of it
            control.should_training_stop = True
        return signalled_anywhere

    def raise_if_stopped(self, resume_flag: str) -> None:
        """After ``train()``: a run stopped by a signal publishes nothing and says how to go on."""
        if self.stopped_at is not None:
            raise Interrupted(f"stopped by {self.reason} after step {self.stopped_at}: checkpoint-{self.stopped_at} "
                              f"is complete; continue with {resume_flag} yes")
