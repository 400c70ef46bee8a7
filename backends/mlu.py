"""The Cambricon MLU backend (torch_mlu, cncl collectives, ``MLU_VISIBLE_DEVICES``).

torch_mlu is imported lazily, inside this module only. Availability is probed with the CNDEV-based check
(``PYTORCH_CNDEV_BASED_MLU_CHECK=1``), which does not initialize the driver, so probing is safe before a
fork. MLU kernels compute in 32 bits: batches are narrowed before they are moved (see
:class:`~glmport.backend.SixtyFourBitPolicy`).

``GLMPORT_EMULATE=mlu`` installs a CPU-backed stand-in for torch_mlu (see ``_emulation.py``).
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import nullcontext
from typing import Any

from glmport.backends._emulation import (
    emulated_names,
    install_fake_torch_mlu,
    int32_kernel_emulation,
    reference_varlen_attention,
)
from glmport.backends._env import patched_environ
from glmport.backends._memory import host_memory_stats, reset_host_peak

from glmport.backend import Availability, Backend, MemoryStats, SixtyFourBitPolicy, launched_distributed
from glmport.hookspecs import hookimpl

MLU_INSTALL_HINT = (
    "install Cambricon's torch_mlu built for your torch version (it ships in the Cambricon PyTorch "
    "container and the Neuware SDK); or set GLMPORT_EMULATE=mlu to emulate an MLU on this CPU"
)


class MluBackend(Backend):
    name = "mlu"
    description = "Cambricon MLU through torch_mlu"
    device_type = "mlu"
    auto_priority = 300
    collective_backend = "cncl"
    visible_devices_env = "MLU_VISIBLE_DEVICES"
    # Upstream DeepSpeed has an MLU accelerator since 0.15.2; older Cambricon stacks ship the fork
    # "deepspeed-mlu", which installs the same import package under another distribution name.
    deepspeed_distributions = ("deepspeed", "deepspeed-mlu", "deepspeed_mlu")
    deepspeed_min_version = "0.15.2"

    @property
    def emulated(self) -> bool:
        return "mlu" in emulated_names()

    @property
    def deepspeed_accelerator(self) -> str:
        # DeepSpeed picks its accelerator by probing imports (a fake torch_mlu counts); emulated tensors
        # live on the CPU, so it must use its CPU accelerator.
        return "cpu" if self.emulated else "mlu"

    def availability(self) -> Availability:
        if self.emulated:
            install_fake_torch_mlu()
            return Availability(
                True, "emulated on the CPU (GLMPORT_EMULATE=mlu): tensors stay on the CPU, 64-bit guard on",
                emulated=True,
            )
        if importlib.util.find_spec("torch_mlu") is None:
            return Availability(False, "torch_mlu is not installed", MLU_INSTALL_HINT)
        try:
            import torch_mlu  # noqa: F401
        except Exception as exc:  # vendor imports fail in many ways on hosts without the driver
            return Availability(False, f"torch_mlu is installed but failed to import: {exc}", MLU_INSTALL_HINT)
        import torch

        with patched_environ(PYTORCH_CNDEV_BASED_MLU_CHECK="1"):
            ok = torch.mlu.is_available()
        if not ok:
            mask = os.environ.get(self.visible_devices_env)
            masked = f" (MLU_VISIBLE_DEVICES={mask!r})" if mask is not None else ""
            return Availability(False, f"torch_mlu is installed but no MLU is visible{masked}",
                                "check the driver with cnmon")
        return Availability(True, f"{torch.mlu.device_count()} MLU(s), torch_mlu {getattr(torch_mlu, '__version__', '?')}")

    def _mlu(self):
        import torch

        if self.emulated:
            install_fake_torch_mlu()
        else:
            import torch_mlu  # noqa: F401
        return torch.mlu

    def device_count(self) -> int:
        if not self.emulated and importlib.util.find_spec("torch_mlu") is None:
            return 0
        with patched_environ(PYTORCH_CNDEV_BASED_MLU_CHECK="1"):
            return self._mlu().device_count()

    def device(self, local_rank: int = 0):
        import torch

        if self.emulated:
            return torch.device("cpu")
        return torch.device("mlu", local_rank % max(self.device_count(), 1))

    def set_device(self, local_rank: int = 0) -> None:
        self._mlu().set_device(local_rank % max(self.device_count(), 1))

    def synchronize(self) -> None:
        self._mlu().synchronize()

    def seed(self, seed: int) -> None:
        super().seed(seed)
        self._mlu().manual_seed_all(seed)

    def memory_stats(self) -> MemoryStats:
        if self.emulated:
            return host_memory_stats()
        mlu = self._mlu()
        reserved = mlu.memory_reserved() if hasattr(mlu, "memory_reserved") else None
        return MemoryStats(mlu.memory_allocated(), mlu.max_memory_allocated(), reserved)

    def reset_peak_memory(self) -> None:
        if self.emulated:
            reset_host_peak()
        else:
            self._mlu().reset_peak_memory_stats()

    def supported_dtypes(self):
        import torch

        # bf16 exists from MLU5xx on; an MLU370 has fp16 only.
        dtypes = [torch.float32, torch.float16]
        if self._mlu().is_bf16_supported():
            dtypes.insert(1, torch.bfloat16)
        return dtypes

    def autocast(self, dtype):
        import torch

        if dtype is None or dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type="cpu" if self.emulated else "mlu", dtype=dtype)

    def sixty_four_bit_policy(self) -> SixtyFourBitPolicy:
        import torch

        return SixtyFourBitPolicy(
            {torch.int64: torch.int32, torch.float64: torch.float32, torch.complex128: torch.complex64}
        )

    def varlen_attention(self):
        """Cambricon ships flash-attn for MLU (the flash_attn package of its PyTorch container); the
        emulator offers a CPU reference with the same signature."""
        if self.emulated:
            return reference_varlen_attention
        try:
            from flash_attn.flash_attn_interface import flash_attn_varlen_func
        except Exception:  # not installed, or built for another device
            return None
        return flash_attn_varlen_func

    def compute_context(self):
        return int32_kernel_emulation() if self.emulated else nullcontext()

    def training_arguments(self) -> dict[str, Any]:
        if self.emulated:  # tensors live on the CPU: gloo is the collective that can move them
            return {"use_cpu": True, **({"ddp_backend": "gloo"} if launched_distributed() else {})}
        return super().training_arguments()

    def environment(self) -> dict[str, str]:
        if self.emulated:
            return {"GLMPORT_EMULATE": "mlu", "DS_ACCELERATOR": "cpu"}
        return {"PYTORCH_CNDEV_BASED_MLU_CHECK": "1"}


@hookimpl
def glmport_register_backends(registry) -> None:
    registry.add(MluBackend())
