"""The plugin manager: builtins, blocking, misspelled hooks, duplicate backends, hook attribution."""

from __future__ import annotations

import sys
import types

import pytest

from glmport import hookimpl
from glmport.backend import Availability, Backend
from glmport.errors import PluginError
from glmport.plugins import BUILTIN_PLUGINS, PluginManager


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@pytest.fixture
def plugin_module(monkeypatch):
    def install(name: str, **attrs):
        module = _module(name, **attrs)
        monkeypatch.setitem(sys.modules, name, module)
        return name

    return install


class ToyBackend(Backend):
    name = "toy"
    device_type = "cpu"

    def availability(self):
        return Availability(False, "toy is never available", "install toy-driver")

    def device_count(self):
        return 0


def test_builtins_register_through_the_same_hook():
    manager = PluginManager(autoload=False)
    assert set(BUILTIN_PLUGINS) <= set(manager.info)
    assert all(manager.info[n].origin == "builtin" for n in BUILTIN_PLUGINS)
    assert manager.backends.names() == ["mlu", "cuda", "cpu"]
    assert manager.backends.origin("mlu") == "mlu"


def test_blocking_a_builtin_removes_its_backend(monkeypatch):
    assert "cuda" not in PluginManager(disabled=["cuda"], autoload=False).backends.names()
    monkeypatch.setenv("GLMPORT_DISABLE_PLUGINS", "mlu, cuda")
    assert PluginManager(autoload=False).backends.names() == ["cpu"]


def test_misspelled_hook_is_an_error_with_a_suggestion(plugin_module):
    name = plugin_module("typo_plugin", glmport_register_backend=lambda registry: None)
    with pytest.raises(PluginError, match=r"unknown hook 'glmport_register_backend'; did you mean 'glmport_register_backends'"):
        PluginManager(load=[name], autoload=False)


def test_unmarked_glmport_function_still_counts_as_a_hook(plugin_module):
    # no @hookimpl marker: a typo here must not be silently ignored either
    name = plugin_module("unmarked", glmport_envreport=lambda backend: {})
    with pytest.raises(PluginError, match="glmport_envreport"):
        PluginManager(load=[name], autoload=False)


def test_hook_with_wrong_arguments_is_rejected(plugin_module):
    @hookimpl
    def glmport_register_backends(registry, extra):
        pass

    name = plugin_module("bad_args", glmport_register_backends=glmport_register_backends)
    with pytest.raises(PluginError, match="bad_args.*invalid"):
        PluginManager(load=[name], autoload=False)


def test_duplicate_backend_names_both_plugins(plugin_module):
    class Impostor(ToyBackend):
        name = "cpu"

    @hookimpl
    def glmport_register_backends(registry):
        registry.add(Impostor())

    name = plugin_module("impostor", glmport_register_backends=glmport_register_backends)
    with pytest.raises(PluginError, match="backend 'cpu' is registered twice: by 'cpu' and by 'impostor'"):
        _ = PluginManager(load=[name], autoload=False).backends


def test_registering_a_non_backend_is_an_error(plugin_module):
    @hookimpl
    def glmport_register_backends(registry):
        registry.add("cpu")

    name = plugin_module("wrong_type", glmport_register_backends=glmport_register_backends)
    with pytest.raises(PluginError, match="not a glmport.backend.Backend"):
        _ = PluginManager(load=[name], autoload=False).backends


def test_import_failure_names_the_plugin_and_how_to_disable_it():
    with pytest.raises(PluginError, match=r"plugin 'no_such_module_xyz'[\s\S]*-p no:no_such_module_xyz"):
        PluginManager(load=["no_such_module_xyz"], autoload=False)


def test_env_report_is_attributed_to_its_plugin(plugin_module):
    @hookimpl
    def glmport_env_report(backend):
        return {"driver": "9.9", "backend": backend.name if backend else None}

    name = plugin_module("reporter", glmport_env_report=glmport_env_report)
    manager = PluginManager(load=[name], autoload=False)
    assert manager.env_reports(manager.backends.get("cpu")) == {"reporter": {"driver": "9.9", "backend": "cpu"}}
