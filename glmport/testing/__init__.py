"""Testing kit for glmport plugin authors (and glmport's own tests).

* :class:`BackendContract`: the contract tests every backend must pass (see ``contract.py``).
* :func:`emulating`: a context that turns on CPU emulation of a device (``GLMPORT_EMULATE``).
* :func:`run_cli` and :func:`ok`: run ``glmport ARGS`` in this process (stdout, stderr, logging and
  environment captured and restored) or in a fresh interpreter, get a :class:`CliResult` (``exit_code``,
  ``stdout``, ``stderr``), and assert its exit status with the output shown on failure (see ``cli.py``)::

      result = ok(run_cli("backends", "--json"))
      ok(run_cli("train", "run.yaml", "--backend", "npu"), exit_code=3)   # glmport.errors.EXIT_CODES
* The pytest plugin (``glmport.testing.plugin``, loaded automatically once glmport is installed)
  provides the fixtures ``glmport_emulate``, ``tiny_model_factory`` and ``fresh_plugin_manager``.
"""

from __future__ import annotations

from glmport.testing.cli import CliResult, ok, run_cli
from glmport.testing.emulation import emulating

__all__ = ["BackendContract", "CliResult", "emulating", "ok", "run_cli", "run_training_step"]


def __getattr__(name):  # the contract imports pytest: load it only when asked for
    if name in ("BackendContract", "run_training_step"):
        from glmport.testing import contract

        return getattr(contract, name)
    raise AttributeError(name)
