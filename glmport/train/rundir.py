"""A run folder that explains itself, and has room for what the run will write into it.

:class:`RunRecord` writes, once the run's input checks have passed and its lock is held (so a folder never
holds them without a run having started there):

* ``glmport_config.yaml``: the config as glmport understood it (overrides applied, legacy keys mapped, folders
  made absolute); its header names the source file and the overrides, and ``glmport train`` takes it as is;
* ``glmport_env.json``: what ``glmport env --json`` reports (versions, backend, environment variables);
* ``glmport_run.json``: command line, pid, host, start time, backend, resume plan; after the model loads, the
  model, its patches and the trainable parameters; at the end, the outcome (``finished``, ``failed`` with the
  error, ``interrupted``). An outcome of null means the run is still going, was killed, or could not record
  its end (the disk was full): ``.glmport.lock`` tells a run still going from the others.

``metrics.jsonl`` is written during training by :class:`glmport.train.callbacks.MetricsLog`.

:func:`check_free_space` runs once the model and the method are built and before the first step: a run that
cannot save one checkpoint and its result is refused then, not after hours of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket

import yaml

from glmport import __version__
from glmport.cli.info import collect_env
from glmport.errors import GlmportError, Interrupted
from glmport.train.faults import size_text, write_faults
from glmport.train.lock import command_line, now_text
from glmport.train.outputs import CONFIG_FILE, ENV_FILE, RUN_FILE, write_json_atomic, write_text_atomic
from glmport.train.state import TrainingRun

log = logging.getLogger("glmport")

ADAM_BYTES = 8  # two fp32 moments per trainable parameter (AdamW, the Trainer's default)
SLACK = 1.2  # trainer state, scheduler, RNG state, model card, file-system overhead
# Files of the model folder that the tokenizer's save_pretrained writes again into each checkpoint and the result
# (a LoRA adapter of a small model is far smaller than its tokenizer.json).
TOKENIZER_FILES = ("tokenizer*", "*.model", "*.tiktoken", "vocab.*", "merges.txt", "special_tokens_map.json")


# --- free space ----------------------------------------------------------------------------------------------

def space_needed(run: TrainingRun) -> tuple[int, str]:
    """Bytes one checkpoint plus the result take, estimated from the model, and how that was counted."""
    params = list(run.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    saved = params if run.config.method == "sft" else trainable  # SFT saves the full model
    result = sum(p.numel() * p.element_size() for p in saved) + _tokenizer_bytes(run.loaded.info.path)
    checkpoint = result + ADAM_BYTES * n_trainable if run.trainer.args.save_strategy != "no" else 0
    needed = int((checkpoint + result) * SLACK)
    how = (f"{n_trainable:,} trainable parameters; {'a checkpoint (weights, Adam states, tokenizer) and ' if checkpoint else ''}"
           f"the result ({'the full model' if run.config.method == 'sft' else 'the trained weights'} and tokenizer), "
           f"plus {SLACK - 1:.0%}")
    return needed, how


def _tokenizer_bytes(model_dir) -> int:
    files = {f for pattern in TOKENIZER_FILES for f in model_dir.glob(pattern) if f.is_file()}
    return sum(f.stat().st_size for f in files)


def check_free_space(run: TrainingRun) -> None:
    """Refuse to train when the output folder's file system cannot take one checkpoint and the result."""
    needed, how = space_needed(run)
    free = shutil.disk_usage(run.output_dir).free
    if free < needed:
        raise GlmportError(
            f"{run.output_dir}: not enough free space for this run: it needs about {size_text(needed)} ({how}), "
            f"and the file system has {size_text(free)} free\n"
            "    -> free some space, or set training_args.output_dir to a folder on a larger disk"
        )


# --- the run's own record ------------------------------------------------------------------------------------

