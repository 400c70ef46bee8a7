"""What accelerator backends share: a torch device module (``torch.cuda``, ``torch.mlu``) behind every
device question, and a CPU stand-in for it under emulation.

Whether a backend object is emulated is fixed when it is made: ``emulation()`` returns a separate twin
made with ``emulated=True`` and the emulator's settings, so no method re-reads ``GLMPORT_EMULATE``.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from typing import Any

from glmport.backends._emulation import EmulationSettings, make_device_namespace, reference_varlen_attention
from glmport.backends._memory import host_memory_stats, reset_host_peak

from glmport.backend import Availability, Backend, MemoryStats


class DeviceModuleBackend(Backend):
    """Subclasses provide :meth:`_real_module` (the vendor's device module) and the real availability."""

    def __init__(self, *, emulated: bool = False, settings: EmulationSettings | None = None) -> None:
        self.emulated = emulated
        self.settings = settings or EmulationSettings()
        self._stand_in = None

    def emulation(self, knobs) -> DeviceModuleBackend:
        # the visible-devices mask is read when the twin is made, like the knobs (a launched worker's
        # mask comes from its launcher)
        mask = knobs.get(self.visible_devices_env, os.environ.get(self.visible_devices_env))
        return type(self)(emulated=True, settings=EmulationSettings.from_environ(knobs, mask))

    @property
    def deepspeed_accelerator(self) -> str:
        # DeepSpeed picks its accelerator by probing imports (a fake vendor module counts); emulated
        # tensors live on the CPU, so it must use its CPU accelerator then.
        return "cpu" if self.emulated else self.device_type

    def _real_module(self):  # must override
        raise NotImplementedError

    def _module(self):
        """The device module: the vendor's, or this object's CPU-backed stand-in when emulated."""
        if not self.emulated:
            return self._real_module()
        if self._stand_in is None:
            self._stand_in = make_device_namespace(self.device_type, self.settings)
        return self._stand_in

    def _hidden_by_mask(self) -> str:
        """`` (VAR='...')`` when the visible-devices variable is set: the usual reason no device is seen."""
        mask = os.environ.get(self.visible_devices_env)
        return f" ({self.visible_devices_env}={mask!r})" if mask is not None else ""

    def device(self, local_rank: int = 0):
        import torch

        if self.emulated:
            return torch.device("cpu")
        return torch.device(self.device_type, local_rank % max(self.device_count(), 1))

    def set_device(self, local_rank: int = 0) -> None:
        self._module().set_device(local_rank % max(self.device_count(), 1))

    def device_name(self, local_rank: int = 0) -> str:
        """``mlu:1``: the device index this rank binds, also when emulated (where tensors stay on the host)."""
        count = self.device_count()  # 0 where the device is not available (a dry run for another host)
        name = f"{self.device_type}:{local_rank % count if count else local_rank}"
        return f"{name} (emulated on the CPU)" if self.emulated else name

    def process_group_backend(self) -> str:
        # Emulated tensors live on the host: gloo moves them in place of the device's collective.
        return "gloo" if self.emulated else self.collective_backend

    def synchronize(self) -> None:
        self._module().synchronize()

    def seed(self, seed: int) -> None:
        super().seed(seed)
        self._module().manual_seed_all(seed)

    def memory_stats(self) -> MemoryStats:
        if self.emulated:
            return host_memory_stats()
        module = self._module()
        reserved = module.memory_reserved() if hasattr(module, "memory_reserved") else None
        return MemoryStats(module.memory_allocated(), module.max_memory_allocated(), reserved)

    def reset_peak_memory(self) -> None:
        if self.emulated:
            reset_host_peak()
        else:
            self._module().reset_peak_memory_stats()

    def free_memory(self) -> int | None:
        # emulated: the stand-in's mem_get_info (GLMPORT_EMULATE_MEMORY, less the process's resident memory)
        module = self._module()
        return int(module.mem_get_info()[0]) if hasattr(module, "mem_get_info") else None

    def compile_support(self) -> Availability:
        if self.emulated:
            return Availability(False, f"{self.device_type} is emulated on the CPU, where inductor would compile CPU "
                                       f"code: that says nothing of how the layers compile on a real {self.device_type}",
                                "set glmport.compile: false (or train on the cpu backend to try compile)")
        self._module()  # the vendor's module registers its inductor code generation when it is imported
        from torch._inductor.codegen.common import get_scheduling_for_device, init_backend_registration

        init_backend_registration()
        if get_scheduling_for_device(self.device_type) is None:
            return Availability(False, f"this torch (and its {self.device_type} extension) registers no inductor code "
                                       f"generation for {self.device_type}", "set glmport.compile: false")
        return Availability(True, f"inductor code generation for {self.device_type}")

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
        return torch.autocast(device_type="cpu" if self.emulated else self.device_type, dtype=dtype)

    def varlen_attention(self):
        """flash-attn's ``flash_attn_varlen_func`` when the device's build of it is installed (Cambricon
        ships one for MLU); the emulator's CPU reference under emulation."""
        if self.emulated:
            return reference_varlen_attention
        try:
            from flash_attn.flash_attn_interface import flash_attn_varlen_func
        except Exception:  # not installed, or built for another device
            return None
        return flash_attn_varlen_func

    def training_arguments(self) -> dict[str, Any]:
        if self.emulated:  # tensors live on the CPU: gloo is the collective that can move them
            return {"use_cpu": True, **super().training_arguments()}
        return super().training_arguments()

    def deepspeed(self):
        info = super().deepspeed()
        if not self.emulated:
            return info
        # Emulated tensors are on the host, where accelerate does not hand DeepSpeed a job (see the cpu
        # backend); off the CPU it would find the stand-in device module and ask for the vendor collective.
        missing = "" if info.installed else f"{info.note}; and even installed, "  # say both: each needs fixing
        return dataclasses.replace(info, usable=False, note=missing + (
            f"DeepSpeed does not run on an emulated {self.device_type} (its tensors are on the host, where "
            f"transformers cannot reach DeepSpeed): run it on a {self.device_type} host; --dry-run shows that "
            "launch here"))

    def environment(self) -> dict[str, str]:
        if self.emulated:  # launched workers make the same emulated twin from these
            return {"GLMPORT_EMULATE": self.device_type, "DS_ACCELERATOR": "cpu",
                    "GLMPORT_EMULATE_DEVICE_COUNT": str(self.settings.device_count),
                    "GLMPORT_EMULATE_BF16": "1" if self.settings.bf16 else "0",
                    **({"GLMPORT_EMULATE_MEMORY": str(self.settings.memory)} if self.settings.memory is not None else {})}
        return {}
