"""One ``glmport train`` run, from a config file to a published result.

:func:`run_training` is the whole run, in order, and the order is the point: everything that can be
wrong with the user's input (launch, config keys, backend, DeepSpeed, training arguments, data files,
resume argument) is checked before the model is loaded; the model is loaded through the backend's patch
session; the Trainer trains; the result is published atomically, so a crash never leaves output that
looks complete. Each step lives in its own module; this one only says when it happens.

The step modules that import torch and transformers at their top are imported at one point, once the
config and the backend are known to be usable, so that importing this module (and ``glmport --help``)
stays light.
"""

from __future__ import annotations

import contextlib
import time

from glmport.train.environment import EnvironmentChanges
from glmport.train.guarded import guard_mode_for
from glmport.train.inputs import (
    check_deepspeed,
    check_model_code,
    load_config_and_backend,
    output_folder,
    prepare_inputs,
    read_records,
)
from glmport.train.lock import OutputLock
from glmport.train.outputs import TENSORBOARD_DIR
from glmport.train.ranks import Ranks
from glmport.train.resume import plan_resume
from glmport.train.state import TrainingRun, TrainRequest


def run_training(request: TrainRequest, manager) -> dict:
    """Train, save, evaluate the test split, plot, summarize. Returns the summary (``run_summary.json``).

    One process, or one of several (:mod:`glmport.train.ranks`): every rank checks the inputs and loads the
    model; rank 0 alone holds the output folder, decides where the run starts and writes what is shared;
    each step that can fail on one rank is agreed, so that all of them stop with the same error."""
    started = time.time()
    ranks = Ranks.from_environ()
    with contextlib.ExitStack() as cleanup:
        env = cleanup.enter_context(EnvironmentChanges())
        # 1. Inputs that need no model: config, backend, DeepSpeed. Then the processes meet.
        config, selection = load_config_and_backend(request, manager)  # one error lists the problems of both
        cleanup.enter_context(selection.backend.activate())
        check_deepspeed(config, selection.backend, env)
        ranks.connect(selection.backend, timeout_s=float(config.training_args.get("ddp_timeout", 1800)))
        cleanup.push(lambda failed, *_: ranks.close(finished=failed is None))
        if not ranks.is_main:  # one set of loading bars is enough
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        run = TrainingRun(request, config, selection, output_folder(config), ranks=ranks)
        run.guard_mode = guard_mode_for(config.glmport.guard_64bit, run.backend)
        # The output folder is this run's until it ends (a second run is refused here), and it can be written.
        lock = ranks.on_main(lambda: cleanup.enter_context(OutputLock(run.output_dir)).notes)

        # 2. Training arguments, data files, resume plan. The modules below import torch/transformers.
        from glmport.train.arguments import training_arguments
        from glmport.train.checkpoints import RunIdentity, fingerprint
        from glmport.train.loading import apply_training_method, build_data, load_base_model
        from glmport.train.publish import publish_result, write_predictions
        from glmport.train.rundir import RunRecord, check_free_space
        from glmport.train.summary import summarize
        from glmport.train.trainer import build_trainer
        from glmport.train.training import announce, train

        has_eval = config.data_config.val_file is not None and config.glmport.eval_samples > 0
        with ranks.agree():
            training_arguments(run, has_eval=has_eval)  # transformers' own checks, before anything is loaded
        ranks.on_main(lambda: prepare_inputs(config))  # rank 0 builds what was asked for; all ranks read it
        with ranks.agree():
            check_model_code(config, run.backend, manager.patch_sets)  # consent to run its code; revisions known
            records = read_records(config)
            identity = fingerprint(config, ranks.world_size)  # model config, data files, the settings of the run
        plan = ranks.on_main(lambda: plan_resume(  # decided once: rank 0 renames and moves old checkpoints
            run.output_dir, request.resume, where=request.resume_flag, run_fingerprint=identity,
            force=request.force_resume, max_steps=config.training_args.get("max_steps")))
        run.resume_from, run.notes = plan.checkpoint, lock + list(plan.notes)
        for key, value in run.backend.environment().items():
            env.set(key, value, keep_existing=True)
        env.set("TENSORBOARD_LOGGING_DIR", str(run.output_dir / TENSORBOARD_DIR), keep_existing=True)
        record = None
        with ranks.agree():
            if ranks.is_main:  # config, env, command line: the run has begun
                record = cleanup.enter_context(RunRecord(run, manager))

        # 3. Model (through the backend's patch session), data, method.
        cleanup.callback(_undo_patches, run)
        load = (ranks.local_first if _runs_remote_code(config) else _agreed(ranks))
        load(lambda: load_base_model(run, manager.patch_sets))
        with ranks.agree():
            build_data(run, records, has_eval)
            apply_training_method(run)
            if record is not None:
                record.model_ready()

        # 4. Train: from the start or the checkpoint; nothing when the checkpoint already reached the end.
        with ranks.agree():
            trainer = build_trainer(run, manager)
        trainer.identity = RunIdentity(identity, plan.manifest, plan.step, run.backend.name,
                                       str(run.loaded.dtype).replace("torch.", ""), run.backend.emulated,
                                       ranks.world_size)
        ranks.on_main(lambda: check_free_space(run))  # room for a checkpoint and the result, before the first step
        if ranks.is_main:
            announce(run)
        manager.hook.glmport_before_train(run=run)
        run.backend.reset_peak_memory()
        run.trained_steps = train(run, trainer, resume_step=plan.step)

        # 5. Publish: the test split's predictions, then the result in one rename, plot and summary (the
        # summary is written last: a run that has one is complete).
        predictions = write_predictions(run) if run.datasets.test is not None else None
        result_dir = publish_result(run)
        summary = summarize(run, started, result_dir, predictions)
        if ranks.is_main:
            manager.hook.glmport_after_train(run=run, summary=summary)
        return summary


def _runs_remote_code(config) -> bool:
    """Remote code is copied into a per-node module cache when it is loaded (transformers' dynamic modules,
    with no lock between processes): the node's first rank goes first, the others then find it there."""
    from glmport.modeling import inspect_model_dir

    return inspect_model_dir(config.model_dir.resolve(), config.glmport.model_family).kind == "remote"


def _agreed(ranks: Ranks):
    def run_everywhere(step):
        with ranks.agree():
            return step()

    return run_everywhere


def _undo_patches(run: TrainingRun) -> None:
    """The model's patches come off when the run ends, however it ends: an in-process caller gets the
    foreign code back as it was."""
    if run.loaded is not None and run.loaded.patches is not None:
        run.loaded.patches.undo()
