"""Device emulation on CPU: a stand-in for ``torch_mlu`` (and for ``torch.cuda``) whose tensors live on the CPU.

``GLMPORT_EMULATE=mlu`` is both the CI stand-in for Cambricon hardware and a user feature: a laptop tells
you whether a training step is 64-bit clean before you book accelerator time.

What is emulated:

* a ``torch_mlu`` module in ``sys.modules`` and the ``torch.mlu`` namespace it installs on real hardware
  (device count and selection, synchronize, seeding and RNG state, memory statistics, bf16 support,
  autocast), so that glmport *and* transformers/accelerate take their MLU code paths;
* the MLU 64-bit policy: the backend narrows batches and the 64-bit guard is on by default;
* MLU kernels that take 32-bit indices where the CPU kernel insists on int64: the ops in
  :data:`CPU_KERNELS_NEEDING_INT64` get their int32 index arguments widened inside the emulator, after
  the guard has checked them. This list is the complete set of such upcasts.

What is not: tensors stay on the CPU (``torch.device("mlu")`` is not made a valid device string; a pure
Python device cannot hold a real model's storage), so placement reports ``cpu`` and the env report says
"emulated". Knobs: ``GLMPORT_EMULATE_DEVICE_COUNT`` (default 1), ``GLMPORT_EMULATE_BF16`` (default 1;
0 emulates an MLU370, which has no bf16) and ``GLMPORT_EMULATE_MEMORY`` (device memory, ``48GiB`` say, that
``mem_get_info`` reports, less the process's resident memory; default: the host's). The device's visible-devices variable masks the emulated devices
as the driver masks real ones: ``MLU_VISIBLE_DEVICES=1`` on an emulated 2-device host leaves one device,
and the list stops at the first id that does not exist.

Several processes: each rank binds its own emulated device (``set_device(local_rank)``), and the collective
the device declares (``cncl``) runs as gloo, since the tensors are on the host.

When things happen: the environment is read once, when the plugin manager makes the emulated twin of a
backend (:class:`EmulationSettings`). Probing and reporting change nothing in the process; the stand-in
``torch_mlu`` is installed by :func:`installed_torch_mlu`, which the emulated backend's ``activate()``
enters when a run starts and which undoes itself when the run ends.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from dataclasses import dataclass

EMULATED_VERSION = "0.0.0+glmport.emulated"

# aten ops whose CPU kernels reject int32 index/target tensors although the MLU kernels take them.
# Widening happens inside the emulator only; the guard sees the int32 argument the model really passed.
CPU_KERNELS_NEEDING_INT64 = frozenset(
    {
        "aten.nll_loss_forward.default",
        "aten.nll_loss_backward.default",
        "aten.nll_loss2d_forward.default",
        "aten.nll_loss2d_backward.default",
    }
)


@dataclass(frozen=True)
class EmulationSettings:
    """The emulator's knobs, read from the environment once, when an emulated backend is made.
    ``device_count`` is the emulated host's; ``visible`` the devices its visible-devices mask leaves
    (``None``: no mask, all of them)."""

    device_count: int = 1
    bf16: bool = True
    visible: tuple[int, ...] | None = None
    memory: int | None = None  # bytes of device memory (GLMPORT_EMULATE_MEMORY); None: the host's

    @classmethod
    def from_environ(cls, environ=None, mask: str | None = None) -> EmulationSettings:
        env = environ if environ is not None else os.environ
        try:
            count = max(int(env.get("GLMPORT_EMULATE_DEVICE_COUNT", "1")), 1)
        except ValueError:
            count = 1
        bf16 = env.get("GLMPORT_EMULATE_BF16", "1").strip().lower() not in {"0", "false", "no", "off"}
        return cls(count, bf16, _masked(mask, count), parse_memory(env.get("GLMPORT_EMULATE_MEMORY")))

    @property
    def visible_count(self) -> int:
        return self.device_count if self.visible is None else len(self.visible)


def _masked(mask: str | None, count: int) -> tuple[int, ...] | None:
    """The devices a visible-devices value leaves, read like the drivers read it: up to the first entry
    that is not an existing device id."""
    if mask is None:
        return None
    visible: list[int] = []
    for entry in mask.split(","):
        entry = entry.strip()
        if not entry.isdigit() or int(entry) >= count or int(entry) in visible:
            break
        visible.append(int(entry))
    return tuple(visible)


def parse_memory(value: str | None) -> int | None:
    """``GLMPORT_EMULATE_MEMORY``: bytes, or a number with KiB/MiB/GiB (``24GiB``); unset or unreadable: None."""
    if not value or not value.strip():
        return None
    text = value.strip().lower().removesuffix("b")
    scale = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    factor = scale.get(text.removesuffix("i")[-1:], 1)
    number = text.removesuffix("i").rstrip("kmgt") if factor != 1 else text
    try:
        return max(int(float(number) * factor), 0)
    except ValueError:
        return None


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes."""
    current = peak = 0
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        current = peak
    return current, max(peak, current)


