"""What a patch is: metadata plus an ``apply`` function that replaces attributes through a recorder.

A patch declares the file it targets (``modeling``, ``configuration``, ``tokenization`` of a remote-code
folder, or ``transformers`` for native GLM classes), the revisions of that file it was written against,
the attributes it replaces (``"CoreAttention.forward"``), the backend capabilities it requires (see
:mod:`glmport.patching.capabilities`; backend names only where a patch is vendor-specific), the modes it
is for, and one line of why. Preflight resolves every declared target before anything is changed, and
:meth:`PatchContext.replace` refuses a target the patch did not declare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ALL_BACKENDS = "*"
MODES = ("infer", "train")
FILES = ("modeling", "configuration", "tokenization", "transformers")


@dataclass(frozen=True)
class Patch:
    id: str
    family: str  # chatglm3 | glm4 | glm-native
    file: str  # one of FILES
    replaces: tuple[str, ...]  # dotted attribute paths inside the file's module
    why: str
    apply: Callable[[PatchContext], None]
    revisions: tuple[str, ...] = ()  # revisions of `file` this was written for; () = any known revision
    backends: tuple[str, ...] | str = ALL_BACKENDS
    modes: tuple[str, ...] = MODES
    link: str = ""
    adds: tuple[str, ...] = ()  # attributes created where the file has none
    requires: tuple[str, ...] = ()  # backend capabilities, all needed (glmport.patching.capabilities)

    def applies_to(self, backend, mode: str) -> bool:
        """``backend`` is a Backend object: its name is checked against ``backends``, its capabilities
        against ``requires``."""
        from glmport.patching.capabilities import has

        if mode not in self.modes:
            return False
        if self.backends != ALL_BACKENDS and backend.name not in self.backends:
            return False
        return all(has(backend, capability) for capability in self.requires)


@dataclass
class PatchSet:
    """A named group of patches applied together (e.g. ``compat``, ``mlu-train``)."""

    name: str
    description: str
    patches: list[Patch] = field(default_factory=list)


@dataclass
class PatchContext:
    """What a patch's ``apply`` gets."""

    module: Any  # the module of the patch's file
    modules: dict[str, Any]  # every loaded file module, by FILES key
    recorder: Any  # PatchRecorder
    backend: Any  # the Backend object (device kernels, dtype rules)
    mode: str
    revision: str | None
    state: dict[str, Any]  # process state captured before the remote modules were imported
    module_family: str = ""  # chatglm3 | glm4 | glm-native
    patch: Patch | None = None  # the patch being applied: what it declares is all it may change

    @property
    def declared(self) -> tuple[str, ...]:
        return (self.patch.replaces + self.patch.adds) if self.patch is not None else ()

    def replace(self, dotted: str, value: Any, *, module: Any = None) -> None:
        """Replace ``dotted`` through the recorder. Only targets the patch declared may be replaced (the
        spirit of pytest's ``MonkeyPatch(raising=True)``): preflight resolved exactly those, undo and
        the overlap check know exactly those."""
        if dotted not in self.declared:
            raise AttributeError(f"{dotted} is not among the targets this patch declares "
                                 f"({', '.join(self.declared) or 'none'}); add it to the patch's replaces/adds")
        owner, name = resolve_owner(module or self.module, dotted)
        self.recorder.setattr(owner, name, value)

    def add(self, dotted: str, value: Any, *, module: Any = None) -> None:
        """Create ``dotted`` (declared in the patch's ``adds``) where the file has no such attribute."""
        if dotted not in self.declared:
            raise AttributeError(f"{dotted} is not among the targets this patch declares "
                                 f"({', '.join(self.declared) or 'none'}); add it to the patch's adds")
        owner_path, _, name = dotted.rpartition(".")
        self.recorder.setattr(resolve_object(module or self.module, owner_path), name, value, must_exist=False)

    def original(self, dotted: str, *, module: Any = None) -> Any:
        owner, name = resolve_owner(module or self.module, dotted)
        return getattr(owner, name)


def resolve_object(module: Any, dotted: str) -> Any:
    """``"ChatGLMModel"`` -> the class in ``module`` (``""`` is the module itself). Raises AttributeError."""
    found = module
    for part in filter(None, dotted.split(".")):
        found = getattr(found, part)
    return found


def resolve_owner(module: Any, dotted: str):
    """``"CoreAttention.forward"`` -> (CoreAttention class, "forward"). Raises AttributeError."""
    parent, _, name = dotted.rpartition(".")
    owner = resolve_object(module, parent)
    if not hasattr(owner, name):
        raise AttributeError(f"{dotted} not found")
    return owner, name
