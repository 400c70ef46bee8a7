"""User-facing errors.

Every error glmport raises for bad input is a :class:`GlmportError`. The CLI prints its message and exits
with its ``exit_code``; no traceback, because the message already says where the problem is (file, line,
key or flag) and what to do about it. Errors that gather several problems (a config file, a data file, a
patch preflight) hold a list of :class:`Problem` so that the user fixes everything in one round.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input, located as precisely as we can."""

    where: str  # "configs/lora.yaml:12", "data/train.jsonl:7", "--backend", "training_args.max_steps"
    what: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.where}: {self.what}"
        return f"{text}\n    -> {self.fix}" if self.fix else text


class GlmportError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""

    exit_code = 2

    def __init__(self, message: str, problems: list[Problem] | None = None):
        self.problems = list(problems or [])
        super().__init__(message)

    def __str__(self) -> str:
        head = self.args[0]
        if not self.problems:
            return head
        body = "\n".join(f"  {i}. {p}" for i, p in enumerate(self.problems, 1))
        return f"{head}\n{body}"


class ConfigError(GlmportError):
    """The training configuration (YAML, overrides, flags) is invalid."""


class DataError(GlmportError):
    """A data file or record is invalid."""


class BackendUnavailable(GlmportError):
    """The requested device backend cannot run here; the message says why and what to install."""

    exit_code = 3


class PluginError(GlmportError):
    """A plugin could not be loaded, or implements a hook that does not exist."""


class PatchError(GlmportError):
    """A patch set cannot be applied to this model folder (unknown revision, missing target, ...)."""


class ResumeError(GlmportError):
    """The checkpoint asked for cannot be resumed from."""


class ModelError(GlmportError):
    """The model folder cannot be loaded as a GLM-family model."""


class SixtyFourBitError(GlmportError):
    """A 64-bit tensor reached a compute op on a backend without 64-bit kernels, or a value does not fit
    in 32 bits when a batch is narrowed."""

    exit_code = 4
