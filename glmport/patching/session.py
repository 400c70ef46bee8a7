"""Planning, preflight and application of patch sets for one model folder, backend and mode.

Order of events (nothing is patched at import time):

1. capture process state the remote code changes when imported (TorchScript fuser flags);
2. import the folder's dynamic modules (remote) or the transformers module of its ``model_type`` (native:
   ``modeling_glm`` for ``glm``, ``modeling_glm4`` for ``glm4``, see :data:`NATIVE_MODULES`);
3. preflight: identify every file's revision, select the patches for family/backend/mode, resolve every
   target; all problems are reported in one :class:`~glmport.errors.PatchError`;
4. apply through a :class:`PatchRecorder` (:func:`apply_patches`, the one apply path: ``glmport train``,
   ``glmport infer`` and the overlay's import-time footer all use it); verify each replacement is in
   place; print one summary. A patch that fails takes every change back, process flags included;
5. the caller builds the model from the patched classes; :meth:`PatchSession.undo` restores everything.

The patch registry comes from the caller (``manager.patch_sets``): a plugin registered on the caller's
plugin manager contributes its patch sets exactly like it contributes its backend.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmport.errors import PatchError, Problem
from glmport.patching.manifest import (
    FileIdentity,
    identify_remote_folder,
    identify_transformers,
    known_revisions,
)
from glmport.patching.model import Patch, PatchContext, PatchSet, resolve_owner
from glmport.patching.recorder import PatchRecorder

log = logging.getLogger("glmport")
SESSION_ATTR = "_glmport_patch_session"
STATE_ATTR = "_glmport_state_before_import"
# native folders: config.json model_type -> (transformers module the patches target, patch family)
NATIVE_MODULES = {
    "glm": ("transformers.models.glm.modeling_glm", "glm-native"),  # GlmForCausalLM (glm-4-9b-chat-hf)
    "glm4": ("transformers.models.glm4.modeling_glm4", "glm4-native"),  # Glm4ForCausalLM (GLM-4-0414)
}
NATIVE_MODULE = NATIVE_MODULES["glm"][0]


def native_module_name(info) -> str:
    """The transformers module a native folder's classes (and its patches' targets) live in."""
    return NATIVE_MODULES[info.config.get("model_type", "glm")][0]


@dataclass
class PlannedPatch:
    set_name: str
    patch: Patch
    status: str  # apply | skip | refused
    reason: str


@dataclass
class PatchPlan:
    model_dir: Path
    kind: str
    family: str  # chatglm3 | glm4 | glm-native | glm4-native
    backend: str
    mode: str
    files: dict[str, FileIdentity]
    entries: list[PlannedPatch] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def to_apply(self) -> list[PlannedPatch]:
        return [e for e in self.entries if e.status == "apply"]

    def as_dict(self) -> dict:
        return {
            "model_dir": str(self.model_dir), "kind": self.kind, "family": self.family,
            "backend": self.backend, "mode": self.mode,
            "files": {k: {"revision": f.revision, "imitates": f.imitates, "sha256": f.sha256, "detail": f.detail}
                      for k, f in self.files.items()},
            "patches": [{"set": e.set_name, "id": e.patch.id, "status": e.status, "reason": e.reason,
                         "file": e.patch.file, "replaces": list(e.patch.replaces), "requires": list(e.patch.requires),
                         "backends": e.patch.backends, "why": e.patch.why,
                         "link": e.patch.link} for e in self.entries],
            "problems": [str(p) for p in self.problems],
        }


def _patch_family(info) -> str:
    """Remote folders: the family of their code; native folders: the transformers module's (``glm-native``,
    ``glm4-native``), since the patches target that module's classes whatever the tokenizer."""
    if info.kind == "native":
        return NATIVE_MODULES[info.config.get("model_type", "glm")][1]
    return info.family


