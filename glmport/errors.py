"""User-facing errors, and the exit status of every ``glmport`` command.

Every error glmport raises for bad input is a :class:`GlmportError`. The CLI prints its message and exits
with its ``exit_code``; no traceback, because the message already says where the problem is (file, line,
key or flag) and what to do about it. Errors that gather several problems (a config file, a data file, a
patch preflight) hold a list of :class:`Problem` so that the user fixes everything in one round.

Any other exception is a bug: the CLI prints its traceback and a line asking to report it, and exits 1.
:data:`EXIT_CODES` is the whole table; the README's "Exit status" table repeats it (a meta-test keeps
the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Exit status -> meaning. Each status means one thing, so that scripts and schedulers can act on it
#: (retry on another node after 3, fix the model code after 4, lower the learning rate after 5).
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error: an unexpected exception; glmport prints the traceback and asks you to report it",
    2: "bad input or a bad place to write: command line, config, data file, model folder, plugin, patch set, or "
       "an output folder in use, not writable or full (the message says which)",
    3: "backend unavailable: the device backend asked for cannot run here (the message says why)",
    4: "the 64-bit policy refused a step: a 64-bit tensor reached a compute op, or a value does not fit in 32 bits",
    5: "training diverged: the loss became NaN or infinite; nothing was published",
    130: "interrupted by Ctrl-C (SIGINT) or SIGTERM; during training, after a checkpoint of the step it stopped at",
}


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
    """Base class: a problem with the user's input or environment, reported without a traceback.
    Subclasses that mean something other than bad input set their own ``exit_code`` (see
    :data:`EXIT_CODES`)."""

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


class TrainingDiverged(GlmportError):
    """The training loss became NaN or infinite; the run stopped without publishing a result."""

    exit_code = 5


class Interrupted(GlmportError):
    """The command was stopped by SIGTERM (a scheduler preempting the job, ``kill``). Ctrl-C arrives as
    ``KeyboardInterrupt`` and exits with the same status. Either unwinds like an error: a training run
    publishes nothing."""

    exit_code = 130


class SignalInterrupt(KeyboardInterrupt):
    """Raised from a signal handler (SIGTERM, a second signal during training). A ``BaseException``, like
    the ``KeyboardInterrupt`` Ctrl-C raises, because it can arrive in the middle of any code: an
    ``except Exception`` on the way (logging's own, a library's) must not swallow it. Exits 130."""

    exit_code = 130
