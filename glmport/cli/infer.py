"""``glmport infer``: generate a reply with a base model or a training result, on any backend."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser("infer", parents=[common], help="generate a reply from a model folder or a training result")
    p.add_argument("model", type=Path, help="model folder, or OUTPUT_DIR/final of glmport train")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--guard-64bit", choices=["auto", "on", "off", "report"], default="auto",
                   help="the 64-bit guard around every forward (auto: on for emulated 32-bit devices)")
    p.add_argument("--allow-unverified-patches", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_infer)


def cmd_infer(args, manager) -> int:
    from glmport.backend import select_backend
    from glmport.data.records import Message
    from glmport.infer import generate_reply, load_for_inference
    from glmport.train.run import _guard_mode

    selection = select_backend(manager.backends, args.backend)
    backend = selection.backend
    bundle = load_for_inference(args.model, backend, allow_unverified=args.allow_unverified_patches)
    messages = ([Message("system", args.system)] if args.system else []) + [Message("user", args.prompt)]
    guard = _guard_mode(args.guard_64bit, backend)
    reply = generate_reply(bundle, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, guard_mode=guard)
    if args.json:
        print(json.dumps({"reply": reply, "model": bundle.description, "backend": backend.name,
                          "patches": bundle.loaded.patches.summary() if bundle.loaded.patches else None},
                         ensure_ascii=False))
    else:
        print(reply)
    return 0
