"""The glmport plugin contract: every hook a plugin can implement, in lifecycle order.

A plugin is a module or object with functions marked ``@glmport.hookimpl`` whose names match the specs
below. Builtin backends and patch sets are plugins of exactly this kind; third-party plugins are found
through the ``glmport`` entry-point group::

    # pyproject.toml of a plugin distribution
    [project.entry-points.glmport]
    npu = "glmport_npu.plugin"

A function in a plugin module whose name starts with ``glmport_`` but matches no spec below is an error
(a misspelled hook would otherwise be silently ignored).

Lifecycle:

1. **Registration** (once, when the plugin manager is built): ``glmport_register_backends``,
   ``glmport_register_patch_sets``.
2. **Reporting** (``glmport env``): ``glmport_env_report``.
3. **Training** (``glmport train``): ``glmport_trainer_callbacks`` while the trainer is assembled,
   ``glmport_before_train`` just before the first step, ``glmport_after_train`` after the final save.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from glmport.backend import Backend, BackendRegistry
    from glmport.patching.registry import PatchRegistry
    from glmport.train.state import TrainingRun

PROJECT = "glmport"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- 1. Registration -------------------------------------------------------------------------------


@hookspec
def glmport_register_backends(registry: BackendRegistry) -> None:
    """Register device backends by calling ``registry.add(backend)`` with a :class:`glmport.backend.Backend`.

    Called once per plugin manager. Registering a name that is already taken is an error naming both
    plugins. Backends must not initialize their device here: registration happens before the user has
    chosen a backend, possibly before a fork.
    """


@hookspec
def glmport_register_patch_sets(registry: PatchRegistry) -> None:
    """Contribute patch sets for ``modeling_chatglm.py`` revisions and native GLM classes by calling
    ``registry.add(patch_set)`` with a :class:`glmport.patching.PatchSet`.

    A third-party backend ships the patches its device needs this way; the patch engine selects them by
    model family, backend name and mode like the builtin ones.
    """


# --- 2. Reporting ----------------------------------------------------------------------------------


@hookspec
def glmport_env_report(backend: Backend | None) -> dict[str, Any] | None:
    """Return extra ``name: value`` entries for ``glmport env`` (driver versions, firmware, ...).

    ``backend`` is the selected backend, or ``None`` when none is available. Return ``None`` to add
    nothing. Entries appear under the plugin's name in the human output and in ``--json``.
    """


# --- 3. Training -----------------------------------------------------------------------------------


@hookspec
def glmport_trainer_callbacks(run: TrainingRun) -> list[Any] | None:
    """Return ``transformers.TrainerCallback`` instances to add to the trainer of ``run``.

    Called once the trainer is built (model, data and training arguments resolved), before training starts.
    In a multi-process run it is called in every rank (``run.ranks`` says which one), each with its trainer.
    """


@hookspec
def glmport_before_train(run: TrainingRun) -> None:
    """Called once the trainer is ready, right before the first training step (or the resumed one). In a
    multi-process run it is called in every rank (``run.ranks``)."""


@hookspec
def glmport_after_train(run: TrainingRun, summary: dict[str, Any]) -> None:
    """Called after training finished and the final result was saved.

    ``summary`` is what ``run_summary.json`` in the output folder holds: steps, losses, timings, paths.
    In a multi-process run it is called in rank 0 only, which writes the summary.
    """