def make_plan(info, backend, mode: str, registry, *, modules: dict | None = None,
              allow_unverified: bool = False) -> PatchPlan:
    """Decide which patches apply to ``backend`` (a Backend object: patches are chosen by its name and
    capabilities); with ``modules`` given, also resolve every target (preflight)."""
    if info.kind == "native":
        files = {"transformers": identify_transformers()}
    else:
        files = identify_remote_folder(info.path)
    plan = PatchPlan(Path(info.path), info.kind, _patch_family(info), backend.name, mode, files)

    for key, identity in files.items():
        if identity.path is not None and identity.sha256 is None and key == "modeling":
            plan.problems.append(Problem(str(identity.path), "missing: a remote-code folder needs modeling_chatglm.py"))
        elif not identity.known and identity.sha256 is not None and not allow_unverified:
            known = ", ".join(known_revisions(key)) or "none"
            plan.problems.append(Problem(
                f"{identity.path}", f"unknown revision (sha256 {identity.sha256[:12]}...); known revisions of this file: {known}",
                "update the model folder to a released revision, or pass --allow-unverified-patches "
                "(in a training config: glmport.allow_unverified_patches: true) to patch it anyway"))
        elif not identity.known and identity.key == "transformers" and not allow_unverified:
            plan.problems.append(Problem(
                "transformers", f"{identity.detail} is outside the versions the native GLM patches were written for",
                "install transformers 5.x, or pass --allow-unverified-patches"))

    for patch_set, patch in registry.select(plan.family, backend, mode):
        identity = files.get(patch.file)
        if identity is None or identity.sha256 is None and patch.file != "transformers":
            plan.entries.append(PlannedPatch(patch_set.name, patch, "skip", f"{patch.file} file not present"))
            continue
        revision = identity.effective_revision
        if patch.revisions and revision is not None and revision not in patch.revisions:
            plan.entries.append(PlannedPatch(patch_set.name, patch, "skip", f"not needed for {revision}"))
            continue
        if not identity.known and not allow_unverified:
            plan.entries.append(PlannedPatch(patch_set.name, patch, "refused", f"{patch.file}: unknown revision"))
            continue
        reason = patch.why if identity.known else f"UNVERIFIED revision: {patch.why}"
        plan.entries.append(PlannedPatch(patch_set.name, patch, "apply", reason))

    owners: dict[tuple[str, str], str] = {}
    for entry in plan.to_apply:
        for target in entry.patch.replaces + entry.patch.adds:
            key = (entry.patch.file, target)
            if key in owners:
                plan.problems.append(Problem(
                    f"patch {entry.set_name}/{entry.patch.id}",
                    f"replaces {target}, which {owners[key]} already replaces for this backend and mode",
                    "two patch sets overlap; disable the plugin that contributes one of them"))
            owners[key] = f"{entry.set_name}/{entry.patch.id}"

    if modules is not None:
        for entry in plan.to_apply:
            if entry.patch.file not in modules:
                entry.status = "skip"
                entry.reason = f"{entry.patch.file} code is not used by this folder (no tokenizer_config.json auto_map)"
        for entry in plan.to_apply:
            module = modules.get(entry.patch.file)
            for target in entry.patch.replaces:
                try:
                    resolve_owner(module, target)
                except AttributeError:
                    plan.problems.append(Problem(
                        f"{getattr(module, '__file__', entry.patch.file)}",
                        f"patch {entry.patch.id}: target {target} does not exist in this revision",
                        "the file differs from the revision the patch was written for; report it with the file's sha256"))
    return plan


def capture_process_state() -> dict[str, Any]:
    """Global settings that importing the remote code changes (upstream flips TorchScript fuser flags)."""
    import torch

    C = torch._C
    profiling_mode = C._jit_set_profiling_mode(True)
    C._jit_set_profiling_mode(profiling_mode)
    profiling_executor = C._jit_set_profiling_executor(True)
    C._jit_set_profiling_executor(profiling_executor)
    return {
        "jit_profiling_mode": profiling_mode,
        "jit_profiling_executor": profiling_executor,
        "jit_fuse_cpu": C._jit_can_fuse_on_cpu(),
        "jit_fuse_gpu": C._jit_can_fuse_on_gpu(),
    }


def restore_process_state(state: dict[str, Any]) -> None:
    import torch

    C = torch._C
    C._jit_set_profiling_mode(state["jit_profiling_mode"])
    C._jit_set_profiling_executor(state["jit_profiling_executor"])
    C._jit_override_can_fuse_on_cpu(state["jit_fuse_cpu"])
    C._jit_override_can_fuse_on_gpu(state["jit_fuse_gpu"])


def _remote_class_refs(info) -> tuple[str, str, str | None]:
    auto_map = info.auto_map
    config_ref = auto_map.get("AutoConfig")
    model_ref = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoModel")
    if not config_ref or not model_ref:
        raise PatchError(f"{info.path / 'config.json'}: auto_map needs AutoConfig and AutoModelForCausalLM (or AutoModel) "
                         "entries pointing into the folder's .py files")
    tokenizer_ref = None
    tok_config = info.path / "tokenizer_config.json"
    if tok_config.is_file():
        tok_map = json.loads(tok_config.read_text(encoding="utf-8")).get("auto_map", {}).get("AutoTokenizer")
        if isinstance(tok_map, list) and tok_map:
            tokenizer_ref = tok_map[0]
        elif isinstance(tok_map, str):
            tokenizer_ref = tok_map
    return config_ref, model_ref, tokenizer_ref


def load_modules(info) -> tuple[dict[str, Any], tuple]:
    """Import the code the patches target. For remote folders: (modules, (config, model, tokenizer) classes)."""
    before_import = capture_process_state()
    if info.kind == "native":
        import importlib

        module = importlib.import_module(native_module_name(info))
        module.__dict__.setdefault(STATE_ATTR, before_import)
        return {"transformers": module}, ()
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config_ref, model_ref, tokenizer_ref = _remote_class_refs(info)
    try:
        config_cls = get_class_from_dynamic_module(config_ref, str(info.path))
        model_cls = get_class_from_dynamic_module(model_ref, str(info.path))
        tokenizer_cls = get_class_from_dynamic_module(tokenizer_ref, str(info.path)) if tokenizer_ref else None
    except Exception as exc:
        raise PatchError(f"{info.path}: importing the remote code failed: {type(exc).__name__}: {exc}") from exc
    modules = {"configuration": sys.modules[config_cls.__module__], "modeling": sys.modules[model_cls.__module__]}
    if tokenizer_cls is not None:
        modules["tokenization"] = sys.modules[tokenizer_cls.__module__]
    modules["modeling"].__dict__.setdefault(STATE_ATTR, before_import)  # kept from the first import on
    return modules, (config_cls, model_cls, tokenizer_cls)


