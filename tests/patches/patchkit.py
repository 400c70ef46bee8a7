"""Helpers shared by the patch-set tests (``tests/patches``).

* **Sources**: the model code a test runs against. glmport's fixture revisions always; real upstream
  files when ``GLMPORT_UPSTREAM_DIR`` points at a folder with one subfolder per revision (otherwise the
  upstream parameter is skipped with that reason). Every source is built into a tiny model folder
  whose weights are the tiny native ``GlmForCausalLM``'s under the remote names, so logits must agree.
* **Variants**: backend x mode, with the device emulated where the variable-length attention kernel
  (the emulator's CPU reference) is wanted.
* **Snapshots** of every module-level name, every class attribute (``vars()``), every class's
  ``__bases__`` and the TorchScript flags, to prove that patching changes exactly the declared targets and
  that undo puts back the very same objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

UPSTREAM_ENV = "GLMPORT_UPSTREAM_DIR"
# fp32 tolerance for "same math": patched remote model vs tiny native model (and vs the compat-only model).
ATOL = 1e-5
SESSION_ATTR = "_glmport_patch_session"
NATIVE_MODULE = "transformers.models.glm.modeling_glm"
REMOTE_CODE = ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py")


# ------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Source:
    name: str  # fixture revision, or the upstream folder's name
    family: str  # chatglm3 | glm4
    kind: str  # fixture | upstream | broken
    revision: str  # fixture revision, or the manifest revision of the folder's modeling file
    folder: Path | None = None  # upstream only
    problem: str = ""  # broken only

    @property
    def has_tokenizer(self) -> bool:
        """Fixture folders carry a tokenizer; upstream ones are built without one (the real tokenizers
        need a SentencePiece model / tiktoken file, so no tokenizer_config.json is written)."""
        return self.kind == "fixture"

    @property
    def imitated(self) -> str:
        """The upstream revision whose patch rules apply."""
        if self.kind == "fixture":
            from glmport.tiny.remote import imitated_revision

            return imitated_revision(self.revision)
        return self.revision


def fixture_sources() -> list[Source]:
    from glmport.tiny.remote import FIXTURE_REVISIONS

    return [Source(rev, family, "fixture", rev) for family, revisions in FIXTURE_REVISIONS.items() for rev in revisions]


def upstream_root() -> Path | None:
    raw = os.environ.get(UPSTREAM_ENV, "").strip()
    return Path(raw) if raw else None


def upstream_sources() -> list[Source] | str:
    """The real upstream revision folders, or the reason there are none (a skip reason)."""
    root = upstream_root()
    if root is None:
        return (f"{UPSTREAM_ENV} is not set: real upstream remote-code files are not available here "
                f"(set it to a folder with one subfolder per revision, e.g. {UPSTREAM_ENV}=/work/upstream)")
    if not root.is_dir():
        return [Source("upstream", "", "broken", "", problem=f"{UPSTREAM_ENV}={root} is not a folder")]
    from glmport.patching.manifest import identify_file, load_manifest

    revisions = load_manifest()["revisions"]
    found = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name == "derived" or not (folder / "modeling_chatglm.py").is_file():
            continue
        revision = identify_file("modeling", folder / "modeling_chatglm.py").revision
        if revision in revisions:
            family = revisions[revision]["family"]
        else:
            family = "glm4" if folder.name.lower().startswith(("glm-4", "glm4")) else "chatglm3"
        found.append(Source(folder.name, family, "upstream", revision or "unknown", folder))
    if not found:
        return [Source("upstream", "", "broken", "", problem=f"{UPSTREAM_ENV}={root} has no subfolder with "
                                                             "modeling_chatglm.py")]
    return found


def source_params(*, fixtures: bool = True, upstream: bool = True, families=("chatglm3", "glm4", "chatglm2")) -> list:
    """pytest parameters: one per fixture revision, one per upstream folder (or one skipped placeholder)."""
    params = []
    if fixtures:
        params += [pytest.param(s, id=s.name) for s in fixture_sources() if s.family in families]
    if upstream:
        found = upstream_sources()
        if isinstance(found, str):
            params.append(pytest.param(None, id="upstream", marks=pytest.mark.skip(reason=found)))
        else:
            params += [pytest.param(s, id=f"upstream-{s.name}") for s in found
                       if s.kind == "broken" or s.family in families]
    return params


# --------------------------------------------------------------------------------------- tiny models


def shape():
    from glmport.tiny.build import TinyShape

    return TinyShape(seq_length=64)


@cache
def native_reference(family: str):
    """The tiny native GlmForCausalLM whose weights every tiny remote folder of ``family`` carries
    (same seed, same shape, same used-token prior as ``build_tiny_model``). Never modified by tests."""
    from glmport.tiny.build import native_model, used_token_ids
    from glmport.tiny.tokenizer import LAYOUTS

    layout = LAYOUTS[family]
    return native_model(shape(), layout, 0, used_token_ids(layout, "")).eval()


def build_fixture_folder(source: Source, target: Path) -> Path:
    from glmport.tiny import build_tiny_model

    return build_tiny_model("tiny-remote", target, family=source.family, revision=source.revision,
                            seq_length=shape().seq_length)


def _sibling_with(source: Source, name: str, prefer: str) -> Path | None:
    """A file ``name`` from another upstream folder of the same family (the one whose name has ``prefer``
    first): folders that hold only modeling_chatglm.py borrow the rest from a sibling revision."""
    found = upstream_sources()
    candidates = [s.folder for s in (found if isinstance(found, list) else [])
                  if s.kind == "upstream" and s.family == source.family and (s.folder / name).is_file()]
    candidates.sort(key=lambda folder: (prefer not in folder.name, folder.name))
    return candidates[0] / name if candidates else None


def build_upstream_folder(source: Source, target: Path) -> Path:
    """A tiny model folder around the real files of one upstream revision: the revision's .py files (a
    folder without configuration_chatglm.py borrows the family's 2024-06 one; ChatGLM3 needs quantization.py
    on disk because transformers follows its lazy import), the tiny config and the tiny native weights.
    No tokenizer_config.json: the tokenizer code is not used, so tokenizer patches are skipped."""
    from safetensors.torch import save_file

    from glmport.tiny.build import remote_config, remote_state_dict
    from glmport.tiny.tokenizer import LAYOUTS

    target.mkdir(parents=True, exist_ok=False)
    for name in (*REMOTE_CODE, "quantization.py"):
        if (source.folder / name).is_file():
            shutil.copyfile(source.folder / name, target / name)
    if not (target / "configuration_chatglm.py").is_file():
        borrowed = _sibling_with(source, "configuration_chatglm.py", "2024-06")
        assert borrowed is not None, f"no configuration_chatglm.py for {source.name} in any {source.family} folder"
        shutil.copyfile(borrowed, target / "configuration_chatglm.py")
    if source.family in ("chatglm2", "chatglm3") and not (target / "quantization.py").is_file():
        borrowed = _sibling_with(source, "quantization.py", "2024-06")
        assert borrowed is not None, f"{source.family} needs quantization.py on disk; no {source.family} folder has one"
        shutil.copyfile(borrowed, target / "quantization.py")
    layout = LAYOUTS[source.family]
    (target / "config.json").write_text(json.dumps(remote_config(shape(), layout, source.name), indent=2) + "\n")
    save_file(remote_state_dict(native_reference(source.family)), str(target / "model.safetensors"),
              metadata={"format": "pt"})
    return target


def copy_folder_linking_weights(source: Path, target: Path, *, skip=()) -> Path:
    """A copy of a model folder in which large files are symbolic links (cheap), code and config copied."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name in skip:
            continue
        if item.suffix in (".safetensors", ".bin"):
            (target / item.name).symlink_to(item.resolve())
        else:
            shutil.copyfile(item, target / item.name)
    return target


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (links followed), and the link targets themselves."""
    digests = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            digests[rel + " ->"] = os.readlink(path)
        if path.is_file():
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


# ---------------------------------------------------------------------------------- backends / modes


@dataclass(frozen=True)
class Variant:
    backend: str  # cpu | cuda | mlu
    mode: str  # infer | train
    emulate: str | None = None  # device type emulated on the CPU, or None

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.mode}" + ("-emulated" if self.emulate else "")

    @property
    def varlen(self) -> bool:
        """Whether the variable-length attention path runs: the accelerator set's attention uses the
        backend's kernel, and a kernel exists only under emulation here."""
        return self.emulate is not None


