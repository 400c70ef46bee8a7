"""The ``glmport`` command line.

Global options come before or after the command (``glmport --backend mlu train ...`` and
``glmport train ... --backend mlu`` are the same). Each command lives in its own module with an
``add_parser(subparsers)`` function that sets ``handler`` on its parser. Importing this package does not
import torch: ``glmport --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from glmport import __version__
from glmport.errors import GlmportError

COMMAND_MODULES = ("info", "train", "data", "init_model", "patch", "infer")


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
    from glmport.plugins import PluginManager, set_plugin_manager

    disabled = [p[3:] for p in args.plugins if p.startswith("no:")]
    load = [p for p in args.plugins if not p.startswith("no:")]
    manager = PluginManager(disabled=disabled, load=load, autoload=False if args.disable_plugin_autoload else None)
    set_plugin_manager(manager)
    return manager


def main(argv: list[str] | None = None) -> int:
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
    try:
        manager = make_plugin_manager(args)
        if args.backend not in (None, "", "auto") and getattr(args, "checks_backend", True):
            # An explicit backend is checked before any work: it never falls back silently.
            from glmport.backend import select_backend

            select_backend(manager.backends, args.backend)
        return int(args.handler(args, manager) or 0)
    except GlmportError as exc:
        print(f"glmport: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("glmport: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stdout = None
        return 0
    finally:
        if sys.stdout is not None:
            with contextlib.suppress(BrokenPipeError):
                sys.stdout.flush()


def entry() -> None:  # pragma: no cover - console-script convenience
    sys.exit(main())

