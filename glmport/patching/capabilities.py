"""What a backend can do, in the terms patches are chosen by.

A patch names the capabilities it ``requires`` instead of backend names, so a backend added by a plugin
(an Ascend NPU, say) that lacks 64-bit kernels gets the int32 patches exactly like the MLU does. Backend
names stay in a patch's ``backends`` only where the patch is truly vendor-specific.

Each capability is answered by the backend object alone (attributes and methods of
:class:`glmport.backend.Backend`), without touching the device.
"""

from __future__ import annotations

from collections.abc import Callable

CAPABILITIES: dict[str, tuple[str, Callable]] = {
    "lacks-64bit": (
        "the device has no 64-bit kernels (Backend.sixty_four_bit_policy().lacks_64bit)",
        lambda backend: backend.sixty_four_bit_policy().lacks_64bit,
    ),
    "no-torchscript": (
        "the device runs no TorchScript fusers (Backend.torchscript is false)",
        lambda backend: not backend.torchscript,
    ),
    "accelerator": (
        "tensors are meant for a device other than the host CPU (Backend.device_type != 'cpu')",
        lambda backend: backend.device_type != "cpu",
    ),
}


def has(backend, capability: str) -> bool:
    try:
        _, answer = CAPABILITIES[capability]
    except KeyError:
        raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}") from None
    return bool(answer(backend))


def capabilities_of(backend) -> list[str]:
    """Every capability ``backend`` has (for ``glmport patch plan`` and ``glmport backends``)."""
    return [name for name in CAPABILITIES if has(backend, name)]
