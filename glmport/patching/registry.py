"""Patch sets contributed by plugins (``glmport_register_patch_sets``), and choosing the ones that apply."""

from __future__ import annotations

from glmport.errors import PluginError
from glmport.patching.model import Patch, PatchSet


class PatchRegistry:
    def __init__(self) -> None:
        self.sets: dict[str, PatchSet] = {}
        self.origin: dict[str, str] = {}
        self._current_plugin = "<direct>"

    def add(self, patch_set: PatchSet) -> None:
        if not isinstance(patch_set, PatchSet):
            raise PluginError(f"plugin {self._current_plugin!r} registered {patch_set!r}, which is not a PatchSet")
        if patch_set.name in self.sets:
            raise PluginError(f"patch set {patch_set.name!r} is registered twice: by {self.origin[patch_set.name]!r} "
                              f"and by {self._current_plugin!r}")
        seen = set()
        for patch in patch_set.patches:
            if (patch.family, patch.id) in seen:
                raise PluginError(f"patch set {patch_set.name!r} ({self._current_plugin}) has two patches "
                                  f"{patch.family}/{patch.id}")
            seen.add((patch.family, patch.id))
        self.sets[patch_set.name] = patch_set
        self.origin[patch_set.name] = self._current_plugin

    def select(self, family: str, backend: str, mode: str) -> list[tuple[PatchSet, Patch]]:
        """Patches for a model family, backend and mode, in registration order."""
        chosen = []
        for patch_set in self.sets.values():
            for patch in patch_set.patches:
                if patch.family == family and patch.applies_to(backend, mode):
                    chosen.append((patch_set, patch))
        return chosen

    def all_patches(self) -> list[tuple[PatchSet, Patch]]:
        return [(s, p) for s in self.sets.values() for p in s.patches]
