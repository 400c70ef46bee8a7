"""The CPU backend: always available, 64-bit capable, gloo collectives."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from glmport.backends._memory import host_memory_stats, reset_host_peak

from glmport.backend import Availability, Backend, MemoryStats
from glmport.hookspecs import hookimpl


class CpuBackend(Backend):
    name = "cpu"
    description = "host CPU (always available; memory stats are the process RSS)"
    device_type = "cpu"
    auto_priority = 0
    collective_backend = "gloo"
    visible_devices_env = None
    deepspeed_accelerator = "cpu"
    one_process_per_device = False  # processes of a multi-process run share the host

    def availability(self) -> Availability:
        return Availability(True, "the host CPU is always available")

    def device_count(self) -> int:
        return 1

    def device(self, local_rank: int = 0):
        """Plain ``cpu``: the host has no device index, and loaders (safetensors among them) reject
        ``cpu:0``."""
        import torch

        return torch.device("cpu")

    def memory_stats(self) -> MemoryStats:
        return host_memory_stats()

    def reset_peak_memory(self) -> None:
        reset_host_peak()

    def free_memory(self) -> int | None:
        """The host's available memory (``MemAvailable``: free plus what the kernel can reclaim)."""
        try:
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def compile_support(self) -> Availability:
        # inductor writes C++ for the CPU and builds it with the host's compiler
        import shutil

        compiler = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if compiler is None or not shutil.which(compiler.split()[0]):
            return Availability(False, "inductor builds C++ for the CPU and no C++ compiler is on PATH (g++, c++, "
                                       "clang++ or $CXX)", "install one (apt-get install g++), or set glmport.compile: false")
        return Availability(True, f"inductor's C++ code generation, built with {compiler}")

    def supported_dtypes(self):
        import torch

        # fp32 first: without AMX, bf16 matmuls on a CPU are slower than fp32 and lose precision.
        return [torch.float32, torch.bfloat16]

    def preferred_dtype(self):
        import torch

        return torch.float32

    def training_arguments(self) -> dict[str, Any]:
        return {"use_cpu": True, **super().training_arguments()}

    def quantization_kernels(self) -> Availability:
        # bitsandbytes 0.48+ ships CPU kernels for nf4/int8 (forward and backward; tests/e2e/test_qlora.py)
        return Availability(True, "bitsandbytes' CPU kernels (0.48 and later)")

    def deepspeed(self):
        """DeepSpeed has a CPU accelerator, but the Trainer cannot use it: accelerate (1.x) gives DeepSpeed a job
        only on an accelerator device. With ``use_cpu`` it trains without DeepSpeed, silently; without it, it
        finds no device, sets up one process, and DeepSpeed's batch check fails ("train_batch_size is not
        equal to micro_batch_per_gpu * gradient_acc_step * world_size 2 != 2 * 1 * 2" for two processes)."""
        info = super().deepspeed()
        if not info.usable:
            return info
        return dataclasses.replace(info, usable=False, note=(
            f"{info.distribution} {info.version} has a CPU accelerator, but transformers' Trainer reaches DeepSpeed "
            "through accelerate, which runs DeepSpeed only on an accelerator device (on the CPU it would train "
            "without DeepSpeed); train on cpu without training_args.deepspeed, or with it on cuda / mlu"))


@hookimpl
def glmport_register_backends(registry) -> None:
    registry.add(CpuBackend())
