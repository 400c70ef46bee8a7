"""``glmport init-model``: build a tiny GLM model folder offline (random weights, tokenizer made on the spot)."""

from __future__ import annotations


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser("init-model", parents=[common],
                              help="build a tiny random GLM model folder offline (tiny-native or tiny-remote)")
    p.add_argument("kind", choices=["tiny-native", "tiny-remote"])
    p.add_argument("out", help="folder to create (must not exist or be empty)")
    p.add_argument("--family", choices=["chatglm3", "glm4"], default="chatglm3",
                   help="special-token layout and architecture details (default chatglm3)")
    p.add_argument("--revision", default=None, help="tiny-remote only: which upstream revision the code imitates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.set_defaults(handler=cmd_init_model)


def cmd_init_model(args, manager) -> int:
    from glmport.tiny import build_tiny_model

    options = {"family": args.family, "seed": args.seed, "num_layers": args.layers, "hidden_size": args.hidden_size,
               "ffn_hidden_size": 2 * args.hidden_size}
    if args.kind == "tiny-remote" and args.revision:
        options["revision"] = args.revision
    path = build_tiny_model(args.kind, args.out, **options)
    print(f"built {args.kind} ({args.family}) in {path}")
    return 0