def _reset_rss_peak() -> None:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        pass


def make_device_namespace(device_type: str, settings: EmulationSettings) -> types.ModuleType:
    """A module with the ``torch.cuda``/``torch.mlu`` API subset glmport, transformers and accelerate use,
    backed by the CPU."""
    import torch

    ns = types.ModuleType(f"torch.{device_type}")
    state = {"current": 0}
    count, bf16 = settings.visible_count, settings.bf16

    def is_available() -> bool:
        return True

    def device_count() -> int:
        return count

    def current_device() -> int:
        return state["current"]

    def set_device(device) -> None:
        index = device.index if isinstance(device, torch.device) else int(device)
        if not 0 <= (index or 0) < count:
            raise RuntimeError(f"emulated {device_type}: invalid device ordinal {index} (count {count})")
        state["current"] = index or 0

    def synchronize(device=None) -> None:
        return None

    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(device=None):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=None) -> None:
        torch.set_rng_state(new_state)

    def get_rng_state_all():
        return [torch.get_rng_state() for _ in range(count)]

    def set_rng_state_all(states) -> None:
        if states:
            torch.set_rng_state(states[0])

    def memory_allocated(device=None) -> int:
        return _rss()[0]

    def max_memory_allocated(device=None) -> int:
        return _rss()[1]

    def reset_peak_memory_stats(device=None) -> None:
        _reset_rss_peak()

    def mem_get_info(device=None):
        total = settings.memory if settings.memory is not None else _total_memory()
        return max(total - _rss()[0], 0), total

    random_ns = types.ModuleType(f"torch.{device_type}.random")
    for fn in (manual_seed, get_rng_state, set_rng_state, get_rng_state_all, set_rng_state_all):
        setattr(random_ns, fn.__name__, fn)

    amp_ns = types.ModuleType(f"torch.{device_type}.amp")
    amp_ns.autocast = lambda enabled=True, dtype=torch.bfloat16, cache_enabled=True: torch.autocast(
        "cpu", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled
    )

    ns.__dict__.update(
        is_available=is_available,
        device_count=device_count,
        current_device=current_device,
        set_device=set_device,
        synchronize=synchronize,
        manual_seed=manual_seed,
        manual_seed_all=manual_seed,
        seed=lambda: torch.seed(),
        initial_seed=lambda: torch.initial_seed(),
        get_rng_state=get_rng_state,
        set_rng_state=set_rng_state,
        get_rng_state_all=get_rng_state_all,
        set_rng_state_all=set_rng_state_all,
        random=random_ns,
        amp=amp_ns,
        memory_allocated=memory_allocated,
        max_memory_allocated=max_memory_allocated,
        memory_reserved=memory_allocated,
        max_memory_reserved=max_memory_allocated,
        reset_peak_memory_stats=reset_peak_memory_stats,
        reset_max_memory_allocated=reset_peak_memory_stats,
        empty_cache=lambda: None,
        mem_get_info=mem_get_info,
        is_bf16_supported=lambda *a, **k: bf16,
        get_device_name=lambda device=None: f"emulated {device_type.upper()} (CPU)",
        get_amp_supported_dtype=lambda: [torch.float16, torch.bfloat16] if bf16 else [torch.float16],
        _is_in_bad_fork=lambda: False,
        _glmport_emulated=True,
    )
    return ns


