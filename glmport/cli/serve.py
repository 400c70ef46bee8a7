"""``glmport serve``: an OpenAI-compatible endpoint and a web chat page for a model or a training result.

::

    glmport serve output/quickstart/final                          # http://127.0.0.1:8000, the page at /
    glmport serve /models/chatglm3-6b --adapter ads=out/ads/final --adapter poems=out/poems/final
    GLMPORT_API_KEY=secret glmport serve RESULT --host 0.0.0.0     # beyond loopback only with a key
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from glmport.cli.infer import add_model_flags, configure_logging, on_backend
from glmport.errors import ConfigError, Problem

API_KEY_VARIABLE = "GLMPORT_API_KEY"


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser("serve", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="serve a model or training result over an OpenAI-compatible API, with a web chat page",
                              description=__doc__.split("\n", 2)[2])
    p.add_argument("model", type=Path, help="model folder, OUTPUT_DIR/final of glmport train, or a peft adapter")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve another adapter of the same base model as model NAME (repeatable)")
    p.add_argument("--name", default=None, help="the name MODEL is served as (default: its folder's name; "
                                                "OUTPUT_DIR/final is served as OUTPUT_DIR's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; any other needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE) or None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_VARIABLE}, which keeps "
                        "the key out of the process list)")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                        help="largest request body (default 1 MiB; larger: 413)")
    limits.add_argument("--max-queue", type=int, default=16, metavar="N",
                        help="requests that may wait for the model besides the one generating (default 16; more: 429)")
    limits.add_argument("--queue-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="longest wait for the model before a request gives up (default 60; then 503)")
    limits.add_argument("--max-concurrent", type=int, default=64, metavar="N",
                        help="HTTP requests in progress at once, streams included (default 64; more: 503)")
    limits.add_argument("--max-tokens", type=int, default=1024, metavar="N",
                        help="most tokens generated per reply, and the default max_tokens (default 1024)")
    limits.add_argument("--context-length", type=int, default=None, metavar="N",
                        help="positions the model takes, prompt and reply together (default: from its config)")
    p.add_argument("--no-access-log", action="store_true", help="do not log each request")
    add_model_flags(p)
    p.set_defaults(handler=cmd_serve)


def serve_options(args):
    from glmport.serve.limits import Limits
    from glmport.serve.server import ServeOptions

    problems = []
    adapters = []
    for value in args.adapter:
        name, equals, path = value.partition("=")
        if not equals or not name or not path:
            problems.append(Problem("--adapter", f"{value!r} is not NAME=PATH", "e.g. --adapter ads=output/ads/final"))
        else:
            adapters.append((name, Path(path)))
    for flag, value, least in (("--max-body-bytes", args.max_body_bytes, 1024), ("--max-queue", args.max_queue, 0),
                               ("--max-concurrent", args.max_concurrent, 1), ("--max-tokens", args.max_tokens, 1),
                               ("--context-length", args.context_length, 2)):
        if value is not None and value < least:
            problems.append(Problem(flag, f"{value} is below {least}", f"give {least} or more"))
    if not args.queue_timeout > 0:
        problems.append(Problem("--queue-timeout", f"{args.queue_timeout}", "give a number of seconds above 0"))
    if args.api_key is not None and (not args.api_key.strip() or any(c.isspace() for c in args.api_key)):
        problems.append(Problem("--api-key", "empty or holds white space", "use a key without spaces"))
    if problems:
        raise ConfigError(f"{len(problems)} bad serve flag(s)", problems)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                    queue_timeout=args.queue_timeout, max_tokens=args.max_tokens, context_length=args.context_length)
    return ServeOptions(model=args.model, adapters=adapters, host=args.host, port=args.port, api_key=args.api_key,
                        name=args.name, limits=limits, guard=args.guard_64bit, dtype=args.dtype, base=args.base,
                        trust_remote_code=args.trust_remote_code,
                        allow_unverified_patches=args.allow_unverified_patches, access_log=not args.no_access_log)


def cmd_serve(args, manager) -> int:
    from glmport.serve.server import check_address, require_extra, run

    options = serve_options(args)
    check_address(options)  # before anything loads: a refused address costs no time
    require_extra()
    configure_logging(args)
    return on_backend(args, manager, lambda backend: run(options, manager, backend))
