"""Checkpoints you can trust: a manifest written last, verified before a resume.

A checkpoint folder is complete once ``glmport_checkpoint.json`` is in it. That file is the manifest,
written after every other file, through a temporary name and a rename:

* ``step``, ``time`` and every file of the folder with its size and sha256;
* the run's **fingerprint**: hashes of the model folder's config, of each data file, and of the settings
  that make a run what it is (method, ``peft_config``, lengths, template, and the training arguments
  that shape the optimisation: learning rate, schedule, batch size, accumulation, seed, ...), with the
  settings themselves so that a refusal can say what changed;
* the versions of glmport, torch, transformers and peft;
* the training history: which steps ran on which backend and dtype.

On resume (:func:`verify`) the files are checked against their sizes and hashes; a checkpoint whose files
are missing, truncated or changed is skipped with a warning and the newest good one is used. A resume
whose fingerprint differs from the checkpoint's (another data set, a changed LoRA rank or learning rate)
is refused, naming each difference, unless forced (``--force-resume``): then the checkpoint's optimizer
and scheduler state win, as the Trainer restores them. A change of method, ``peft_config`` or model
cannot be forced: the checkpoint's weights would not fit the model the run builds. ``max_steps``, logging, evaluation and saving
settings may change freely: extending a run is what resuming is for.

Checkpoints without a manifest of this shape (written by upstream scripts, or by glmport before manifests
had hashes) are trusted by their marker or ``trainer_state.json``, as before.

Hashing reads every file once more after it is written: for a LoRA adapter that is milliseconds; for a
full-SFT checkpoint of a 6B model with its optimizer state (tens of GB) it is the price of knowing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmport.train.outputs import CHECKPOINT, CHECKPOINT_MARKER, WRITING_MARKER

MANIFEST_VERSION = 2
# training_args keys that make a run what it is; the rest (max_steps, logging, eval, saving, output) may change
IDENTITY_TRAINING_ARGS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args",
    "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed", "num_train_epochs",
)
# differences that no --force-resume can bridge: the checkpoint's weights would not fit the model
INCOMPATIBLE = ("method", "peft_config", "model config.json")
# what a setting was before it was recorded (manifests written before multi-process runs have no "processes")
SETTING_DEFAULTS = {"processes": 1}
_CHUNK = 8 * 2**20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


@dataclass
class Fingerprint:
    """What makes a run this run. ``settings`` are shown in refusals; ``hashes`` compare content."""

    settings: dict[str, Any] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "hashes": self.hashes}

    def differences(self, recorded: dict[str, Any]) -> list[tuple[str, str]]:
        """``(key, "key: checkpoint value -> this run's value")`` for everything that differs."""
        changed = []
        old_settings, old_hashes = recorded.get("settings", {}), recorded.get("hashes", {})
        for key in sorted(set(old_settings) | set(self.settings)):
            before = old_settings.get(key, SETTING_DEFAULTS.get(key))
            now = self.settings.get(key, SETTING_DEFAULTS.get(key))
            if before != now:
                changed.append((key, f"{key}: {before!r} -> {now!r}"))
        for key in sorted(set(old_hashes) | set(self.hashes)):
            if old_hashes.get(key) != self.hashes.get(key):
                changed.append((key, f"{key}: content changed (sha256 {str(old_hashes.get(key))[:12]} -> "
                                     f"{str(self.hashes.get(key))[:12]})"))
        return changed


def fingerprint(config, processes: int = 1) -> Fingerprint:
    """The fingerprint of a run from its resolved config (a :class:`glmport.config.RunConfig`). ``processes``
    (the world size) is part of it: with the per-device batch size it makes the global batch, and it decides
    which samples each step saw."""
    args = config.training_args
    settings = {
        "processes": processes,
        "method": config.method,
        "peft_config": config.peft_config,
        "max_input_length": config.max_input_length,
        "max_output_length": config.max_output_length,
        "combine": config.combine,
        "template": config.glmport.template,
        "model_family": config.glmport.model_family,
        "dtype": config.glmport.dtype,
        **{f"training_args.{key}": args.get(key) for key in IDENTITY_TRAINING_ARGS if key in args},
    }
    quantization = getattr(config.glmport, "quantization", "none")
    if quantization not in (None, "none"):  # QLoRA trains other numbers; left out otherwise, as before it existed
        settings["quantization"] = quantization
    hashes = {}
    model_config = config.model_dir / "config.json" if config.model_dir is not None else None
    if model_config is not None and model_config.is_file():
        hashes["model config.json"] = sha256_file(model_config)
    for split in ("train", "val", "test"):
        path = config.data_path(split)
        if path is not None and path.is_file():
            hashes[f"data_config.{split}_file"] = sha256_file(path)
    return Fingerprint(settings, hashes)


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("glmport", "torch", "transformers", "peft", "accelerate"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_manifest(folder: Path, step: int, *, run_fingerprint: Fingerprint | None, history: list[dict]) -> None:
    """Describe every file of ``folder`` and mark it complete (the manifest is written last)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in (WRITING_MARKER, CHECKPOINT_MARKER) and not name.endswith(".tmp"):
            files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "version": MANIFEST_VERSION,
        "step": step,
        "time": time.time(),
        "files": files,
        "fingerprint": run_fingerprint.as_dict() if run_fingerprint is not None else None,
        "versions": versions(),
        "history": history,
    }
    tmp = folder / (CHECKPOINT_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / CHECKPOINT_MARKER)


