"""A plugin for test_multiprocess.py: things that happen to one rank of a multi-process run.

Loaded with `glmport -p multiprocess_plugin` (this folder on PYTHONPATH). At the end of step
GLMPORT_TEST_AT_STEP, on rank GLMPORT_TEST_RANK only, it does GLMPORT_TEST_ACTION:

* ``raise``: raises, as a bug in a rank would;
* ``sigterm-launcher``: sends SIGTERM to the launcher (its parent process), as a scheduler preempting the job
  does; the launcher forwards it to every rank.
* ``sigkill-launcher``: kills the launcher outright (SIGKILL), as the OOM killer or a node agent can; the
  ranks must not outlive it.

Every rank appends ``{"rank", "step"}`` to GLMPORT_TEST_STEPS_OUT (when set) at each step end, so a test
can see that both ranks took part.
"""

from __future__ import annotations

import json
import os
import signal

from transformers import TrainerCallback

from glmport import hookimpl


class RankEvents(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        if os.environ.get("GLMPORT_TEST_STEPS_OUT"):
            with open(os.environ["GLMPORT_TEST_STEPS_OUT"], "a", encoding="utf-8") as out:
                out.write(json.dumps({"rank": rank, "step": state.global_step, "pid": os.getpid()}) + "\n")
        if rank != int(os.environ.get("GLMPORT_TEST_RANK", "-1")) or \
                state.global_step != int(os.environ.get("GLMPORT_TEST_AT_STEP", "-1")):
            return
        action = os.environ.get("GLMPORT_TEST_ACTION")
        if action == "raise":
            raise RuntimeError(f"simulated failure on rank {rank} at step {state.global_step}")
        if action == "sigterm-launcher":
            os.kill(os.getppid(), signal.SIGTERM)
        if action == "sigkill-launcher":
            os.kill(os.getppid(), signal.SIGKILL)


@hookimpl
def glmport_trainer_callbacks(run):
    return [RankEvents()]
