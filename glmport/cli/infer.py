"""``glmport infer``: generate a reply with a base model or a training result, on any backend."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from glmport.cli.train import add_remote_code_flags


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
    add_remote_code_flags(p, config_keys=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_infer)


def cmd_infer(args, manager) -> int:
    from glmport.backend import select_backend

    # what is loaded, from where, and which code runs, on stderr: stdout is the reply (or its JSON)
    logging.basicConfig(level=logging.INFO, format="[glmport] %(message)s")

    selection = select_backend(manager.backends, args.backend)
    backend = selection.backend
    with backend.activate():
        return _infer(args, manager, backend)


def _infer(args, manager, backend) -> int:
    from glmport.data.records import Message
    from glmport.infer import generate_reply, load_for_inference
    from glmport.modeling import RemoteCodeConsent
    from glmport.train.guarded import guard_mode_for

    consent = RemoteCodeConsent(trust=args.trust_remote_code, allow_unverified=args.allow_unverified_patches)
    bundle = load_for_inference(args.model, backend, patch_sets=manager.patch_sets, consent=consent)
    messages = ([Message("system", args.system)] if args.system else []) + [Message("user", args.prompt)]
    guard = guard_mode_for(args.guard_64bit, backend)
    try:
        reply = generate_reply(bundle, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, guard_mode=guard)
    finally:  # the foreign code as it was: an in-process caller may load another model after this one
        if bundle.loaded.patches is not None:
            bundle.loaded.patches.undo()
    if args.json:
        print(json.dumps({"reply": reply, "model": bundle.description, "backend": backend.name,
                          "patches": bundle.loaded.patches.summary() if bundle.loaded.patches else None},
                         ensure_ascii=False))
    else:
        print(reply)
    return 0
