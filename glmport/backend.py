"""The device backend interface, the registry of backends, and backend selection.

A backend is an object that answers every device question glmport has; nothing else in glmport names a
device API. Builtin backends (``cpu``, ``cuda``, ``mlu``) and third-party ones register through the same
hook (``glmport_register_backends``).

This module does not import torch at import time: ``glmport --help`` and ``glmport backends`` must stay
fast, and detection must not initialize a device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from glmport.deepspeed_info import DeepSpeedInfo, detect_deepspeed
from glmport.errors import BackendUnavailable, PluginError
from glmport.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here. ``reason`` is shown to the user either way."""

    available: bool
    reason: str
    install_hint: str = ""


@dataclass(frozen=True)
class MemoryStats:
    """Device memory in bytes. ``peak`` is since the last ``reset_peak_memory``."""

    allocated: int
    peak: int
    reserved: int | None = None


@dataclass
class SixtyFourBitPolicy:
    """What a device lacks in 64-bit support and how batches are narrowed before they are moved to it.

    ``narrow`` maps a dtype the device has no kernels for to the dtype glmport converts it to. An empty
    mapping means the device computes in 64 bits and batches are left alone.
    """

    narrow: dict[Any, Any] = field(default_factory=dict)

    @property
    def lacks_64bit(self) -> bool:
        return bool(self.narrow)


