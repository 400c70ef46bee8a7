"""The plugin manager: builtins from a fixed list, third-party plugins from the ``glmport`` entry-point group.

Builtins register through the same hooks as third-party plugins, but are imported from
:data:`BUILTIN_PLUGINS` rather than discovered, so they work from a source checkout, cannot be lost by
turning autoload off, and load in a fixed order.

Controls (mirroring pytest):

* ``-p no:NAME`` or ``GLMPORT_DISABLE_PLUGINS=NAME[,NAME...]`` blocks a plugin, builtin or not;
* ``-p MODULE`` loads a plugin module by import name (useful with autoload off);
* ``GLMPORT_DISABLE_PLUGIN_AUTOLOAD=1`` (or ``--disable-plugin-autoload``) skips entry points.

A function named ``glmport_*`` that matches no hook spec is an error, as is a hook implementation whose
arguments do not match its spec.
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from glmport import hookspecs
from glmport.backend import Backend, BackendRegistry, emulation_knobs, env_flag, parse_emulate
from glmport.errors import PluginError
from glmport.patching.registry import PatchRegistry

ENTRY_POINT_GROUP = "glmport"

# name -> module. Names are what `-p no:NAME` blocks.
BUILTIN_PLUGINS: dict[str, str] = {
    "cpu": "glmport.backends.cpu",
    "cuda": "glmport.backends.cuda",
    "mlu": "glmport.backends.mlu",
    "patches": "glmport.patches",
}


@dataclass
class PluginInfo:
    name: str
    origin: str  # "builtin", "entry point", "-p"
    module: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith("glmport_"))


def _parse_disabled(values: list[str] | tuple[str, ...]) -> set[str]:
    names = set()
    for raw in os.environ.get("GLMPORT_DISABLE_PLUGINS", "").split(","):
        if raw.strip():
            names.add(raw.strip())
    names.update(values)
    return names


class PluginManager(pluggy.PluginManager):
    """pluggy's manager with glmport's loading rules, its registries and error reporting.

    Made once per process by the CLI (or by a Python caller) and handed down explicitly, as pytest hands
    down ``config.pluginmanager``: training, patching, the overlay loader and the testing kit use the
    manager they are given, never a process-wide one.

    ``emulate`` names backends to replace by their emulated twins; ``None`` reads ``GLMPORT_EMULATE``,
    here and only here.
    """

    def __init__(self, disabled=(), load=(), autoload: bool | None = None, emulate=None):
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.disabled = _parse_disabled(list(disabled))
        self.autoload = (not env_flag("GLMPORT_DISABLE_PLUGIN_AUTOLOAD")) if autoload is None else autoload
        self.emulate = parse_emulate(os.environ.get("GLMPORT_EMULATE")) if emulate is None else tuple(emulate)
        self.emulation_knobs = emulation_knobs()
        for name in self.disabled:
            self.set_blocked(name)

        for name, module in BUILTIN_PLUGINS.items():
            if name not in self.disabled:
                self._register_module(name, module, "builtin")
        if self.autoload:
            self._load_entry_points()
        for module in load:
            if module not in self.disabled:
                self._register_module(module, module, "-p")
        self.check_pending()
        self._backends: BackendRegistry | None = None
        self._patch_sets: PatchRegistry | None = None

    # pluggy only treats functions carrying our marker as hooks; a helper named glmport_* without the
    # marker would be ignored silently, so treat every glmport_* callable as a hook implementation.
    def parse_hookimpl_opts(self, plugin, name: str):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("glmport_") and callable(getattr(plugin, name, None)):
            opts = {}
        return opts

    def _register_module(self, name: str, module_name: str, origin: str, dist=None) -> None:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise PluginError(
                f"plugin {name!r} ({origin}) failed to import {module_name!r}: {type(exc).__name__}: {exc}\n"
                f"    -> fix or uninstall it, or disable it with `-p no:{name}` / GLMPORT_DISABLE_PLUGINS={name}"
            ) from exc
        self.add_plugin(name, module, origin, module_name, dist)

    def add_plugin(self, name: str, plugin, origin: str = "direct", module_name: str | None = None, dist=None) -> None:
        """Register ``plugin`` (a module or object with ``glmport_*`` hooks) under ``name``.

        For Python callers and tests; must happen before ``backends`` / ``patch_sets`` are first read."""
        if self._registries_built():
            raise PluginError(f"plugin {name!r} registered after the registries were built: register plugins "
                              "before the first use of manager.backends / manager.patch_sets")
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} ({origin}) is invalid: {exc}") from exc
        except ValueError as exc:  # name already registered
            raise PluginError(f"plugin name {name!r} ({origin}) is already taken: {exc}") from exc
        hooks = sorted(n for n in dir(plugin) if n.startswith("glmport_") and callable(getattr(plugin, n)))
        self.info[name] = PluginInfo(
            name, origin, module_name or getattr(plugin, "__name__", type(plugin).__name__),
            dist.metadata["name"] if dist else None, dist.version if dist else None, hooks,
        )
        if origin == "direct":
            self.check_pending()

    def _registries_built(self) -> bool:
        return getattr(self, "_backends", None) is not None or getattr(self, "_patch_sets", None) is not None

    def _load_entry_points(self) -> None:
        for dist in metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or ep.name in self.disabled or ep.name in self.info:
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:
                    raise PluginError(
                        f"plugin {ep.name!r} from distribution {dist.metadata['name']} {dist.version} failed to "
                        f"load ({ep.value}): {type(exc).__name__}: {exc}\n"
                        f"    -> disable it with `-p no:{ep.name}` or GLMPORT_DISABLE_PLUGINS={ep.name}"
                    ) from exc
                self.add_plugin(ep.name, plugin, "entry point", ep.value, dist)

    def check_pending(self) -> None:
        """A ``glmport_*`` implementation that matches no spec is an error naming the closest hook."""
        known = _hook_names()
        for name, caller in self.hook.__dict__.items():
            if not name.startswith("glmport_") or caller.spec is not None:
                continue
            for impl in caller.get_hookimpls():
                close = difflib.get_close_matches(name, known, n=1)
                suggestion = f"; did you mean {close[0]!r}?" if close else ""
                raise PluginError(
                    f"plugin {impl.plugin_name!r} implements unknown hook {name!r}{suggestion} "
                    f"Known hooks: {', '.join(known)}"
                )

    # --- registries ----------------------------------------------------------------------------------
    def _call_each(self, hook_name: str, on_each=None, **kwargs) -> list[tuple[str, Any]]:
        """Call every implementation of a hook separately so results are attributed to their plugin."""
        results = []
        caller = getattr(self.hook, hook_name)
        for impl in caller.get_hookimpls():  # registration order: builtins first
            args = {k: v for k, v in kwargs.items() if k in impl.argnames}
            if on_each is None:
                results.append((impl.plugin_name, impl.function(**args)))
            else:
                with on_each(impl.plugin_name):
                    results.append((impl.plugin_name, impl.function(**args)))
        return results

    def _fill(self, hook_name: str, registry):
        """Call a registration hook plugin by plugin, so the registry knows who added what."""
        self._call_each(hook_name, registry.attributed_to, registry=registry)
        return registry

    @property
    def backends(self) -> BackendRegistry:
        """Every registered backend, with the ones named by ``emulate`` replaced by their emulated twins."""
        if self._backends is None:
            registry = self._fill("glmport_register_backends", BackendRegistry())
            registry.emulate(self.emulate, self.emulation_knobs)
            self._backends = registry
        return self._backends

    @property
    def patch_sets(self) -> PatchRegistry:
        if self._patch_sets is None:
            self._patch_sets = self._fill("glmport_register_patch_sets", PatchRegistry())
        return self._patch_sets

    def env_reports(self, backend: Backend | None) -> dict[str, dict[str, Any]]:
        reports = {}
        for plugin_name, result in self._call_each("glmport_env_report", backend=backend):
            if result:
                reports[plugin_name] = dict(result)
        return reports
