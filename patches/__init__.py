"""Builtin patch sets (installed as ``glmport.patches``), registered through the same hook a plugin uses.

| set | backends | modes | what |
|---|---|---|---|
| ``compat`` | all | infer, train | the remote code on transformers 5 (config, generation, checkpointing, init, tokenizer) |
| ``cpu`` | cpu | infer, train | no TorchScript |
| ``mlu-infer`` | mlu | infer | no TorchScript, int32 positions, attention without boolean ``tril_`` |
| ``mlu-train`` | mlu | train | the above with the variable-length attention path, rotary cache, label-row loss |
| ``cuda-infer`` | cuda | infer | attention without dense masks when flash-attn is installed, rotary cache |
| ``cuda-train`` | cuda | train | the above plus the label-row loss |
| ``native-mlu`` | mlu | infer, train | transformers' GLM classes: 32-bit masks and positions |

Each patch lives in a module of this package that says which upstream construct it replaces and why.
Sets for other devices are plugins' business, through the same hook.
"""

from __future__ import annotations

from glmport.hookspecs import hookimpl
from glmport.patching import PatchSet

FAMILIES = ("chatglm3", "glm4")


def builtin_patch_sets() -> list[PatchSet]:
    from glmport.patches import (
        attention,
        compat,
        int32,
        native_mask32,
        native_positions32,
        rotary_cache,
        torchscript,
        train_loss,
    )

    def per_family(make) -> list:
        return [patch for family in FAMILIES for patch in make(family)]

    mlu, cuda = ("mlu",), ("cuda",)
    return [
        PatchSet("compat", "remote code on transformers 5.x", per_family(compat.patches)),
        PatchSet("cpu", "CPU: no TorchScript", per_family(lambda f: [torchscript.patch(f, backends=("cpu",))])),
        PatchSet("mlu-infer", "Cambricon MLU, inference", per_family(lambda f: [
            torchscript.patch(f, backends=mlu, modes=("infer",)),
            int32.patch(f, backends=mlu, modes=("infer",)),
            attention.patch(f, backends=mlu, modes=("infer",), varlen=False),
        ])),
        PatchSet("mlu-train", "Cambricon MLU, training", per_family(lambda f: [
            torchscript.patch(f, backends=mlu, modes=("train",)),
            int32.patch(f, backends=mlu, modes=("train",)),
            attention.patch(f, backends=mlu, modes=("train",), varlen=True),
            rotary_cache.patch(f, backends=mlu, modes=("train",)),
            train_loss.patch(f, backends=mlu),
        ])),
        PatchSet("cuda-infer", "NVIDIA CUDA, inference", per_family(lambda f: [
            attention.patch(f, backends=cuda, modes=("infer",), varlen=True),
            rotary_cache.patch(f, backends=cuda, modes=("infer",)),
        ])),
        PatchSet("cuda-train", "NVIDIA CUDA, training", per_family(lambda f: [
            attention.patch(f, backends=cuda, modes=("train",), varlen=True),
            rotary_cache.patch(f, backends=cuda, modes=("train",)),
            train_loss.patch(f, backends=cuda),
        ])),
        PatchSet("native-mlu", "transformers' GLM classes on Cambricon MLU",
                 [native_mask32.PATCH, native_positions32.PATCH]),
    ]


@hookimpl
def glmport_register_patch_sets(registry) -> None:
    for patch_set in builtin_patch_sets():
        registry.add(patch_set)