class Backend:
    """Base class of every device backend.

    Subclasses set the class attributes and implement the methods marked "must override". Defaults are
    the behaviour of a single-device host that computes in 64 bits.

    Attributes:
        name: the ``--backend`` value.
        description: one line for ``glmport backends``.
        device_type: the torch device type tensors are placed on (``cpu``, ``cuda``, ``mlu``...).
        auto_priority: position in the ``--backend auto`` chain; higher is tried first. Builtins use
            mlu 300, cuda 200, cpu 0. Vendor backends whose migration shims make the NVIDIA device
            module report itself available (Ascend ``transfer_to_npu``, Cambricon ``gpu_migration``)
            must rank above cuda.
        collective_backend: the ``torch.distributed`` backend name (``gloo``, or the vendor's).
        visible_devices_env: the environment variable that masks devices, or ``None``.
        deepspeed_accelerator: the ``DS_ACCELERATOR`` value for this device.
        deepspeed_distributions: distribution names that provide DeepSpeed for this device, in order of
            preference (a vendor fork installs the import package ``deepspeed`` under another name).
        torchscript: whether the device runs TorchScript's fusers (the remote code's ``@torch.jit.script``
            and fuser flags). Only CUDA does; patch sets turn TorchScript off everywhere else.
        emulated: fixed when the object is made. An emulated backend is a separate object, made by
            :meth:`emulation` when ``GLMPORT_EMULATE`` (or ``glmport.emulate``) names it; nothing re-reads
            the environment afterwards.
        one_process_per_device: a multi-process launch binds each process to a device of its own, so a node
            runs at most :meth:`device_count` processes. The host CPU sets False: its processes share it.
    """

    name: str = ""
    description: str = ""
    device_type: str = "cpu"
    auto_priority: int = 0
    collective_backend: str = "gloo"
    visible_devices_env: str | None = None
    deepspeed_accelerator: str = "cpu"
    deepspeed_distributions: tuple[str, ...] = ("deepspeed",)
    deepspeed_min_version: str = "0.15.2"
    torchscript: bool = False
    emulated: bool = False
    one_process_per_device: bool = True

    # --- emulation ---------------------------------------------------------------------------------
    def emulation(self, knobs: Mapping[str, str]) -> Backend | None:
        """A twin of this backend that runs on the host CPU (see ``backends/_emulation.py``), or ``None``
        when this backend cannot be emulated. ``knobs`` are the ``GLMPORT_EMULATE_*`` settings, read from
        the environment when the plugin manager was made. Making the twin must have no side effects."""
        return None

    def activate(self) -> AbstractContextManager:
        """Process-wide setup this backend needs while a run uses it, undone on exit. Entered when
        training or inference starts, never by detection or reporting. Emulated MLU installs its stand-in
        device module here so that transformers and accelerate take their MLU code paths."""
        return nullcontext()

    # --- detection (must not initialize the device) ----------------------------------------------
    def availability(self) -> Availability:  # must override
        raise NotImplementedError

    def device_count(self) -> int:  # must override
        raise NotImplementedError

    # --- placement ---------------------------------------------------------------------------------
    def device(self, local_rank: int = 0) -> torch.device:
        """The device that tensors of process ``local_rank`` are placed on."""
        import torch

        count = max(self.device_count(), 1)
        return torch.device(self.device_type, local_rank % count)

    def set_device(self, local_rank: int = 0) -> None:
        """Make ``device(local_rank)`` the current device of this process."""

    def synchronize(self) -> None:
        """Wait for all queued work on the current device."""

    def seed(self, seed: int) -> None:
        """Seed every random generator that affects training on this device (host ones included)."""
        import random

        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # --- memory ------------------------------------------------------------------------------------
    def memory_stats(self) -> MemoryStats:  # must override
        raise NotImplementedError

    def reset_peak_memory(self) -> None:  # must override
        raise NotImplementedError

    def free_memory(self) -> int | None:
        """Bytes the current device can still allocate (``glmport.gradient_checkpointing: auto`` fits its
        estimate into them), or ``None`` when the device does not say."""
        return None

    # --- dtypes ------------------------------------------------------------------------------------
    def supported_dtypes(self) -> list[torch.dtype]:
        """Floating dtypes this device trains in, best first."""
        import torch

        return [torch.float32]

    def preferred_dtype(self) -> torch.dtype:
        """The dtype frozen base weights are loaded in: the first half-precision dtype supported, bf16
        before fp16; fp32 when the device has neither."""
        import torch

        supported = self.supported_dtypes()
        for candidate in (torch.bfloat16, torch.float16):
            if candidate in supported:
                return candidate
        return torch.float32

    def autocast(self, dtype: torch.dtype | None) -> AbstractContextManager:
        """A context that runs eligible ops in ``dtype`` (no-op for ``None`` or float32)."""
        import torch

        if dtype is None or dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def compile_support(self) -> Availability:
        """Whether ``torch.compile`` (inductor) compiles and trains the model's layers on this device
        (``glmport.compile``), and why not. Default: no; a backend says yes where inductor has code
        generation for the device."""
        return Availability(False, f"inductor has no code generation known to glmport for {self.name}",
                            "set glmport.compile: false")

    def quantization_kernels(self) -> Availability:
        """Whether bitsandbytes has 4-/8-bit kernels for this device (QLoRA, ``glmport.quantization``), and
        why not. Whether bitsandbytes is installed is asked separately (:mod:`glmport.train.quantization`).
        Default: no; a backend says yes only where its kernels were seen to train."""
        return Availability(False, f"bitsandbytes has no kernels for {self.name}",
                            "train LoRA without quantization (glmport.quantization: none, bf16 base), or on cuda")

    def varlen_attention(self):
        """The device's variable-length attention kernel, or ``None``.

        The callable takes ``(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p=0.0, softmax_scale=None, causal=False)`` with q/k/v as ``[total_tokens, heads, head_dim]``
        and int32 ``cu_seqlens`` (the flash-attn ``flash_attn_varlen_func`` convention). Patch sets use it
        to attend over padded batches without materializing ``[batch, 1, seq, seq]`` masks.
        """
        return None

    def compute_context(self) -> AbstractContextManager:
        """A context entered around every training step and guarded forward. Real devices need none;
        emulated ones use it to run device-specific kernel semantics on the CPU."""
        return nullcontext()

    # --- 64-bit policy -----------------------------------------------------------------------------
    def sixty_four_bit_policy(self) -> SixtyFourBitPolicy:
        """Which 64-bit dtypes this device lacks. Default: none (the device computes in 64 bits)."""
        return SixtyFourBitPolicy()

    def coerce(self, batch: Any, *, where: str = "batch") -> Any:
        """Narrow the 64-bit tensors of ``batch`` (a tensor, or dicts/lists/tuples of them) to the dtypes
        of :meth:`sixty_four_bit_policy`, before the batch is moved to the device.

        Raises :class:`~glmport.errors.SixtyFourBitError` naming the key when a value does not fit.
        """
        from glmport.coerce import coerce_batch

        policy = self.sixty_four_bit_policy()
        if not policy.lacks_64bit:
            return batch
        return coerce_batch(batch, policy.narrow, where=where)

    # --- distributed and DeepSpeed -----------------------------------------------------------------
    def deepspeed(self) -> DeepSpeedInfo:
        """Which DeepSpeed distribution serves this device and the ``DS_ACCELERATOR`` value to use."""
        return detect_deepspeed(self.deepspeed_distributions, self.deepspeed_accelerator, self.deepspeed_min_version)

    def process_group_backend(self) -> str:
        """The ``torch.distributed`` backend a process of a multi-process run initializes: the device's
        :attr:`collective_backend`, unless the device is emulated on the host (then gloo moves the tensors,
        and the emulator says so)."""
        return self.collective_backend

    def training_arguments(self) -> dict[str, Any]:
        """Overrides for ``Seq2SeqTrainingArguments`` that put the Trainer (and accelerate under it) on
        this backend: device choice, and the collective backend when this process is one of several
        (accelerate treats any ``ddp_backend`` as a request for a process group). The user's YAML cannot
        override these."""
        return {"ddp_backend": self.process_group_backend()} if launched_distributed() else {}

    def deepspeed_training_arguments(self) -> dict[str, Any]:
        """The same overrides when DeepSpeed runs the job (``training_args.deepspeed``). DeepSpeed chooses
        the device itself (``DS_ACCELERATOR``) and accelerate hands DeepSpeed the job only when it is not
        told to use the CPU, so the default drops ``use_cpu``."""
        return {key: value for key, value in self.training_arguments().items() if key != "use_cpu"}

    def environment(self) -> dict[str, str]:
        """Environment variables the training process needs on this backend (set before the model
        loads, and exported to launched workers)."""
        return {}

    # --- launching several processes ---------------------------------------------------------------
    def device_name(self, local_rank: int = 0) -> str:
        """Where process ``local_rank`` of a node runs, for people: ``cuda:1``, ``mlu:0``, ``cpu``."""
        return str(self.device(local_rank))

    def launch_environment(self, visible: list[str] | None = None) -> dict[str, str]:
        """The environment a launcher gives every process of a node: :meth:`environment`, plus the
        visible-devices variable set to ``visible`` (device ids as the variable takes them) when given."""
        env = dict(self.environment())
        if visible is not None:
            if not self.visible_devices_env:
                raise ValueError(f"backend {self.name} has no visible-devices variable: it cannot be given a "
                                 "list of devices")
            env[self.visible_devices_env] = ",".join(visible)
        return env

    # --- reporting ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Everything ``glmport backends`` shows for this backend. Safe on unavailable backends."""
        status = self.availability()
        count = self.device_count() if status.available else 0
        ds = self.deepspeed()
        return {
            "name": self.name,
            "description": self.description,
            "available": status.available,
            "emulated": self.emulated,
            "reason": status.reason,
            "install_hint": status.install_hint,
            "device_type": self.device_type,
            "device_count": count,
            "collective_backend": self.collective_backend,
            "visible_devices_env": self.visible_devices_env,
            "visible_devices": os.environ.get(self.visible_devices_env) if self.visible_devices_env else None,
            "deepspeed": ds.as_dict(),
            "auto_priority": self.auto_priority,
        }


