"""Where a run starts: fresh, or from which checkpoint. Decided before any model is loaded.

RESUME (the upstream script's fourth argument, or ``--resume``):

* ``yes``: the latest *complete* checkpoint in the output folder; a fresh start when there is none.
* ``N``: ``checkpoint-N``, which must exist and be complete (a clear error otherwise, listing those that do);
  later checkpoints belong to the continuation being abandoned and are moved into ``superseded-<time>/``.
* ``no``: a real restart. Earlier checkpoints and results are moved aside into ``superseded-<time>/``
  (upstream's ``no`` silently trained nothing).
* not given: a fresh start, unless the folder already holds a run, which is then an error asking for
  ``yes`` or ``no``: a new run never mixes its checkpoints with an old one's.

A checkpoint is complete when glmport's manifest is in it (written after everything else; see
:mod:`glmport.train.checkpoints`). Checkpoints written by upstream scripts have no manifest and count as
complete when their ``trainer_state.json`` is there. A checkpoint folder without either was cut short by a
crash: it is renamed to ``checkpoint-N.incomplete`` so that nothing mistakes it for a finished one.

Before a checkpoint is resumed from, its files are verified against the manifest. With ``yes``, a
checkpoint that fails (a file missing, truncated or changed) is renamed ``checkpoint-N.corrupt`` with a
warning and the next newest is tried; ``N`` naming such a checkpoint is an error listing what is wrong. A
checkpoint whose run fingerprint differs from this run's (another data set, LoRA rank, learning rate...)
is refused with each difference named, unless forced.

A checkpoint already at ``max_steps`` has nothing left to train: the recipe publishes it without a step.
One past ``max_steps`` is refused (raise ``max_steps``, or resume from an earlier checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from glmport.errors import ResumeError
from glmport.train.outputs import (
    CHECKPOINT,
    CHECKPOINT_MARKER,
    RUN_OUTPUTS,
    SUPERSEDED_PREFIX,
    WRITING_MARKER,
    checkpoint_name,
)


@dataclass
class ResumePlan:
    checkpoint: Path | None  # None: fresh start
    notes: list[str] = field(default_factory=list)
    manifest: dict | None = None  # the checkpoint's manifest (None: fresh start, or a checkpoint without one)
    step: int = 0  # the checkpoint's step (0: fresh start)


def is_complete(folder: Path) -> bool:
    return (folder / CHECKPOINT_MARKER).is_file() or (
        (folder / "trainer_state.json").is_file() and not (folder / WRITING_MARKER).exists()
    )


def checkpoints(output_dir: Path) -> dict[int, Path]:
    """Complete checkpoints by step. Incomplete ones are renamed aside (see module docstring)."""
    found: dict[int, Path] = {}
    if not output_dir.is_dir():
        return found
    for child in output_dir.iterdir():
        match = CHECKPOINT.match(child.name)
        if not match or not child.is_dir():
            continue
        if is_complete(child):
            found[int(match.group(1))] = child
        else:
            child.rename(_free_name(child.with_name(child.name + ".incomplete")))
    return dict(sorted(found.items()))


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _previous_run(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return [c for c in output_dir.iterdir()
            if CHECKPOINT.match(c.name.split(".")[0]) or c.name in RUN_OUTPUTS]


def _archive(output_dir: Path, items: list[Path]) -> Path:
    archive = _free_name(output_dir / time.strftime(SUPERSEDED_PREFIX + "%Y%m%d-%H%M%S"))
    archive.mkdir()
    for item in items:
        item.rename(archive / item.name)
    return archive


def _verified(output_dir: Path, complete: dict[int, Path], step: int, *, where: str, strict: bool,
              notes: list[str]) -> Path | None:
    """``checkpoint-step`` if its files match its manifest. Otherwise: an error (``strict``), or renamed
    ``checkpoint-N.corrupt`` with a note."""
    from glmport.train.checkpoints import verify

    folder = complete[step]
    problems = verify(folder)
    if not problems:
        return folder
    listed = "; ".join(problems)
    if strict:
        others = ", ".join(checkpoint_name(s) for s in complete if s != step) or "none"
        raise ResumeError(f"{where} {step}: {folder} is corrupt: {listed}\n"
                          f"    -> resume from another complete checkpoint ({others}), or start over with {where} no")
    moved = _free_name(folder.with_name(folder.name + ".corrupt"))
    folder.rename(moved)
    notes.append(f"WARNING: {checkpoint_name(step)} is corrupt ({listed}); moved to {moved.name}, skipped")
    return None


def _check_fingerprint(plan: ResumePlan, run_fingerprint, *, force: bool, flag: str) -> None:
    from glmport.train.checkpoints import INCOMPATIBLE

    if run_fingerprint is None or plan.manifest is None or not plan.manifest.get("fingerprint"):
        return
    changed = run_fingerprint.differences(plan.manifest["fingerprint"])
    if not changed:
        return
    listed = "\n".join(f"      {line}" for _, line in changed)
    unforceable = [key for key, _ in changed if key in INCOMPATIBLE]
    if unforceable:
        raise ResumeError(
            f"{plan.checkpoint} was written for another model or method; its weights do not fit this run:\n"
            f"{listed}\n"
            f"    -> put {', '.join(unforceable)} back, or start over with {flag} no (the old run is kept)")
    if not force:
        raise ResumeError(
            f"{plan.checkpoint} was written by a run with other settings or data; resuming would mix two runs:\n"
            f"{listed}\n"
            f"    -> put the settings back, start over with {flag} no, or pass --force-resume to continue anyway "
            "(the checkpoint's optimizer and learning-rate schedule are restored as they were)")
    plan.notes.append("WARNING: --force-resume: continuing although the run changed: " +
                      "; ".join(line for _, line in changed))


def plan_resume(output_dir: Path, resume: str | None, *, where: str = "RESUME", run_fingerprint=None,
                force: bool = False, max_steps: int | None = None) -> ResumePlan:
    """Decide how the run starts. ``where`` names the argument in errors; ``run_fingerprint`` (a
    :class:`glmport.train.checkpoints.Fingerprint`) is compared with the checkpoint's unless ``force``;
    ``max_steps`` (when positive) refuses a checkpoint that is already past it."""
    plan = _choose(output_dir, resume, where=where)
    if plan.checkpoint is None:
        return plan
    from glmport.train.checkpoints import read_manifest

    plan.manifest = read_manifest(plan.checkpoint)
    plan.step = int(CHECKPOINT.match(plan.checkpoint.name).group(1))
    _check_fingerprint(plan, run_fingerprint, force=force, flag=where)
    if max_steps is not None and max_steps > 0 and plan.step > max_steps:
        earlier = ", ".join(checkpoint_name(s) for s in checkpoints(output_dir) if s <= max_steps) or "none"
        raise ResumeError(
            f"{plan.checkpoint} is at step {plan.step}, past training_args.max_steps {max_steps}\n"
            f"    -> raise max_steps to train on, resume from a checkpoint at or before step {max_steps} "
            f"({where} N; complete: {earlier}), or start over with {where} no")
    return plan


def _choose(output_dir: Path, resume: str | None, *, where: str) -> ResumePlan:
    value = (resume or "").strip()
    lowered = value.lower()
    if lowered in ("", "no"):
        complete = checkpoints(output_dir)
        old = _previous_run(output_dir)
        if lowered == "" and old:
            latest = f"latest complete checkpoint: {checkpoint_name(max(complete))}" if complete else \
                "found: " + ", ".join(sorted(item.name for item in old))
            raise ResumeError(
                f"{output_dir} already holds a run ({latest})\n"
                f"    -> pass {where} yes to continue it, or {where} no to start over (the old run is kept "
                "in a superseded-<time> folder)"
            )
        if lowered == "no" and old:
            archive = _archive(output_dir, old)
            return ResumePlan(None, [f"started over: the earlier run was moved to {archive}"])
        return ResumePlan(None)
    if lowered == "yes":
        complete = checkpoints(output_dir)
        notes: list[str] = []
        for step in sorted(complete, reverse=True):  # the newest checkpoint whose files are good
            folder = _verified(output_dir, complete, step, where=where, strict=False, notes=notes)
            if folder is not None:
                return ResumePlan(folder, [*notes, f"resuming from {checkpoint_name(step)}"])
        note = "no checkpoint to resume from: starting fresh" if output_dir.exists() else \
            f"{output_dir} does not exist yet: starting fresh"
        return ResumePlan(None, [*notes, note])
    if value.isdigit():
        step = int(value)
        if step <= 0:
            raise ResumeError(f"{where} {value}: a checkpoint step is a positive number (or use yes / no)")
        complete = checkpoints(output_dir)
        if step not in complete:
            available = ", ".join(checkpoint_name(s) for s in complete) or "none"
            raise ResumeError(
                f"{where} {value}: {output_dir / checkpoint_name(step)} does not exist or is incomplete\n"
                f"    -> complete checkpoints in {output_dir}: {available}"
            )
        _verified(output_dir, complete, step, where=where, strict=True, notes=[])
        notes = [f"resuming from {checkpoint_name(step)}"]
        later = [path for s, path in complete.items() if s > step]
        if later:  # they belong to the abandoned continuation: keep them, but out of the way
            notes.append(f"checkpoints after step {step} were moved to {_archive(output_dir, later)}")
        return ResumePlan(complete[step], notes)
    raise ResumeError(f"{where} {value!r}: expected yes, no or a checkpoint step number")