class PatchSession:
    """Patches applied for one model load. Undo restores every attribute and global flag."""

    def __init__(self, plan: PatchPlan, modules: dict[str, Any], classes: tuple, recorder: PatchRecorder):
        self.plan = plan
        self.modules = modules
        self.remote_classes = classes
        self.recorder = recorder
        self.active = True

    def summary(self) -> str:
        applied = self.plan.to_apply
        files = ", ".join(
            f"{k}={f.revision or 'UNVERIFIED'}" + (f" (imitates {f.imitates})" if f.imitates else "")
            for k, f in self.plan.files.items() if f.sha256 or k == "transformers"
        )
        head = f"patches for {self.plan.family}/{self.plan.backend}/{self.plan.mode} [{files}]: "
        if not applied:
            return head + "none needed"
        return head + f"{len(applied)} applied: " + ", ".join(f"{e.set_name}/{e.patch.id}" for e in applied)

    def verify_after_build(self, model=None) -> None:
        broken = self.recorder.verify()
        if broken:
            raise PatchError("patched attributes were replaced again after patching: " + ", ".join(broken))

    def undo(self) -> None:
        if not self.active:
            return
        self.recorder.undo()
        for module in self.modules.values():
            if getattr(module, SESSION_ATTR, None) is self:
                delattr(module, SESSION_ATTR)
        self.active = False


def apply_patches(patches, modules: dict[str, Any], backend, mode: str, *, state: dict[str, Any], family: str,
                  revisions: dict[str, str | None]) -> PatchRecorder:
    """Apply ``patches`` (in order) through one recorder and verify they stuck.

    On any failure every change is taken back, the process state from before the remote import
    (TorchScript flags) is restored, and a :class:`PatchError` names the patch and the file."""
    recorder = PatchRecorder()
    patch = None
    try:
        for patch in patches:
            recorder.current_patch = patch.id
            module = modules[patch.file]
            patch.apply(PatchContext(module, modules, recorder, backend, mode, revisions.get(patch.file), state,
                                     family, patch))
        broken = recorder.verify()
        if broken:
            raise PatchError("patches did not stick: " + ", ".join(broken))
    except Exception as exc:
        recorder.undo()
        restore_process_state(state)
        if isinstance(exc, PatchError):
            raise
        where = getattr(modules.get(patch.file), "__file__", patch.file)
        raise PatchError(f"patch {patch.id} failed to apply to {where}: {type(exc).__name__}: {exc}") from exc
    return recorder


def patch_session(info, backend, mode: str, *, registry, allow_unverified: bool = False) -> PatchSession:
    """Load the code of ``info``'s folder, preflight and apply the patches for ``backend``/``mode``.

    ``registry`` is the patch registry of the caller's plugin manager (``manager.patch_sets``)."""
    modules, classes = load_modules(info)
    # The remote module flips TorchScript flags when it is first imported; a later session in the same
    # process finds it cached, so load_modules keeps the state from before that first import on the module.
    first = modules.get("modeling") or next(iter(modules.values()))
    state = first.__dict__[STATE_ATTR]
    for module in modules.values():
        owner = getattr(module, SESSION_ATTR, None)
        if owner is not None and owner.active:
            raise PatchError(f"{module.__name__} is already patched (for {owner.plan.backend}/{owner.plan.mode}) in this "
                             "process; undo that session before patching again")
    plan = make_plan(info, backend, mode, registry, modules=modules, allow_unverified=allow_unverified)
    if plan.problems:
        restore_process_state(state)  # refused: leave the process as it was before the import
        raise PatchError(f"cannot patch {info.path} for backend {backend.name}, mode {mode}", plan.problems)
    revisions = {key: identity.effective_revision for key, identity in plan.files.items()}
    recorder = apply_patches([entry.patch for entry in plan.to_apply], modules, backend, mode, state=state,
                             family=plan.family, revisions=revisions)
    session = PatchSession(plan, modules, classes, recorder)
    for module in modules.values():
        setattr(module, SESSION_ATTR, session)
    log.info("%s", session.summary())
    return session


def describe_patch_set(patch_set: PatchSet) -> list[dict]:
    return [{"id": p.id, "family": p.family, "file": p.file, "backends": p.backends, "requires": list(p.requires),
             "modes": list(p.modes),
             "replaces": list(p.replaces), "revisions": list(p.revisions), "why": p.why, "link": p.link}
            for p in patch_set.patches]
