"""The one shape of every plugin registry: named items, who added each, duplicates refused.

Backends (``glmport_register_backends``) and patch sets (``glmport_register_patch_sets``) are both filled
by the plugin manager calling a registration hook plugin by plugin, with :meth:`Registry.attributed_to`
naming the plugin whose implementation runs, so an error can say which plugin registered what.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from glmport.errors import PluginError

T = TypeVar("T")


class Registry(Generic[T]):
    """Items of one kind by name. Subclasses set :attr:`kind` and :attr:`item_type`, and may override
    :meth:`check` (validation beyond the type) and :meth:`ordered` (iteration order)."""

    kind = "item"
    item_type: type = object

    def __init__(self) -> None:
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        self._plugin = "<direct>"

    @contextmanager
    def attributed_to(self, plugin_name: str):
        """Everything added inside the block is recorded as registered by ``plugin_name``."""
        previous, self._plugin = self._plugin, plugin_name
        try:
            yield self
        finally:
            self._plugin = previous

    def add(self, item: T) -> None:
        if not isinstance(item, self.item_type):
            raise PluginError(f"plugin {self._plugin!r} registered {item!r}, which is not a "
                              f"{self.item_type.__module__}.{self.item_type.__qualname__}")
        name = getattr(item, "name", "")
        if not name:
            raise PluginError(f"plugin {self._plugin!r} registered a {self.kind} without a name")
        if name in self._items:
            raise PluginError(f"{self.kind} {name!r} is registered twice: by {self._origin[name]!r} and by "
                              f"{self._plugin!r}. Disable one of them with `-p no:PLUGIN`.")
        self.check(item)
        self._items[name] = item
        self._origin[name] = self._plugin

    def check(self, item: T) -> None:
        """Raise :class:`PluginError` for an item that cannot be registered (beyond its type)."""

    def replace(self, name: str, item: T) -> None:
        """Put ``item`` where ``name`` was (same origin): how an emulated twin takes a backend's place."""
        self._items[name] = item

    def get(self, name: str) -> T | None:
        return self._items.get(name)

    def origin(self, name: str) -> str:
        return self._origin[name]

    def ordered(self) -> list[T]:
        return list(self._items.values())  # registration order: builtins first

    def names(self) -> list[str]:
        return [item.name for item in self.ordered()]  # type: ignore[attr-defined]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self.ordered())

    def __len__(self) -> int:
        return len(self._items)
