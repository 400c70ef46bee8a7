"""The NVIDIA CUDA backend (nccl collectives, ``CUDA_VISIBLE_DEVICES``)."""

from __future__ import annotations

from glmport.backends._device import DeviceModuleBackend
from glmport.backends._env import patched_environ

from glmport.backend import Availability
from glmport.hookspecs import hookimpl

CUDA_INSTALL_HINT = (
    "install a CUDA build of torch that matches your driver, e.g. "
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128; "
    "set GLMPORT_EMULATE=cuda to exercise this backend on a CPU"
)


class CudaBackend(DeviceModuleBackend):
    name = "cuda"
    description = "NVIDIA GPUs through torch.cuda"
    device_type = "cuda"
    auto_priority = 200
    collective_backend = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    deepspeed_min_version = "0.9.0"
    torchscript = True

    def _real_module(self):
        import torch

        return torch.cuda

    def availability(self) -> Availability:
        if self.emulated:
            return Availability(True, "emulated on the CPU (GLMPORT_EMULATE=cuda)")
        import torch

        if torch.version.cuda is None:
            return Availability(False, f"torch {torch.__version__} was built without CUDA", CUDA_INSTALL_HINT)
        # The NVML-based check counts devices without creating a CUDA context, so a later fork is safe.
        with patched_environ(PYTORCH_NVML_BASED_CUDA_CHECK="1"):
            ok = torch.cuda.is_available()
        if not ok:
            return Availability(False, f"no NVIDIA GPU is visible{self._hidden_by_mask()}",
                                "check the driver with nvidia-smi")
        return Availability(True, f"{torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda}")

    def quantization_kernels(self) -> Availability:
        if self.emulated:  # the stand-in device keeps tensors on the CPU, where bitsandbytes' CUDA kernels do not run
            return Availability(False, "bitsandbytes' CUDA kernels need a real GPU, and cuda is emulated here",
                                "train QLoRA on a real GPU or on the cpu backend, or LoRA without quantization")
        return Availability(True, "bitsandbytes' CUDA kernels")

    def compile_support(self) -> Availability:
        support = super().compile_support()
        if not support.available:
            return support
        from torch.utils._triton import has_triton

        if not has_triton():  # inductor writes Triton kernels for CUDA
            return Availability(False, "inductor generates Triton kernels for CUDA and triton is not installed",
                                "pip install the triton that matches your torch, or set glmport.compile: false")
        return Availability(True, "inductor with Triton kernels")

    def device_count(self) -> int:
        if self.emulated:
            return self._module().device_count()
        import torch

        if torch.version.cuda is None:
            return 0
        with patched_environ(PYTORCH_NVML_BASED_CUDA_CHECK="1"):
            return torch.cuda.device_count()


@hookimpl
def glmport_register_backends(registry) -> None:
    registry.add(CudaBackend())
