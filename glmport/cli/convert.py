"""``glmport convert SRC OUT --to native``: a remote-code ChatGLM checkpoint as transformers' GlmForCausalLM."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from glmport.cli.train import add_remote_code_flags


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser(
        "convert", parents=[common],
        help="convert a ChatGLM2/ChatGLM3/GLM-4 remote-code folder to a native transformers GLM folder",
        description="Convert SRC (a ChatGLM2-6B, ChatGLM3-6B or GLM-4-9B-chat folder: a download, a folder written "
                    "by glmport export, or a full-SFT result) into OUT, a transformers GlmForCausalLM folder with a "
                    "fast tokenizer and a chat template, which loads without trust_remote_code. The model's own "
                    "tokenizer code runs once, to verify the converted tokenizer against it (the same consent "
                    "rules as glmport infer).")
    p.add_argument("src", type=Path, help="the remote-code model folder")
    p.add_argument("out", type=Path, help="the folder to write (new, or empty; --force replaces one)")
    p.add_argument("--to", choices=["native"], required=True,
                   help="the target: native (transformers' GlmForCausalLM, model_type glm)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of the written weights (default: as in SRC)")
    p.add_argument("--force", action="store_true", help="replace OUT if it already holds files")
    add_remote_code_flags(p, config_keys=False)
    p.add_argument("--json", action="store_true", help="print the conversion record as JSON")
    p.set_defaults(handler=cmd_convert)


def cmd_convert(args, manager) -> int:
    from glmport.backend import select_backend
    from glmport.convert.native import CONVERT_FILE, convert_to_native
    from glmport.modeling import RemoteCodeConsent

    logging.basicConfig(level=logging.INFO, format="[glmport] %(message)s")
    # the conversion reads and writes files; the tokenizer check runs on the host
    backend = select_backend(manager.backends, "cpu").backend
    consent = RemoteCodeConsent(trust=args.trust_remote_code, allow_unverified=args.allow_unverified_patches)
    done = convert_to_native(args.src, args.out, backend=backend, patch_sets=manager.patch_sets, consent=consent,
                             dtype=args.dtype, force=args.force)
    if args.json:
        print(json.dumps({"out": str(done.path), **done.record}, indent=2, ensure_ascii=False))
        return 0
    record = done.record
    print(f"converted {args.src} ({done.family}) to {done.path}: GlmForCausalLM, {record['dtype']}, {record['rope']}")
    print(f"  tokenizer: fast, from {record['tokenizer']['built_from']}; chat template: "
          f"{record['chat_template']['from']}, verified on {len(record['chat_template']['verified_conversations'])} "
          "conversations")
    for difference in record["tokenizer"]["differences"] + record["chat_template"]["differences"]:
        print(f"  differs: {difference}")
    for note in done.notes:
        print(f"  {note}")
    print(f"  details: {done.path / CONVERT_FILE}")
    return 0
