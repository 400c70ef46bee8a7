"""Builtin patch sets (installed as ``glmport.patches``), registered through the same hook a plugin uses.

Sets are chosen by what the backend can do (:mod:`glmport.patching.capabilities`), not by its name, so a
backend from a plugin gets the patches its capabilities call for:

| set | requires | modes | what |
|---|---|---|---|
| ``compat`` | — (every backend) | infer, train | the remote code on transformers 5 (config, generation, checkpointing, init, tokenizer; ChatGLM-6B's 2-D inputs from transformers' padding mask) |
| ``no-torchscript`` | ``no-torchscript`` (cpu, mlu) | infer, train | TorchScript fuser flags restored, RoPE without ``@torch.jit.script`` |
| ``int32`` | ``lacks-64bit`` (mlu) | infer, train | int32 positions and prefix ids; for native GLM classes (``Glm``, ``Glm4``) int32 masks and positions |
| ``accelerator`` | ``accelerator`` (cuda, mlu) | infer, train | attention without dense masks or boolean ``tril_`` (the variable-length kernel when the backend has one, SDPA otherwise), rotary table once; in training the label-row loss |

Each patch lives in a module of this package that says which upstream construct it replaces and why.
Vendor-specific sets (a backend name in ``Patch.backends``) are plugins' business, through the same hook.
"""

from __future__ import annotations

from glmport.hookspecs import hookimpl
from glmport.patching import PatchSet

FAMILIES = ("chatglm3", "glm4", "chatglm2")
NATIVE_FAMILIES = ("glm-native", "glm4-native")  # transformers' modeling_glm and modeling_glm4


def builtin_patch_sets() -> list[PatchSet]:
    from glmport.patches import (
        attention,
        chatglm6b,
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

    lacks_64bit, no_torchscript, accelerator = ("lacks-64bit",), ("no-torchscript",), ("accelerator",)
    return [
        PatchSet("compat", "remote code on transformers 5.x", per_family(compat.patches) + chatglm6b.compat_patches()),
        PatchSet("no-torchscript", "devices without TorchScript fusers",
                 per_family(lambda f: [torchscript.patch(f, requires=no_torchscript)])
                 + [chatglm6b.torchscript_patch(requires=no_torchscript)]),
        PatchSet("int32", "devices without 64-bit kernels", per_family(lambda f: [
            int32.patch(f, requires=lacks_64bit),
        ]) + [patch for family in NATIVE_FAMILIES for patch in (
            native_mask32.patch(family, requires=lacks_64bit), native_positions32.patch(family, requires=lacks_64bit))]
            + [chatglm6b.int32_patch(requires=lacks_64bit)]),
        PatchSet("accelerator", "accelerators: attention, rotary table, training loss", per_family(lambda f: [
            attention.patch(f, requires=accelerator),
            rotary_cache.patch(f, requires=accelerator),
            train_loss.patch(f, requires=accelerator),
        ]) + [chatglm6b.attention_patch(requires=accelerator), train_loss.patch(chatglm6b.FAMILY, requires=accelerator)]),
    ]


@hookimpl
def glmport_register_patch_sets(registry) -> None:
    for patch_set in builtin_patch_sets():
        registry.add(patch_set)
