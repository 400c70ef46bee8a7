"""pytest plugin shipped with glmport (entry point ``pytest11: glmport``).

Fixtures:

* ``glmport_emulate``: a function ``glmport_emulate("mlu")`` that turns emulation on for the test.
* ``fresh_plugin_manager``: a new :class:`glmport.plugins.PluginManager` for the test (entry points not
  autoloaded); pass it to what you test, and register test plugins on it with ``add_plugin``.
* ``tiny_model_factory``: ``tiny_model_factory("tiny-native")`` builds (once per session and kind) a tiny
  random GLM model folder offline and returns its path.

Kept light at import: no torch until a fixture runs.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def glmport_emulate():
    from glmport.testing.emulation import emulating

    stack = []

    def turn_on(*device_types: str):
        ctx = emulating(*device_types)
        ctx.__enter__()
        stack.append(ctx)

    yield turn_on
    while stack:
        stack.pop().__exit__(None, None, None)


@pytest.fixture
def fresh_plugin_manager():
    from glmport.plugins import PluginManager

    return PluginManager(autoload=False)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    built: dict[str, str] = {}

    def build(kind: str = "tiny-native", **options) -> str:
        key = kind + repr(sorted(options.items()))
        if key not in built:
            from glmport.tiny import build_tiny_model

            target = tmp_path_factory.mktemp(kind.replace("/", "-"))
            build_tiny_model(kind, target, **options)
            built[key] = str(target)
        return built[key]

    return build
