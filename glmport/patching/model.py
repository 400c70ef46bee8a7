"""What a patch is: metadata plus an ``apply`` function that replaces attributes through a recorder.

A patch declares the file it targets (``modeling``, ``configuration``, ``tokenization`` of a remote-code
folder, or ``transformers`` for native GLM classes), the revisions of that file it was written against,
the attributes it replaces (``"CoreAttention.forward"``), the backends and modes it is for, and one line of
why. Preflight resolves every declared target before anything is changed.
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

    def applies_to(self, backend: str, mode: str) -> bool:
        return (self.backends == ALL_BACKENDS or backend in self.backends) and mode in self.modes


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

    def replace(self, dotted: str, value: Any, *, module: Any = None) -> None:
        owner, name = resolve_owner(module or self.module, dotted)
        self.recorder.setattr(owner, name, value)

    def original(self, dotted: str, *, module: Any = None) -> Any:
        owner, name = resolve_owner(module or self.module, dotted)
        return getattr(owner, name)


def resolve_owner(module: Any, dotted: str):
    """``"CoreAttention.forward"`` -> (CoreAttention class, "forward"). Raises AttributeError."""
    parts = dotted.split(".")
    owner = module
    for part in parts[:-1]:
        owner = getattr(owner, part)
    if not hasattr(owner, parts[-1]):
        raise AttributeError(f"{dotted} not found")
    return owner, parts[-1]
