"""A plugin used by test_train_runs.py: implements the training hooks and records what it saw.

Loaded with `glmport -p hooks_plugin` (this folder on PYTHONPATH). GLMPORT_TEST_HOOKS_OUT names the file it
appends JSON lines to; GLMPORT_TEST_CRASH_AT_STEP makes its callback raise at that step (a crash)."""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback

from glmport import hookimpl


def _record(**event) -> None:
    with open(os.environ["GLMPORT_TEST_HOOKS_OUT"], "a", encoding="utf-8") as out:
        out.write(json.dumps(event) + "\n")


class StepRecorder(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        _record(hook="callback", step=state.global_step)
        if str(state.global_step) == os.environ.get("GLMPORT_TEST_CRASH_AT_STEP"):
            raise RuntimeError(f"simulated crash at step {state.global_step}")


@hookimpl
def glmport_trainer_callbacks(run):
    _record(hook="glmport_trainer_callbacks", method=run.method, backend=run.backend.name)
    return [StepRecorder()]


@hookimpl
def glmport_before_train(run):
    _record(hook="glmport_before_train", resume_from=str(run.resume_from) if run.resume_from else None)


@hookimpl
def glmport_after_train(run, summary):
    _record(hook="glmport_after_train", steps=summary["steps"], result=summary["outputs"]["result"])