class BackendRegistry(Registry[Backend]):
    """Backends by name, filled through ``glmport_register_backends``; iterated in the auto chain's order."""

    kind = "backend"
    item_type = Backend
    emulation_knobs: dict[str, str] = {}  # replaced, never mutated

    def ordered(self) -> list[Backend]:
        return self.auto_chain()

    def auto_chain(self) -> list[Backend]:
        """Backends in the order ``--backend auto`` tries them: priority high to low, then name."""
        return sorted(self._items.values(), key=lambda b: (-b.auto_priority, b.name))

    def emulate(self, names, knobs: Mapping[str, str] | None = None) -> None:
        """Replace each named backend by its emulated twin (``GLMPORT_EMULATE=mlu``, ``glmport.emulate``)."""
        if knobs is not None:
            self.emulation_knobs = dict(knobs)
        for name in names:
            backend = self.get(name)
            if backend is None:
                raise PluginError(f"GLMPORT_EMULATE={name}: no backend {name!r} is registered; "
                                  f"known backends: {', '.join(self.names())}")
            if backend.emulated:
                continue
            twin = backend.emulation(self.emulation_knobs)
            if twin is None:
                raise PluginError(f"GLMPORT_EMULATE={name}: backend {name!r} cannot be emulated")
            self.replace(name, twin)

    def with_emulation(self, names) -> BackendRegistry:
        """A copy of this registry with ``names`` emulated (this one is left as it is)."""
        copy = BackendRegistry()
        copy._items, copy._origin = dict(self._items), dict(self._origin)
        copy.emulate(names, self.emulation_knobs)
        return copy