def _fake_torch_mlu(namespace: types.ModuleType) -> types.ModuleType:
    module = types.ModuleType("torch_mlu")
    # A real spec: importlib.util.find_spec (used by transformers and accelerate) raises on a module
    # in sys.modules whose __spec__ is None.
    module.__spec__ = importlib.machinery.ModuleSpec("torch_mlu", loader=None, origin="glmport emulation")
    module.__version__ = EMULATED_VERSION
    module.mlu = namespace
    module._glmport_emulated = True
    return module


# Libraries that remember "is there an MLU" (functools caches): asked again whenever the stand-in comes or goes,
# so that they neither miss it during a run nor look for torch.mlu after it is gone.
DEVICE_PROBES = (("accelerate.utils.imports", ("is_mlu_available", "is_cuda_available")),
                 ("transformers.utils.import_utils", ("is_torch_mlu_available",)))


def forget_device_probes() -> None:
    for module_name, names in DEVICE_PROBES:
        module = sys.modules.get(module_name)
        for name in names:
            clear = getattr(getattr(module, name, None), "cache_clear", None)
            if clear is not None:
                clear()


def _peft_device_module():
    """peft decides once, when it is imported, whether an MLU is there (``peft.utils.other.mlu_available``)
    and then loads adapter weights onto device "mlu", a device type torch does not know without the real
    torch_mlu. Emulated tensors live on the CPU, so peft must have made up its mind before the stand-in
    appears (and must not keep an answer from an earlier activation in this process)."""
    try:
        import peft.utils.other as peft_devices
    except ImportError:
        return None
    if getattr(peft_devices, "mlu_available", False) and importlib.util.find_spec("torch_mlu") is None:
        peft_devices.mlu_available = False
    return peft_devices


@contextlib.contextmanager
def installed_torch_mlu(namespace: types.ModuleType):
    """Put a stand-in ``torch_mlu`` in ``sys.modules`` and ``namespace`` at ``torch.mlu`` for the block.

    Nested or repeated activations reuse what is there; only the activation that installed the stand-in
    removes it. A real ``torch_mlu`` is never replaced.
    """
    import torch

    if "torch_mlu" in sys.modules:
        yield sys.modules["torch_mlu"]
        return
    peft_devices = _peft_device_module()  # imported before the stand-in exists: see _peft_device_module
    module = _fake_torch_mlu(namespace)
    sys.modules["torch_mlu"] = module
    torch.mlu = namespace
    forget_device_probes()
    try:
        yield module
    finally:
        if sys.modules.get("torch_mlu") is module:
            del sys.modules["torch_mlu"]
        if getattr(torch, "mlu", None) is namespace:
            del torch.mlu
        forget_device_probes()
        if peft_devices is not None:
            peft_devices.mlu_available = False


def _make_int32_kernel_mode():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Int32KernelEmulation(TorchDispatchMode):
        """Widen int32 index arguments for the CPU kernels in CPU_KERNELS_NEEDING_INT64."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if str(func) in CPU_KERNELS_NEEDING_INT64:
                args = tuple(
                    a.long() if isinstance(a, torch.Tensor) and a.dtype == torch.int32 else a for a in args
                )
            return func(*args, **kwargs)

    return Int32KernelEmulation


def reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False):
    """A CPU stand-in for ``flash_attn_varlen_func``: attention per packed sequence with SDPA.

    Emulated devices offer it so the patch sets' variable-length path (int32 ``cu_seqlens``, unpadding,
    causal flag) runs in CI exactly as it would with the device's kernel. Like flash-attn, k/v may have
    fewer heads than q (grouped/multi-query attention: query head ``h`` uses key/value head
    ``h // (heads / kv_heads)``), and ``cu_seqlens`` must be int32.
    """
    import torch
    import torch.nn.functional as F

    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32:
            raise TypeError(f"varlen attention: {name} must be int32 (flash-attn's convention), not {cu.dtype}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"varlen attention: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.empty_like(q)
    for i in range(len(starts_q) - 1):
        qs, qe, ks, ke = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        seg = F.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1),
            dropout_p=dropout_p, is_causal=causal, scale=softmax_scale, enable_gqa=kv_heads != heads,
        )
        out[qs:qe] = seg.transpose(0, 1)
    return out


_MODE = None


@contextlib.contextmanager
def int32_kernel_emulation():
    global _MODE
    if _MODE is None:
        _MODE = _make_int32_kernel_mode()
    with _MODE():
        yield
