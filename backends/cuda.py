"""The NVIDIA CUDA backend (nccl collectives, ``CUDA_VISIBLE_DEVICES``)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from glmport.backends._emulation import emulated_names, make_device_namespace, reference_varlen_attention
from glmport.backends._env import patched_environ
from glmport.backends._memory import host_memory_stats, reset_host_peak

from glmport.backend import Availability, Backend, MemoryStats, launched_distributed
from glmport.hookspecs import hookimpl

CUDA_INSTALL_HINT = (
    "install a CUDA build of torch that matches your driver, e.g. "
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128; "
    "set GLMPORT_EMULATE=cuda to exercise this backend on a CPU"
)


class CudaBackend(Backend):
    name = "cuda"
    description = "NVIDIA GPUs through torch.cuda"
    device_type = "cuda"
    auto_priority = 200
    collective_backend = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    deepspeed_min_version = "0.9.0"

    def __init__(self) -> None:
        self._fake = None

    @property
    def emulated(self) -> bool:
        return "cuda" in emulated_names()

    @property
    def deepspeed_accelerator(self) -> str:
        return "cpu" if self.emulated else "cuda"

    def _module(self):
        """``torch.cuda``, or the CPU-backed stand-in under ``GLMPORT_EMULATE=cuda``."""
        if self.emulated:
            if self._fake is None:
                self._fake = make_device_namespace("cuda")
            return self._fake
        import torch

        return torch.cuda

    def availability(self) -> Availability:
        if self.emulated:
            return Availability(True, "emulated on the CPU (GLMPORT_EMULATE=cuda)", emulated=True)
        import os

        import torch

        if torch.version.cuda is None:
            return Availability(False, f"torch {torch.__version__} was built without CUDA", CUDA_INSTALL_HINT)
        # The NVML-based check counts devices without creating a CUDA context, so a later fork is safe.
        with patched_environ(PYTORCH_NVML_BASED_CUDA_CHECK="1"):
            ok = torch.cuda.is_available()
        if not ok:
            mask = os.environ.get(self.visible_devices_env)
            masked = f" (CUDA_VISIBLE_DEVICES={mask!r})" if mask is not None else ""
            return Availability(False, f"no NVIDIA GPU is visible{masked}", "check the driver with nvidia-smi")
        return Availability(True, f"{torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda}")

    def device_count(self) -> int:
        if not self.emulated:
            import torch

            if torch.version.cuda is None:
                return 0
            with patched_environ(PYTORCH_NVML_BASED_CUDA_CHECK="1"):
                return torch.cuda.device_count()
        return self._module().device_count()

    def device(self, local_rank: int = 0):
        import torch

        if self.emulated:
            return torch.device("cpu")
        return super().device(local_rank)

    def set_device(self, local_rank: int = 0) -> None:
        self._module().set_device(local_rank % max(self.device_count(), 1))

    def synchronize(self) -> None:
        self._module().synchronize()

    def seed(self, seed: int) -> None:
        super().seed(seed)
        self._module().manual_seed_all(seed)

    def memory_stats(self) -> MemoryStats:
        if self.emulated:
            return host_memory_stats()
        cuda = self._module()
        return MemoryStats(cuda.memory_allocated(), cuda.max_memory_allocated(), cuda.memory_reserved())

    def reset_peak_memory(self) -> None:
        if self.emulated:
            reset_host_peak()
        else:
            self._module().reset_peak_memory_stats()

    def supported_dtypes(self):
        import torch

        dtypes = [torch.float32, torch.float16]
        if self._module().is_bf16_supported():
            dtypes.insert(1, torch.bfloat16)
        return dtypes

    def autocast(self, dtype):
        import torch

        if dtype is None or dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type="cpu" if self.emulated else "cuda", dtype=dtype)

    def varlen_attention(self):
        """flash-attn's ``flash_attn_varlen_func`` when installed (CUDA build); the emulator's CPU
        reference under GLMPORT_EMULATE=cuda."""
        if self.emulated:
            return reference_varlen_attention
        try:
            from flash_attn.flash_attn_interface import flash_attn_varlen_func
        except Exception:
            return None
        return flash_attn_varlen_func

    def training_arguments(self) -> dict[str, Any]:
        if self.emulated:  # tensors live on the CPU: gloo is the collective that can move them
            return {"use_cpu": True, **({"ddp_backend": "gloo"} if launched_distributed() else {})}
        return super().training_arguments()

    def environment(self) -> dict[str, str]:
        return {"GLMPORT_EMULATE": "cuda", "DS_ACCELERATOR": "cpu"} if self.emulated else {}


@hookimpl
def glmport_register_backends(registry) -> None:
    registry.add(CudaBackend())
