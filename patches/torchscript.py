"""TorchScript off: the remote code's import flips process-wide TorchScript fuser flags and compiles
``apply_rotary_pos_emb`` with ``@torch.jit.script``. Both are CUDA-era optimizations that vendor backends
do not support (Cambricon's port comments the flags out; Ascend users remove the decorator:
hiyouga/LLaMA-Factory#4339). Restore the flags to their values before the import, and rotate with plain
tensor ops instead of the scripted function.
"""

from __future__ import annotations

from glmport.patches.layouts import SEQUENCE_FIRST

from glmport.patching import Patch

FLAG_SETTERS = {
    "jit_profiling_mode": "_jit_set_profiling_mode",
    "jit_profiling_executor": "_jit_set_profiling_executor",
    "jit_fuse_cpu": "_jit_override_can_fuse_on_cpu",
    "jit_fuse_gpu": "_jit_override_can_fuse_on_gpu",
}


def rotate_seq_first(x, rope_cache):
    """RoPE for ChatGLM2/3's ``[seq, batch, heads, head_dim]`` layout; ``rope_cache`` is
    ``[seq, batch, rot_dim / 2, 2]`` (cos, sin). Interleaved pairs over the first ``rot_dim`` dims."""
    import torch

    seq = x.shape[0]
    half = rope_cache.shape[-2]
    rotated, untouched = x[..., : 2 * half], x[..., 2 * half:]
    pairs = rotated.reshape(*rotated.shape[:-1], half, 2)
    cache = rope_cache[:seq].reshape(seq, -1, 1, half, 2)
    return _rotate(pairs, cache, untouched, torch)


def rotate_batch_first(x, rope_cache):
    """RoPE for GLM-4's ``[batch, heads, seq, head_dim]`` layout; ``rope_cache`` is
    ``[batch, seq, rot_dim / 2, 2]``."""
    import torch

    seq = x.shape[2]
    half = rope_cache.shape[-2]
    rotated, untouched = x[..., : 2 * half], x[..., 2 * half:]
    pairs = rotated.reshape(*rotated.shape[:-1], half, 2)
    cache = rope_cache[:, :seq].reshape(-1, 1, seq, half, 2)
    return _rotate(pairs, cache, untouched, torch)


def _rotate(pairs, cache, untouched, torch):
    cos, sin = cache[..., 0], cache[..., 1]
    even, odd = pairs[..., 0], pairs[..., 1]
    turned = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((turned, untouched), dim=-1)


def apply(ctx) -> None:
    leave_fusers_off(ctx)
    rotate = rotate_seq_first if ctx.module_family in SEQUENCE_FIRST else rotate_batch_first
    ctx.replace("apply_rotary_pos_emb", rotate)


def leave_fusers_off(ctx) -> None:
    """Put back the fuser flags from before the remote module's import (``ctx.state``: the module's own
    top-level ``torch._C._jit_*`` calls changed them for the whole process) and restore the module's
    setting on undo. Shared by every family's no-torchscript patch."""
    import torch

    C = torch._C
    current = {
        "jit_profiling_mode": C._jit_set_profiling_mode(ctx.state["jit_profiling_mode"]),
        "jit_profiling_executor": C._jit_set_profiling_executor(ctx.state["jit_profiling_executor"]),
        "jit_fuse_cpu": C._jit_can_fuse_on_cpu(),
        "jit_fuse_gpu": C._jit_can_fuse_on_gpu(),
    }
    C._jit_override_can_fuse_on_cpu(ctx.state["jit_fuse_cpu"])
    C._jit_override_can_fuse_on_gpu(ctx.state["jit_fuse_gpu"])

    def restore_module_flags():
        for key, setter in FLAG_SETTERS.items():
            getattr(C, setter)(current[key])

    ctx.recorder.on_undo(restore_module_flags, "TorchScript fuser flags")


def patch(family: str, *, requires, modes=("infer", "train")) -> Patch:
    return Patch(
        "torchscript-off", family=family, file="modeling", replaces=("apply_rotary_pos_emb",),
        why="no TorchScript: restore the fuser flags the import changed, rotate without @torch.jit.script",
        link="https://github.com/hiyouga/LLaMA-Factory/issues/4339",
        apply=apply, requires=requires, modes=modes,
    )