VARIANTS = [
    Variant("cpu", "infer"), Variant("cpu", "train"),
    Variant("cuda", "infer"), Variant("cuda", "train"),  # no flash-attn here: the SDPA fallback
    Variant("cuda", "infer", "cuda"), Variant("cuda", "train", "cuda"),  # emulator's varlen kernel
    Variant("mlu", "infer", "mlu"), Variant("mlu", "train", "mlu"),
]


def variant_params(variants=None) -> list:
    return [pytest.param(v, id=v.id) for v in (variants or VARIANTS)]


@contextlib.contextmanager
def on_device(device: str | None):
    """Emulate ``device`` (``mlu``/``cuda``) for the block, or nothing for ``None``; every trace is removed."""
    if device is None:
        yield
        return
    from glmport.backends._emulation import forget_device_probes

    from glmport.testing.emulation import emulating

    try:
        with emulating(device):
            yield
    finally:
        forget_device_probes()  # what transformers and accelerate cached under emulation


def manager():
    """A plugin manager as the CLI makes one (emulated twins for GLMPORT_EMULATE, read now)."""
    from glmport.plugins import PluginManager

    return PluginManager(autoload=False)


def backend(name: str):
    return manager().backends.get(name)


# ------------------------------------------------------------------------------------ process state


def capture_state() -> dict:
    from glmport.patching.session import capture_process_state

    return capture_process_state()


