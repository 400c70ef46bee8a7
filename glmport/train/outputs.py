"""What a run writes into its output folder (``training_args.output_dir``), named once.

::

    OUTPUT_DIR/
      checkpoint-N/               the Trainer's checkpoints; complete once glmport_checkpoint.json is in
                                  them, and .glmport_writing exists while they are being written
      final/                      the trained result (glmport_result.json says what it holds)
      run_summary.json            steps, losses, timings and paths of the last run
      predictions.jsonl           test-split predictions next to their references
      loss.png                    the loss curve
      runs/                       TensorBoard logs
      skipped_records.jsonl       records skipped with glmport.skip_invalid, and why
      glmport_run.json            the run: command line, pid, host, times, backend, model, patches, outcome
      glmport_config.yaml         the config as glmport understood it (overrides applied); trains again as is
      glmport_env.json            what `glmport env --json` reported when the run started
      metrics.jsonl               one JSON line per logged step or evaluation, appended as training goes
      .glmport.lock               held while a run is going (see glmport.train.lock); never archived
      superseded-<time>/          an earlier run moved aside by RESUME no (or RESUME N)

Files are written to a temporary name and renamed into place, so none of them is ever seen half-written
(``metrics.jsonl`` is appended to, one whole line at a time).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

RESULT_DIR = "final"
RESULT_FILE = "glmport_result.json"  # inside RESULT_DIR: what it holds and which base model it needs
SUMMARY_FILE = "run_summary.json"
PREDICTIONS_FILE = "predictions.jsonl"
LOSS_PLOT = "loss.png"
TENSORBOARD_DIR = "runs"
SKIPPED_RECORDS = "skipped_records.jsonl"
RUN_FILE = "glmport_run.json"  # written when the run starts, refreshed once the model is loaded and at the end
CONFIG_FILE = "glmport_config.yaml"
ENV_FILE = "glmport_env.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".glmport.lock"  # belongs to whichever run holds the folder, not to a run: never archived

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_MARKER = "glmport_checkpoint.json"  # written last: the checkpoint is complete
WRITING_MARKER = ".glmport_writing"  # present while a checkpoint is being written
SUPERSEDED_PREFIX = "superseded-"

# Any of these in an output folder means it already holds a run (checkpoints count too).
# The files of the run's own record are written only once its input checks have passed: they mean a run started.
RUN_OUTPUTS = (RESULT_DIR, SUMMARY_FILE, LOSS_PLOT, PREDICTIONS_FILE, TENSORBOARD_DIR, SKIPPED_RECORDS,
               RUN_FILE, CONFIG_FILE, ENV_FILE, METRICS_FILE)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole, or is as it was: a failed write (a full disk) leaves no ``.partial`` behind."""
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
