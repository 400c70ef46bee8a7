"""Testing kit for glmport plugin authors (and glmport's own tests).

* :class:`BackendContract`: the contract tests every backend must pass (see ``contract.py``).
* :func:`emulating`: a context that turns on CPU emulation of a device (``GLMPORT_EMULATE``).
* The pytest plugin (``glmport.testing.plugin``, loaded automatically once glmport is installed)
  provides the fixtures ``glmport_emulate``, ``tiny_model_factory`` and ``fresh_plugin_manager``.
"""

from __future__ import annotations

from glmport.testing.emulation import emulating

__all__ = ["BackendContract", "emulating", "run_training_step"]


def __getattr__(name):  # the contract imports pytest: load it only when asked for
    if name in ("BackendContract", "run_training_step"):
        from glmport.testing import contract

        return getattr(contract, name)
    raise AttributeError(name)