@dataclass(frozen=True)
class Selection:
    """The chosen backend, how it was chosen, and what its availability check said (for ``glmport env``
    and the run summary: asked once, never again)."""

    backend: Backend
    how: str
    availability: Availability


def emulation_knobs(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``GLMPORT_EMULATE_*`` settings of the environment (device count, bf16, ...)."""
    env = environ if environ is not None else os.environ
    return {key: value for key, value in env.items() if key.startswith("GLMPORT_EMULATE_")}


def parse_emulate(value: str | None) -> tuple[str, ...]:
    """Backend names from a ``GLMPORT_EMULATE`` / ``glmport.emulate`` value (comma separated)."""
    return tuple(part.strip().lower() for part in (value or "").split(",") if part.strip())


def select_backend(registry: BackendRegistry, requested: str | None, *, flag: str = "--backend",
                   emulate: tuple[str, ...] = ()) -> Selection:
    """Resolve ``requested`` (``None``/``auto`` or a backend name) to an available backend.

    ``auto`` walks :meth:`BackendRegistry.auto_chain` and takes the first available backend. A named
    backend that is not available is an error that says why and what to install: there is no silent
    fallback to another device. ``emulate`` names backends to use emulated for this selection only.
    """
    if emulate:
        registry = registry.with_emulation(emulate)
    env_choice = os.environ.get("GLMPORT_BACKEND")
    if requested in (None, "", "auto") and env_choice and env_choice != "auto":
        requested, flag = env_choice, "GLMPORT_BACKEND"
    if requested in (None, "", "auto"):
        skipped = []
        for backend in registry.auto_chain():
            status = backend.availability()
            if status.available:
                how = "auto: first available of " + " > ".join(registry.names())
                if skipped:
                    how += " (" + "; ".join(skipped) + ")"
                return Selection(backend, how, status)
            skipped.append(f"{backend.name}: {status.reason}")
        raise BackendUnavailable("no backend is available:\n  " + "\n  ".join(skipped))

    backend = registry.get(requested)
    if backend is None:
        raise BackendUnavailable(
            f"{flag} {requested!r}: no such backend. Known backends: {', '.join(registry.names())}. "
            "A third-party backend appears here once its plugin distribution is installed."
        )
    status = backend.availability()
    if not status.available:
        hint = f"\n    -> {status.install_hint}" if status.install_hint else ""
        raise BackendUnavailable(f"{flag} {requested}: backend {requested!r} is not available: {status.reason}{hint}")
    return Selection(backend, f"requested with {flag}", status)


def launched_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """True in a worker started by torchrun/deepspeed with more than one process."""
    env = environ if environ is not None else os.environ
    try:
        return int(env.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """True when an environment variable is set to a yes-like value."""
    value = (environ if environ is not None else os.environ).get(name, "")
    return value.strip().lower() in {"1", "true", "yes", "on"}
