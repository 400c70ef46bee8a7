"""The ``glmport`` command line.

Global options come before or after the command (``glmport --backend mlu train ...`` and
``glmport train ... --backend mlu`` are the same). Each command lives in its own module with an
``add_parser(subparsers)`` function that sets ``handler`` on its parser. Importing this package does not
import torch: ``glmport --help`` stays fast.

Exit status: one meaning per code, listed in :data:`glmport.errors.EXIT_CODES`. A :class:`GlmportError`
prints its message and exits with its ``exit_code``; any other exception prints its traceback and a line
asking to report it, and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback

from glmport import __version__
from glmport.errors import GlmportError, Interrupted, SignalInterrupt

INTERNAL_ERROR = 1  # EXIT_CODES[1]: any exception that is not a GlmportError is a bug
REPORT_LINE = ("glmport: internal error (a bug in glmport or in a plugin): please report it with the command you "
               "ran, the traceback above and the output of `glmport env`")

COMMAND_MODULES = ("info", "train", "data", "init_model", "patch", "infer", "chat", "eval", "job", "export", "serve",
                   "convert", "bench")


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--backend", metavar="NAME", default=default,
        help="device backend: auto (default), cpu, cuda, mlu, or one a plugin adds; see `glmport backends`",
    )
    parser.add_argument(
        "-p", dest="plugins", action="append", metavar="NAME", default=argparse.SUPPRESS if suppress else [],
        help="load plugin module NAME, or block plugin NAME with `-p no:NAME` (repeatable)",
    )
    parser.add_argument(
        "--disable-plugin-autoload", action="store_true", default=argparse.SUPPRESS if suppress else False,
        help="do not load plugins from the `glmport` entry-point group (also GLMPORT_DISABLE_PLUGIN_AUTOLOAD=1)",
    )
    # The DeepSpeed launcher starts `python -m glmport --local_rank=N ...`; the rank is read from LOCAL_RANK.
    parser.add_argument("--local-rank", "--local_rank", type=int, default=default, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmport",
        description="Fine-tune ChatGLM3 / GLM-4 models with LoRA, P-Tuning v2 or full SFT on CUDA, MLU or CPU.",
    )
    parser.add_argument("--version", action="version", version=f"glmport {__version__}")
    _global_options(parser, suppress=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"glmport.cli.{name}").add_parser(subparsers, common)
    return parser


def make_plugin_manager(args: argparse.Namespace):
    """The one plugin manager of this command; handlers receive it and pass it down."""
    from glmport.plugins import PluginManager

    disabled = [p[3:] for p in args.plugins if p.startswith("no:")]
    load = [p for p in args.plugins if not p.startswith("no:")]
    return PluginManager(disabled=disabled, load=load, autoload=False if args.disable_plugin_autoload else None)


def main(argv: list[str] | None = None) -> int:
    """Run one ``glmport`` command and return its exit status (:data:`glmport.errors.EXIT_CODES`)."""
    parser = build_parser()
    # Positional arguments may follow options (`glmport train CONFIG --backend mlu KEY=VALUE`):
    # commands that take free arguments collect what argparse left over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "arguments") or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.arguments.extend(extra)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    # bitsandbytes (which peft imports whenever it is installed: glmport[qlora]) warns on import, in every
    # command, that an optional CPU kernel from the Hub is not there; glmport never fetches kernels at run time.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        with _sigterm_raises_interrupted():
            manager = make_plugin_manager(args)
            if args.backend not in (None, "", "auto") and getattr(args, "checks_backend", True):
                # An explicit backend is checked before any work: it never falls back silently.
                from glmport.backend import select_backend

                select_backend(manager.backends, args.backend)
            return int(args.handler(args, manager) or 0)
    except (KeyboardInterrupt, Interrupted) as exc:  # Ctrl-C, SIGTERM (SignalInterrupt), a stopped run
        print(f"glmport: {str(exc) or 'interrupted'}", file=sys.stderr)
        return Interrupted.exit_code
    except GlmportError as exc:
        print(f"glmport: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stdout = None
        return 0
    except Exception:
        traceback.print_exc()
        print(REPORT_LINE, file=sys.stderr)
        return INTERNAL_ERROR
    finally:
        if sys.stdout is not None:
            with contextlib.suppress(BrokenPipeError):
                sys.stdout.flush()


@contextlib.contextmanager
def _sigterm_raises_interrupted():
    """For the duration of a command, SIGTERM (a scheduler preempting the job, ``kill``) unwinds the stack like
    Ctrl-C does: a run cleans up, publishes nothing, and the command exits 130. Only when SIGTERM still has
    its default action and we are on the main thread: an embedding program's own handler is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def on_sigterm(signum, frame):
        raise SignalInterrupt("interrupted by SIGTERM")

    _SigtermInChildren.register()
    signal.signal(signal.SIGTERM, on_sigterm)
    _SigtermInChildren.active = True
    try:
        yield
    finally:
        _SigtermInChildren.active = False
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _SigtermInChildren:
    """Processes forked while the handler above is installed (data loader workers, a ``datasets`` pool) get
    SIGTERM's default action back: their parent stops them with SIGTERM as a matter of course. SIGTERM is
    blocked across the fork, so that one sent to a child before it has run is not lost (Python discards
    signals that arrive in a child before its interpreter is ready)."""

    active = False
    registered = False

    @classmethod
    def register(cls) -> None:
        if not cls.registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(before=cls._before, after_in_parent=cls._unblock, after_in_child=cls._in_child)
            cls.registered = True

    @classmethod
    def _before(cls) -> None:
        if cls.active:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    @classmethod
    def _unblock(cls) -> None:
        if cls.active:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    @classmethod
    def _in_child(cls) -> None:
        if cls.active:
            cls.active = False
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def entry() -> None:  # pragma: no cover - console-script convenience
    sys.exit(main())