def resolved_config(run: TrainingRun) -> dict:
    """The config in the upstream schema plus the ``glmport:`` section, as this run uses it."""
    config = run.config
    data: dict = {
        "data_config": {k: v for k, v in dataclasses.asdict(config.data_config).items() if v is not None},
        "max_input_length": config.max_input_length,
        "max_output_length": config.max_output_length,
        "training_args": {**config.training_args, "output_dir": str(run.output_dir.resolve())},
    }
    if config.peft_config:
        data["peft_config"] = config.peft_config
    data["combine"] = config.combine
    data["freezeV"] = config.freeze_vision
    data["glmport"] = {**dataclasses.asdict(config.glmport), "data_dir": str(config.data_dir.resolve()),
                       "model_dir": str(config.model_dir.resolve()) if config.model_dir else None}
    return data


def config_yaml(run: TrainingRun) -> str:
    request = run.request
    header = [
        "# The configuration of this glmport run as glmport understood it: overrides applied, renamed keys",
        "# mapped, folders made absolute. `glmport train` takes this file as it is.",
        f"# source: {request.config.resolve()}",
        f"# overrides: {' '.join(request.overrides) if request.overrides else 'none'}",
        f"# command: {command_line()}",
    ]
    body = yaml.safe_dump(resolved_config(run), sort_keys=False, allow_unicode=True, default_flow_style=False)
    return "\n".join(header) + "\n" + body


class RunRecord:
    """``with RunRecord(run, manager) as record:`` writes the run's files now, ``record.model_ready()`` adds
    the model, and leaving the block records the outcome (best effort: the disk may be what failed)."""

    def __init__(self, run: TrainingRun, manager):
        self.run = run
        self.manager = manager
        self.data: dict = {}

    def __enter__(self) -> RunRecord:
        run, request = self.run, self.run.request
        env = collect_env(self.manager, request.backend)  # what `glmport env --json` prints for this command
        env["run_backend"] = {"name": run.backend.name, "how": run.selection.how, "emulated": run.backend.emulated}
        self.data = {
            "glmport": __version__,
            "command": command_line(),
            "cwd": os.getcwd(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now_text(),
            "config": {"source": str(request.config.resolve()), "overrides": list(request.overrides),
                       "resolved": CONFIG_FILE},
            "data_dir": str(run.config.data_dir.resolve()),
            "model_dir": str(run.config.model_dir.resolve()) if run.config.model_dir else None,
            "method": run.method,
            "backend": env["run_backend"],
            "processes": run.ranks.world_size,
            "resume": {"argument": request.resume, "from": str(run.resume_from) if run.resume_from else None},
            "notes": list(run.notes),
            "model": None,
            "patches": None,
            "trainable_parameters": None,
            "outcome": None,
            "ended": None,
            "error": None,
        }
        with self._faults():
            write_text_atomic(run.output_dir / CONFIG_FILE, config_yaml(run))
            write_json_atomic(run.output_dir / ENV_FILE, env)
            write_json_atomic(run.output_dir / RUN_FILE, self.data)
        return self

    def model_ready(self) -> None:
        """After the model is loaded and the method applied: what was loaded and how it was patched."""
        run = self.run
        info = run.loaded.info
        self.data["model"] = {"path": str(info.path), "kind": info.kind, "family": info.family,
                              "dtype": str(run.loaded.dtype).replace("torch.", "")}
        self.data["patches"] = run.loaded.patches.summary() if run.loaded.patches else None
        if run.model is not None:
            self.data["trainable_parameters"] = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        with self._faults():
            write_json_atomic(run.output_dir / RUN_FILE, self.data)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            outcome, error = "finished", None
        elif isinstance(exc, (KeyboardInterrupt, Interrupted)):
            outcome, error = "interrupted", str(exc) or "interrupted"
        else:
            outcome = "failed"
            error = str(exc) if isinstance(exc, GlmportError) else f"{type(exc).__name__}: {exc}"
        self.data.update(outcome=outcome, ended=now_text(), error=error, notes=list(self.run.notes))
        try:
            write_json_atomic(self.run.output_dir / RUN_FILE, self.data)
        except OSError as fault:  # the disk that failed the run may fail this too; the run's error says enough
            if exc is None:
                log.warning("could not record the outcome in %s: %s", self.run.output_dir / RUN_FILE, fault)

    def _faults(self) -> contextlib.AbstractContextManager:
        return write_faults("the run's record", self.run.output_dir, self.run.output_dir,
                            resume_flag=self.run.request.resume_flag, left="training has not started")
