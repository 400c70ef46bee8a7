"""Patch sets contributed by plugins (``glmport_register_patch_sets``), and choosing the ones that apply.

The registry has the same shape as the backend registry (:class:`glmport.registry.Registry`). Choosing
asks the backend object what it can do (:mod:`glmport.patching.capabilities`), so a third-party backend
that declares the same capabilities as a builtin gets the same patches.
"""

from __future__ import annotations

from glmport.errors import PluginError
from glmport.patching.model import Patch, PatchSet
from glmport.registry import Registry


class PatchRegistry(Registry[PatchSet]):
    kind = "patch set"
    item_type = PatchSet

    def check(self, patch_set: PatchSet) -> None:
        seen = set()
        for patch in patch_set.patches:
            if (patch.family, patch.id) in seen:
                raise PluginError(f"patch set {patch_set.name!r} ({self._plugin}) has two patches "
                                  f"{patch.family}/{patch.id}")
            seen.add((patch.family, patch.id))

    @property
    def sets(self) -> dict[str, PatchSet]:
        return dict(self._items)

    def select(self, family: str, backend, mode: str) -> list[tuple[PatchSet, Patch]]:
        """Patches for a model family, a backend object and a mode, in registration order."""
        return [(patch_set, patch) for patch_set in self for patch in patch_set.patches
                if patch.family == family and patch.applies_to(backend, mode)]

    def all_patches(self) -> list[tuple[PatchSet, Patch]]:
        return [(s, p) for s in self for p in s.patches]
