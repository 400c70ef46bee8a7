"""A record of attribute replacements that can be undone (the shape of pytest's ``MonkeyPatch``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

_MISSING = object()


@dataclass
class Replacement:
    owner: Any
    name: str
    old: Any  # _MISSING when the attribute did not exist
    new: Any
    patch_id: str

    @property
    def label(self) -> str:
        owner = getattr(self.owner, "__qualname__", None) or getattr(self.owner, "__name__", type(self.owner).__name__)
        return f"{owner}.{self.name}"


class PatchRecorder:
    """Replaces attributes and remembers the originals; :meth:`undo` restores them in reverse order."""

    def __init__(self) -> None:
        self.replacements: list[Replacement] = []
        self.current_patch = "<unnamed>"
        self._actions: list[tuple[Any, Any]] = []  # (undo callable, description) for non-attribute state

    def setattr(self, owner: Any, name: str, value: Any, *, must_exist: bool = True) -> None:
        # Look in the owner's own __dict__ first so that undo restores exactly what was there (a class
        # attribute inherited from a base must not be copied down onto the subclass).
        own = vars(owner) if hasattr(owner, "__dict__") else {}
        old = own.get(name, _MISSING)
        if old is _MISSING and must_exist and not hasattr(owner, name):
            raise AttributeError(f"{owner!r} has no attribute {name!r}")
        setattr(owner, name, value)
        self.replacements.append(Replacement(owner, name, old, value, self.current_patch))

    def on_undo(self, action, description: str) -> None:
        """Register a callable that reverts some state that is not an attribute (e.g. a global flag)."""
        self._actions.append((action, description))

    def verify(self) -> list[str]:
        """Replacements that are no longer in place (something else overwrote them)."""
        broken = []
        for r in self.replacements:
            current = vars(r.owner).get(r.name, _MISSING) if hasattr(r.owner, "__dict__") else getattr(r.owner, r.name, _MISSING)
            if current is not r.new:
                broken.append(f"{r.label} (patch {r.patch_id})")
        return broken

    def undo(self) -> None:
        for action, _ in reversed(self._actions):
            action()
        self._actions.clear()
        for r in reversed(self.replacements):
            if r.old is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(r.owner, r.name)
            else:
                setattr(r.owner, r.name, r.old)
        self.replacements.clear()
