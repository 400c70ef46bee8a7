"""Narrowing 64-bit tensors in a batch before it goes to a device that has no 64-bit kernels.

Cambricon's MLU runtime narrows 64-bit data silently ("the 64 bit data will be forcibly converted to 32-bit
for calculation"): a token id or an offset past 2**31 becomes garbage without an error. glmport narrows
explicitly, before the copy, and refuses values that do not survive the conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from glmport.errors import SixtyFourBitError


def _infinite(tensor, torch):
    if tensor.is_complex():
        return torch.isinf(tensor.real) | torch.isinf(tensor.imag)
    return torch.isinf(tensor)


def _narrow_tensor(tensor, target, where: str):
    import torch

    if tensor.numel() == 0:
        return tensor.to(target)
    if target.is_floating_point or target.is_complex:
        narrowed = tensor.to(target)
        overflow = _infinite(narrowed, torch) & ~_infinite(tensor, torch)
        if bool(overflow.any()):
            bad = tensor[overflow].flatten()[0].item()
            largest = torch.finfo(narrowed.real.dtype if target.is_complex else target).max
            raise SixtyFourBitError(
                f"{where}: value {bad!r} does not fit in {target} (largest finite {largest:g}); "
                "rescale it before training on this backend"
            )
        return narrowed
    info = torch.iinfo(target)
    low, high = tensor.min().item(), tensor.max().item()
    if low < info.min or high > info.max:
        bad = high if high > info.max else low
        raise SixtyFourBitError(
            f"{where}: value {bad} does not fit in {target} (range {info.min}..{info.max}); this backend has "
            "no 64-bit integer kernels, so the value would be corrupted. Check the ids/offsets in this field."
        )
    return tensor.to(target)


def coerce_batch(batch: Any, narrow: Mapping[Any, Any], *, where: str = "batch") -> Any:
    """Return ``batch`` with every tensor whose dtype is a key of ``narrow`` converted to the mapped dtype.

    Dicts (including ``BatchEncoding``), lists and tuples are walked; other values pass through.
    ``where`` prefixes the key path in error messages, e.g. ``batch['labels']``.
    """
    import torch

    if isinstance(batch, torch.Tensor):
        target = narrow.get(batch.dtype)
        return _narrow_tensor(batch, target, where) if target is not None else batch
    if isinstance(batch, Mapping):
        converted = {k: coerce_batch(v, narrow, where=f"{where}[{k!r}]") for k, v in batch.items()}
        if type(batch) is dict:
            return converted
        try:  # keep BatchEncoding and friends
            clone = batch.__class__(converted)
            return clone
        except Exception:
            return converted
    if isinstance(batch, list):
        return [coerce_batch(v, narrow, where=f"{where}[{i}]") for i, v in enumerate(batch)]
    if isinstance(batch, tuple) and not hasattr(batch, "_fields"):
        return tuple(coerce_batch(v, narrow, where=f"{where}[{i}]") for i, v in enumerate(batch))
    return batch
