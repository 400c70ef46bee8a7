"""``glmport export RESULT OUT --merge``: a training result as a standard model folder (see glmport.export)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from glmport.cli.train import add_remote_code_flags


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser(
        "export", parents=[common],
        help="write a training result as a standalone model folder (LoRA merged, P-Tuning prefix included)",
        description="Write RESULT (OUTPUT_DIR/final of glmport train, an adapter checkpoint, or a model folder) "
                    "as a model folder in sharded safetensors with its tokenizer and generation config. "
                    "Remote-code models keep their code, with the compatibility patches written in, so the "
                    "folder loads on current transformers without glmport. The merge computes on the CPU "
                    "unless --backend names a device.")
    p.add_argument("result", type=Path, help="OUTPUT_DIR/final of glmport train (or a checkpoint, or a model folder)")
    p.add_argument("out", type=Path, help="the folder to write (new, or empty; --force replaces one)")
    p.add_argument("--merge", action="store_true",
                   help="merge the trained adapter (LoRA) or prefix encoder (ChatGLM P-Tuning v2) with the base model")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of the written weights (default: the base model's, from its config.json)")
    p.add_argument("--base", type=Path, default=None, help="the base model's folder, when it moved since training")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest weight file (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace OUT if it already holds files")
    add_remote_code_flags(p, config_keys=False)
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(handler=cmd_export)


def cmd_export(args, manager) -> int:
    from glmport.backend import select_backend
    from glmport.export import check_out_dir, export, parse_shard_size
    from glmport.infer import load_for_inference
    from glmport.modeling import RemoteCodeConsent

    logging.basicConfig(level=logging.INFO, format="[glmport] %(message)s")
    # cheap checks first: nothing is loaded for an OUT that cannot be written
    check_out_dir(args.out, args.force, [args.result] + ([args.base] if args.base else []))
    parse_shard_size(args.max_shard_size)
    backend = select_backend(manager.backends, args.backend or "cpu").backend
    consent = RemoteCodeConsent(trust=args.trust_remote_code, allow_unverified=args.allow_unverified_patches)
    with backend.activate():
        # fp32: the adapter is merged at full precision and the weights are rounded once, when written; a QLoRA
        # result's adapter too, into the full-precision base (not the 4-bit one it trained on)
        bundle = load_for_inference(args.result, backend, patch_sets=manager.patch_sets, consent=consent,
                                    dtype="fp32", base=args.base, quantization="none")
        try:
            done = export(args.result, args.out, bundle, merge=args.merge, dtype=args.dtype,
                          max_shard_size=args.max_shard_size, force=args.force)
        finally:
            bundle.close()
    if args.json:
        print(json.dumps({"out": str(done.path), "files": done.files, **done.record}, indent=2))
    else:
        what = {"adapter": "the LoRA adapter merged into its base model", "prefix-encoder": "the base model with "
                "its P-Tuning v2 prefix encoder", "full-model": "the full model"}.get(done.content, "the model")
        print(f"exported {what} ({args.result}) to {done.path}: {done.record['dtype']}, "
              f"{len([f for f in done.files if f.endswith('.safetensors')])} weight file(s)")
        for note in done.notes:
            print(f"  {note}")
    return 0
