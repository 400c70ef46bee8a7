"""Builtin patch sets (installed as ``glmport.patches``), registered through the same hook a plugin uses.

Sets, by what they are for:

* ``compat``: the remote code on current transformers (4.4x-5.x), every backend and mode;
* ``cpu``: no TorchScript, on the CPU backend;
* ``mlu-infer`` / ``mlu-train``: Cambricon MLU (no TorchScript, masks without bool ``tril_``, 64-bit-free
  positions, a working training attention path);
* ``cuda``: SDPA without dense masks where avoidable, rotary cache reuse;
* ``native-mlu``: transformers' own GLM classes on MLU (32-bit masks).

Each patch lives in its own module here and says which upstream construct it replaces and why.
"""

from __future__ import annotations

from glmport.hookspecs import hookimpl
from glmport.patching import PatchSet


def builtin_patch_sets() -> list[PatchSet]:
    from glmport.patches import native_mask32

    return [
        PatchSet("native-mlu", "transformers' GLM classes on Cambricon MLU", [native_mask32.PATCH]),
    ]


@hookimpl
def glmport_register_patch_sets(registry) -> None:
    for patch_set in builtin_patch_sets():
        registry.add(patch_set)