def rotate(output_dir: Path, limit: int | None, *, keep: Path | None = None) -> list[Path]:
    """``save_total_limit``: delete the oldest *complete* checkpoints beyond ``limit``, never the newest
    one and never ``keep`` (the Trainer's best model). Folders set aside (``checkpoint-N.incomplete``,
    ``.corrupt``) are not checkpoints here: transformers' own rotation counted them, and deleted a
    complete checkpoint of the same step instead. Called after the new checkpoint's manifest is written."""
    import shutil

    if not limit or limit <= 0:
        return []
    complete = sorted((int(match.group(1)), child) for child in output_dir.iterdir()
                      if (match := CHECKPOINT.match(child.name)) and (child / CHECKPOINT_MARKER).is_file())
    protected = {complete[-1][1]} if complete else set()
    if keep is not None:
        protected.add(Path(keep))
    removed = []
    for _, folder in complete:
        if len(complete) - len(removed) <= max(limit, len(protected)):
            break
        if folder not in protected:
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def read_manifest(folder: Path) -> dict | None:
    """The manifest of ``folder``, or ``None`` when it has none of the current shape (see module docs)."""
    try:
        data = json.loads((folder / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or not isinstance(data.get("files"), dict):
        return None
    return data


def verify(folder: Path) -> list[str]:
    """What is wrong with the files of ``folder`` against its manifest (empty: good, or no manifest)."""
    manifest_file = folder / CHECKPOINT_MARKER
    if manifest_file.is_file():
        try:
            json.loads(manifest_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return [f"{CHECKPOINT_MARKER} is unreadable ({exc})"]
    manifest = read_manifest(folder)
    if manifest is None:
        return []
    problems = []
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{name} has changed since it was written (sha256 differs)")
    return problems


@dataclass
class RunIdentity:
    """What every checkpoint of a run records about it: its fingerprint, and the training history (the
    resumed checkpoint's, plus the steps this process trains from ``start_step``, on what)."""

    fingerprint: Fingerprint | None = None
    resumed: dict | None = None  # the manifest of the checkpoint this run resumed from
    start_step: int = 0
    backend: str = ""
    dtype: str = ""
    emulated: bool = False
    processes: int = 1

    def history(self, step: int) -> list[dict]:
        earlier = list((self.resumed or {}).get("history") or [])
        if step > self.start_step:
            earlier.append({"from_step": self.start_step, "to_step": step, "backend": self.backend,
                            "dtype": self.dtype, "emulated": self.emulated,
                            **({"processes": self.processes} if self.processes > 1 else {})})
        return earlier
