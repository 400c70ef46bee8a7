"""What a ``glmport train`` run is asked to do, and what it holds as it goes (plugins see the latter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from glmport.train.ranks import Ranks

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from glmport.backend import Backend, Selection
    from glmport.config import RunConfig
    from glmport.data.templates import Template
    from glmport.modeling import LoadedModel
    from glmport.train.dataset import Datasets
    from glmport.train.trainer import GlmTrainer


@dataclass
class TrainRequest:
    """The command line: ``glmport train CONFIG`` or the upstream ``DATA_DIR MODEL_DIR CONFIG [RESUME]``."""

    config: Path
    overrides: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    model_dir: Path | None = None
    resume: str | None = None
    resume_flag: str = "RESUME"  # how the resume argument was given, for errors: RESUME or --resume
    backend: str | None = None
    allow_unverified_patches: bool = False  # --allow-unverified-patches (else the config decides)
    trust_remote_code: bool | None = None  # --trust-remote-code / --no-trust-remote-code (else the config)
    force_resume: bool = False  # resume although the checkpoint's fingerprint differs (--force-resume)


@dataclass
class TrainingRun:
    """Everything about one run; plugins receive it in the training hooks.

    The first four fields are known once the inputs are checked; the rest are filled in as the recipe
    (:func:`glmport.train.recipe.run_training`) loads the model, builds the data and the trainer.
    """

    request: TrainRequest
    config: RunConfig
    selection: Selection
    output_dir: Path
    guard_mode: str | None = None  # None: off; "error" or "report" (see glmport.train.guarded)
    resume_from: Path | None = None  # None: a fresh start
    notes: list[str] = field(default_factory=list)  # shown at the end of the summary
    loaded: LoadedModel | None = None
    template: Template | None = None
    datasets: Datasets | None = None
    model: torch.nn.Module | None = None  # the model being trained (peft-wrapped for LoRA / prefix tuning)
    trainer: GlmTrainer | None = None
    trained_steps: int = 0  # optimizer steps this process trained (0: a finished checkpoint was published)
    ranks: Ranks = field(default_factory=Ranks)  # this process among the run's processes (one by default)

    @property
    def backend(self) -> Backend:
        return self.selection.backend

    @property
    def method(self) -> str:
        return self.config.method
