"""Where a run starts: fresh, or from which checkpoint. Decided before any model is loaded.

RESUME (the upstream script's fourth argument, or ``--resume``):

* ``yes``: the latest *complete* checkpoint in the output folder; a fresh start when there is none.
* ``N``: ``checkpoint-N``, which must exist and be complete (a clear error otherwise, listing those that do);
  later checkpoints belong to the continuation being abandoned and are moved into ``superseded-<time>/``.
* ``no``: a real restart. Earlier checkpoints and results are moved aside into ``superseded-<time>/``
  (upstream's ``no`` silently trained nothing).
* not given: a fresh start, unless the folder already holds a run, which is then an error asking for
  ``yes`` or ``no``: a new run never mixes its checkpoints with an old one's.

A checkpoint is complete when glmport's marker file is in it (written after everything else). Checkpoints
written by upstream scripts have no marker and count as complete when their ``trainer_state.json`` is
there. A checkpoint folder without either was cut short by a crash: it is renamed to
``checkpoint-N.incomplete`` so that nothing mistakes it for a finished one.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmport.errors import ResumeError

MARKER = "glmport_checkpoint.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RESULT_NAMES = ("final", "run_summary.json", "loss.png", "predictions.jsonl", "runs", "skipped_records.jsonl")


@dataclass
class ResumePlan:
    checkpoint: Path | None  # None: fresh start
    notes: list[str] = field(default_factory=list)


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() or (
        (folder / "trainer_state.json").is_file() and not (folder / ".glmport_writing").exists()
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
            if CHECKPOINT.match(c.name.split(".")[0]) or c.name in RESULT_NAMES]


def _archive(output_dir: Path, items: list[Path]) -> Path:
    archive = _free_name(output_dir / time.strftime("superseded-%Y%m%d-%H%M%S"))
    archive.mkdir()
    for item in items:
        item.rename(archive / item.name)
    return archive


def plan_resume(output_dir: Path, resume: str | None, *, where: str = "RESUME") -> ResumePlan:
    """Decide how the run starts. ``where`` names the argument in errors."""
    value = (resume or "").strip()
    lowered = value.lower()
    if lowered in ("", "no"):
        complete = checkpoints(output_dir)
        old = _previous_run(output_dir)
        if lowered == "" and old:
            latest = f"latest complete checkpoint: checkpoint-{max(complete)}" if complete else \
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
        if not complete:
            note = "no checkpoint to resume from: starting fresh"
            return ResumePlan(None, [note if output_dir.exists() else f"{output_dir} does not exist yet: starting fresh"])
        latest = max(complete)
        return ResumePlan(complete[latest], [f"resuming from checkpoint-{latest}"])
    if value.isdigit():
        step = int(value)
        if step <= 0:
            raise ResumeError(f"{where} {value}: a checkpoint step is a positive number (or use yes / no)")
        complete = checkpoints(output_dir)
        if step not in complete:
            available = ", ".join(f"checkpoint-{s}" for s in complete) or "none"
            raise ResumeError(
                f"{where} {value}: {output_dir / f'checkpoint-{step}'} does not exist or is incomplete\n"
                f"    -> complete checkpoints in {output_dir}: {available}"
            )
        notes = [f"resuming from checkpoint-{step}"]
        later = [path for s, path in complete.items() if s > step]
        if later:  # they belong to the abandoned continuation: keep them, but out of the way
            notes.append(f"checkpoints after step {step} were moved to {_archive(output_dir, later)}")
        return ResumePlan(complete[step], notes)
    raise ResumeError(f"{where} {value!r}: expected yes, no or a checkpoint step number")
