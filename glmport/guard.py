"""The 64-bit guard: fail a step when a 64-bit tensor reaches a compute op.

Devices without 64-bit kernels (Cambricon MLU) narrow 64-bit data silently. The guard makes every such
place visible on any machine: it is a ``TorchDispatchMode`` that inspects each aten op during a training
step (forward, backward, optimizer step) or a guarded forward (generation), and raises
:class:`~glmport.errors.SixtyFourBitError` naming the op, the tensor and the Python line that called it.

What counts: a tensor of a guarded dtype (int64, float64, ...) among the arguments of an op that computes.
Ops that only look at metadata or make views compute nothing and pass; so does an explicit conversion to a
32-bit dtype, which is the remedy. Creating a 64-bit tensor (``torch.arange(n)``) is not flagged by
itself; using it is.

``mode="report"`` collects every distinct leak instead of raising at the first one, for a full list.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

from glmport.errors import SixtyFourBitError

# Ops that compute nothing: views, metadata, aliasing, host reads. A 64-bit tensor passing through them
# is caught at the op that finally computes with it.
_NON_COMPUTE_OPS = {
    "detach", "alias", "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "unsqueeze", "squeeze",
    "expand", "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow", "as_strided",
    "lift_fresh", "lift_fresh_copy", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel",
    "is_same_size", "is_nonzero", "set_", "_reshape_alias", "empty_like", "new_empty", "new_empty_strided",
    "_has_compatible_shallow_copy_type", "resize_", "record_stream",
}


def _op_name(func) -> str:
    # "aten.view.default" -> "view"
    parts = str(func).split(".")
    return parts[1] if len(parts) >= 2 else str(func)


def _call_site(skip_prefixes: tuple[str, ...]) -> str:
    """The innermost Python frame outside torch and this module: where the user's (or the model's) code
    called the op."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        path = frame.filename.replace(os.sep, "/")
        if any(p in path for p in skip_prefixes):
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return "<unknown>"


@dataclass
class Leak:
    op: str
    dtype: str
    shape: tuple[int, ...]
    argument: int
    site: str

    def __str__(self) -> str:
        return f"{self.op} got a {self.dtype} tensor of shape {list(self.shape)} (argument {self.argument}) at {self.site}"


@dataclass
class GuardReport:
    leaks: list[Leak] = field(default_factory=list)
    ops_checked: int = 0

    @property
    def clean(self) -> bool:
        return not self.leaks


def _make_mode_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    skip = ("/torch/", "/glmport/guard.py", "/glmport/backends/_emulation.py", "/backends/_emulation.py")

    class SixtyFourBitGuardMode(TorchDispatchMode):
        def __init__(self, dtypes, label: str, mode: str, report: GuardReport):
            super().__init__()
            self.dtypes = frozenset(dtypes)
            self.label = label
            self.mode = mode
            self.report = report
            self._seen: set[tuple[str, str, str]] = set()

        def _is_exempt(self, name: str, kwargs) -> bool:
            if name in _NON_COMPUTE_OPS:
                return True
            if name in ("_to_copy", "to"):  # explicit narrowing is the remedy, not a leak
                target = kwargs.get("dtype")
                return target is not None and target not in self.dtypes
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.report.ops_checked += 1
            name = _op_name(func)
            if not self._is_exempt(name, kwargs):
                flat, _ = tree_flatten((args, kwargs))
                for index, value in enumerate(flat):
                    if isinstance(value, torch.Tensor) and value.dtype in self.dtypes:
                        self._leak(str(func), value, index)
                        break
            return func(*args, **kwargs)

        def _leak(self, op: str, tensor, index: int) -> None:
            leak = Leak(op, str(tensor.dtype).replace("torch.", ""), tuple(tensor.shape), index, _call_site(skip))
            if self.mode == "report":
                key = (leak.op, leak.dtype, leak.site)
                if key not in self._seen:
                    self._seen.add(key)
                    self.report.leaks.append(leak)
                return
            raise SixtyFourBitError(
                f"64-bit guard ({self.label}): {leak}\n"
                "    -> this device has no 64-bit kernels and would silently narrow this tensor. Make the "
                "tensor 32-bit where it is created (e.g. torch.arange(..., dtype=torch.int32)), or apply the "
                "patch set for this backend; run with glmport.guard_64bit=report to list every leak at once."
            )

    return SixtyFourBitGuardMode


_MODE_CLASS = None


@contextmanager
def sixty_four_bit_guard(dtypes: Iterable, *, label: str = "", mode: str = "error"):
    """Guard the enclosed code; yields a :class:`GuardReport`.

    ``dtypes``: the dtypes the device lacks (``SixtyFourBitPolicy.narrow`` keys). ``mode``: ``error``
    raises at the first leak, ``report`` collects them all into the yielded report.
    """
    global _MODE_CLASS
    if mode not in ("error", "report"):
        raise ValueError(f"guard mode must be 'error' or 'report', not {mode!r}")
    if _MODE_CLASS is None:
        _MODE_CLASS = _make_mode_class()
    report = GuardReport()
    with _MODE_CLASS(list(dtypes), label, mode, report):
        yield report
