"""The Cambricon MLU backend (torch_mlu, cncl collectives, ``MLU_VISIBLE_DEVICES``).

torch_mlu is imported lazily, inside this module only. Availability is probed with the CNDEV-based check
(``PYTORCH_CNDEV_BASED_MLU_CHECK=1``), which does not initialize the driver, so probing is safe before a
fork. MLU kernels compute in 32 bits: batches are narrowed before they are moved (see
:class:`~glmport.backend.SixtyFourBitPolicy`).

``GLMPORT_EMULATE=mlu`` makes an emulated twin whose ``activate()`` installs a CPU-backed stand-in for
torch_mlu while a run uses it (see ``_emulation.py``).
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext

from glmport.backends._device import DeviceModuleBackend
from glmport.backends._emulation import installed_torch_mlu, int32_kernel_emulation
from glmport.backends._env import patched_environ

from glmport.backend import Availability, SixtyFourBitPolicy
from glmport.hookspecs import hookimpl

MLU_INSTALL_HINT = (
    "install Cambricon's torch_mlu built for your torch version (it ships in the Cambricon PyTorch "
    "container and the Neuware SDK); or set GLMPORT_EMULATE=mlu to emulate an MLU on this CPU"
)


class MluBackend(DeviceModuleBackend):
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

    def availability(self) -> Availability:
        if self.emulated:
            return Availability(
                True, "emulated on the CPU (GLMPORT_EMULATE=mlu): tensors stay on the CPU, 64-bit guard on")
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
            return Availability(False, f"torch_mlu is installed but no MLU is visible{self._hidden_by_mask()}",
                                "check the driver with cnmon")
        return Availability(True, f"{torch.mlu.device_count()} MLU(s), torch_mlu {getattr(torch_mlu, '__version__', '?')}")

    def _real_module(self):
        import torch
        import torch_mlu  # noqa: F401  (installs torch.mlu)

        return torch.mlu

    def activate(self):
        return installed_torch_mlu(self._module()) if self.emulated else nullcontext()

    def device_count(self) -> int:
        if not self.emulated and importlib.util.find_spec("torch_mlu") is None:
            return 0
        with patched_environ(PYTORCH_CNDEV_BASED_MLU_CHECK="1"):
            return self._module().device_count()

    def sixty_four_bit_policy(self) -> SixtyFourBitPolicy:
        import torch

        return SixtyFourBitPolicy(
            {torch.int64: torch.int32, torch.float64: torch.float32, torch.complex128: torch.complex64}
        )

    def compute_context(self):
        return int32_kernel_emulation() if self.emulated else nullcontext()

    def quantization_kernels(self) -> Availability:
        # torch_mlu registers no bitsandbytes kernels, and bitsandbytes ships none for MLU (emulated or real)
        return Availability(False, "bitsandbytes has no MLU kernels (torch_mlu brings none)",
                            "train LoRA with a bf16 base on mlu (glmport.quantization: none), or QLoRA on cuda")

    def environment(self) -> dict[str, str]:
        return super().environment() if self.emulated else {"PYTORCH_CNDEV_BASED_MLU_CHECK": "1"}


@hookimpl
def glmport_register_backends(registry) -> None:
    registry.add(MluBackend())
