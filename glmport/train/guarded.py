"""Running a model's forward the way the backend wants it, outside the Trainer's own steps.

Generation calls the model's forward once per new token from transformers' loop; those inputs (token ids
from ``argmax``, cache positions) are int64 by torch's rules. Wrapping the forward narrows them like any
other batch, runs the backend's compute context and, when asked, the 64-bit guard, so "the step is
64-bit clean" covers generation too. :func:`guard_mode_for` is how ``glmport train`` and ``glmport infer``
turn their ``guard_64bit`` setting into a mode.
"""

from __future__ import annotations

import contextlib
import functools

from glmport.guard import sixty_four_bit_guard


def guard_mode_for(setting: str, backend) -> str | None:
    """The 64-bit guard mode for a ``guard_64bit`` setting (``glmport.guard_64bit``, ``--guard-64bit``):
    ``None`` (off), ``"report"`` or ``"error"``; ``auto`` is ``"error"`` on an emulated device, else off."""
    if setting == "off":
        return None
    if setting == "report":
        return "report"
    if setting == "on":
        return "error"
    return "error" if backend.emulated else None  # auto


def innermost_model(model):
    """The transformers model under peft wrappers (whose forward generation calls)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def guarded_forward(model, backend, guard_mode: str | None, on_report=None):
    target = innermost_model(model)
    own = target.__dict__.get("forward")  # e.g. accelerate's autocast wrapper: must survive us
    original = target.forward
    policy = backend.sixty_four_bit_policy()
    use_guard = bool(guard_mode) and policy.lacks_64bit

    @functools.wraps(original)  # generate() inspects the forward's signature
    def forward(*args, **kwargs):
        args, kwargs = backend.coerce(args, where="forward args"), backend.coerce(kwargs, where="forward")
        with backend.compute_context():
            if not use_guard:
                return original(*args, **kwargs)
            with sixty_four_bit_guard(policy.narrow.keys(), label=backend.name, mode=guard_mode) as report:
                result = original(*args, **kwargs)
            if on_report is not None:
                on_report(report)
            return result

    target.forward = forward
    try:
        yield
    finally:
        if own is not None:
            target.forward = own
        else:
            del target.forward  # back to the class's method