def restore_state(state: dict) -> None:
    from glmport.patching.session import restore_process_state

    restore_process_state(state)


def patched_modules() -> list:
    """Remote-code and native GLM modules that currently carry an active patch session."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name.startswith("transformers_modules.") or name == NATIVE_MODULE):
            continue
        session = vars(module).get(SESSION_ATTR)
        if session is not None and session.active:
            found.append((name, session))
    return found


# ------------------------------------------------------------------------------------------ loading


def model_info(folder: Path):
    from glmport.modeling import inspect_model_dir

    return inspect_model_dir(Path(folder))


@contextlib.contextmanager
def patched_model(folder: Path, backend_name: str, mode: str, *, dtype=None, registry=None, backend_object=None,
                  allow_unverified: bool = False, config_overrides: dict | None = None, product_path: bool = False):
    """Yield ``(model, session)`` for ``folder`` patched for ``backend_name``/``mode``; always undone.

    ``product_path=True`` (and native folders) go through ``glmport.modeling.load_model`` (tokenizer
    included); otherwise ``patch_session`` + the patched remote classes, exactly as load_model builds the
    model but without loading the tokenizer (the tiny GLM-4 tokenizer alone takes about a second, and
    upstream folders have none). Call inside :func:`on_device` for emulated backends.
    ``registry``/``backend_object``: a plugin manager's own (third-party sets and backends)."""
    import torch

    from glmport.modeling import load_model
    from glmport.patching.session import patch_session

    dtype = dtype or torch.float32
    info = model_info(folder)
    plugins = manager()
    registry = registry or plugins.patch_sets
    backend_object = backend_object or plugins.backends.get(backend_name)
    if product_path or info.kind == "native":
        loaded = load_model(info, backend_object, mode=mode, dtype=dtype, patch_sets=registry,
                            allow_unverified=allow_unverified, config_overrides=config_overrides)
        try:
            yield loaded.model, loaded.patches
        finally:
            loaded.patches.undo()
        return
    session = patch_session(info, backend_object, mode, allow_unverified=allow_unverified, registry=registry)
    try:
        config_cls, model_cls, _ = session.remote_classes
        config = config_cls.from_pretrained(str(folder))
        for key, value in (config_overrides or {}).items():
            setattr(config, key, value)
        config.torch_dtype = dtype  # the remote code builds its layers in config.torch_dtype
        model = model_cls.from_pretrained(str(folder), config=config, dtype=dtype, empty_init=False)
        session.verify_after_build(model)
        yield model, session
    finally:
        session.undo()


def make_plan(folder: Path, backend_name: str, mode: str, *, registry=None, backend_object=None,
              allow_unverified: bool = False):
    """The plan with preflight (targets resolved against the imported modules), as ``glmport patch plan``."""
    from glmport.patching.session import load_modules
    from glmport.patching.session import make_plan as engine_plan

    plugins = manager()
    registry = registry or plugins.patch_sets
    info = model_info(folder)
    modules, _ = load_modules(info)
    return engine_plan(info, backend_object or plugins.backends.get(backend_name), mode, registry, modules=modules,
                       allow_unverified=allow_unverified)


