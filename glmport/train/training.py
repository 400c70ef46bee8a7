"""The training step of a run: train from the start or a checkpoint, stop cleanly on a signal, and do
nothing at all when the checkpoint resumed from already reached the end.

A resumed run whose checkpoint is at ``max_steps`` (a crash during final evaluation, publishing or test
prediction; a full disk at publish; ``--resume yes`` on a finished run) must not train: transformers'
loop would run one more step each time ("41/40"). The checkpoint's weights and trainer state are loaded
instead, and the run goes on to publish them; the summary says no step was trained in this process.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from transformers import TrainerState
from transformers.trainer import TRAINER_STATE_NAME

from glmport.train.signals import GracefulStop
from glmport.train.state import TrainingRun

log = logging.getLogger("glmport")


def planned_steps(trainer) -> int:
    """The optimizer steps this run trains to: ``max_steps``, or what ``num_train_epochs`` comes to."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    batches = len(trainer.get_train_dataloader())
    return math.ceil(batches / args.gradient_accumulation_steps) * math.ceil(args.num_train_epochs)


def announce(run: TrainingRun) -> None:
    """Say before the first step what the run decided (resume point, data skipped, dtype...)."""
    for note in run.notes:
        log.warning(note) if note.startswith("WARNING") else log.info(note)


def train(run: TrainingRun, trainer, *, resume_step: int) -> int:
    """Train (or restore, see module docs). Returns the number of optimizer steps this process trained."""
    planned = planned_steps(trainer) if run.resume_from is not None else None  # epochs: builds a dataloader
    if planned is not None and resume_step >= planned:
        restore_finished(trainer, run.resume_from)
        run.notes.append(f"nothing left to train: {Path(run.resume_from).name} is at step {resume_step} of "
                         f"{planned}; published it without training")
        log.info(run.notes[-1])
        return 0
    stop = GracefulStop(run.ranks, trainer)
    trainer.add_callback(stop)
    with stop:
        trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    trainer.raise_if_diverged()
    stop.raise_if_stopped(run.request.resume_flag)
    return trainer.state.global_step - resume_step


def restore_finished(trainer, checkpoint: Path) -> None:
    """The checkpoint's weights into the model and its state into the trainer, without a training step."""
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