def imported_modules(info) -> dict:
    """The folder's modules, imported if needed, with the TorchScript flags put back to what they were
    before: as in a process that imported the remote code long ago, so flag assertions in a test are about
    what patching does. What the first import does is tested in a fresh process (test_patch_engine)."""
    from glmport.patching.session import load_modules

    flags = capture_state()
    modules, _ = load_modules(info)
    restore_state(flags)
    return modules


def plan_rows(plan) -> list[tuple[str, str, str]]:
    return [(e.set_name, e.patch.id, e.status) for e in plan.entries]


# ---------------------------------------------------------------------------------------- snapshots

_MISSING = object()


def _own_classes(module) -> dict[str, type]:
    return {name: value for name, value in vars(module).items()
            if isinstance(value, type) and value.__module__ == module.__name__}


# Class attributes that Python (copyreg's ``__slotnames__``, on the first copy) and transformers (its
# ``_can_set_*_cached_value``, on the first model built) create on first use: caches, not patches. Left out
# of snapshots, or a test's result would depend on whether an earlier test in its process built the model.
LAZY_CACHES = ("__slotnames__", "_can_set_attn_implementation_cached_value",
               "_can_set_experts_implementation_cached_value")


def snapshot(modules: dict) -> dict:
    """Every module-level name, every attribute in each class's own ``__dict__`` (but :data:`LAZY_CACHES`)
    and each class's ``__bases__``, for the modules of one folder (keyed by file: modeling, configuration, ...)."""
    state = {}
    for key, module in modules.items():
        state[(key, "")] = dict(vars(module))
        for name, cls in _own_classes(module).items():
            state[(key, name)] = {k: v for k, v in vars(cls).items() if k not in LAZY_CACHES}
            state[(key, f"{name}.__bases__")] = cls.__bases__
    return state


def _state_attr() -> str | None:
    """The module attribute in which the engine keeps the TorchScript state from before a remote module's
    first import (it must outlive undo: a later session in the same process needs it), if it has one."""
    from glmport.patching import session

    return getattr(session, "STATE_ATTR", None)


def changes(before: dict, modules: dict) -> set[str]:
    """``file:dotted.path`` of everything that is not the very same object as in ``before``.

    The engine's record of the TorchScript state before the first import (see :func:`_state_attr`) is not
    counted; it is checked to be exactly that: the four flags."""
    state_attr = _state_attr()
    if state_attr:
        for module in modules.values():
            kept = vars(module).get(state_attr)
            assert kept is None or set(kept) == {"jit_profiling_mode", "jit_profiling_executor", "jit_fuse_cpu",
                                                 "jit_fuse_gpu"}, kept
    after = snapshot(modules)
    changed = set()
    for key in set(before) | set(after):
        old, new = before.get(key, _MISSING), after.get(key, _MISSING)
        file_key, owner = key
        if owner.endswith(".__bases__") or old is _MISSING or new is _MISSING:
            if old is _MISSING or new is _MISSING or len(old) != len(new) or any(a is not b for a, b in zip(old, new)):
                changed.add(f"{file_key}:{owner}")
            continue
        for name in set(old) | set(new):
            if not owner and state_attr and name == state_attr:
                continue
            if old.get(name, _MISSING) is not new.get(name, _MISSING):
                changed.add(f"{file_key}:{owner + '.' if owner else ''}{name}")
    return changed


def declared_targets(plan) -> set[str]:
    return {f"{e.patch.file}:{target}" for e in plan.to_apply for target in e.patch.replaces + e.patch.adds}


# ------------------------------------------------------------------------------------------ batches


def token_batch(family: str, *, rows: int = 3, length: int = 9, seed: int = 0):
    """Token ids of ordinary (non-special) tokens the tiny tokenizer really produces."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (rows, length), generator=generator)


def padding_masks(ids):
    """(name, mask) for: no padding, right padding, left padding (rows of different lengths)."""
    import torch

    right = torch.ones_like(ids)
    right[1, 5:] = 0
    right[2, 7:] = 0
    left = torch.ones_like(ids)
    left[1, :4] = 0
    left[2, :2] = 0
    return [("unpadded", torch.ones_like(ids)), ("right-padded", right), ("left-padded", left)]


def labels_for(ids, mask):
    """Labels for real tokens only: a prompt of 3 tokens is not learned, padding is not, and neither is a
    token whose predecessor is padding (its prediction would come from a padded position)."""
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    labels[:, 1:][mask[:, :-1] == 0] = -100
    return labels

