"""``glmport init-model``: build a tiny GLM model folder offline (random weights, tokenizer made on the spot)."""

from __future__ import annotations


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser("init-model", parents=[common],
                              help="build a tiny random GLM model folder offline (tiny-native or tiny-remote)")
    p.add_argument("kind", choices=["tiny-native", "tiny-remote"])
    p.add_argument("out", help="folder to create (must not exist or be empty)")
    p.add_argument("--family", choices=["chatglm3", "glm4", "chatglm2", "chatglm"], default=None,
                   help="special-token layout and architecture details (default chatglm3; glm4 with --arch glm4; "
                        "chatglm2: ChatGLM2-6B's tokenizer, no role tokens; chatglm: ChatGLM-6B, tiny-remote only)")
    p.add_argument("--arch", choices=["glm", "glm4"], default="glm",
                   help="tiny-native only: the transformers class, glm (GlmForCausalLM, default) or glm4 "
                        "(Glm4ForCausalLM, the GLM-4-0414 layout; glm4 tokenizer with a chat_template)")
    p.add_argument("--revision", default=None, help="tiny-remote only: which upstream revision the code imitates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.set_defaults(handler=cmd_init_model)


def cmd_init_model(args, manager) -> int:
    from glmport.errors import GlmportError
    from glmport.tiny import build_tiny_model

    family = args.family or ("glm4" if args.arch == "glm4" else "chatglm3")
    if family == "chatglm" and args.kind != "tiny-remote":
        raise GlmportError("--family chatglm: ChatGLM-6B has no native transformers class (2-D positions, the "
                           "GLM-130B block); build it with tiny-remote")
    if args.arch != "glm" and args.kind != "tiny-native":
        raise GlmportError(f"--arch {args.arch}: only tiny-native folders have a choice of architecture")
    if args.arch == "glm4" and family != "glm4":
        raise GlmportError(f"--arch glm4 with --family {family}: GLM-4-0414 (Glm4ForCausalLM) uses the glm4 tokenizer; "
                          "leave out --family")
    options = {"family": family, "seed": args.seed, "num_layers": args.layers, "hidden_size": args.hidden_size,
               "ffn_hidden_size": 2 * args.hidden_size}
    if args.kind == "tiny-remote" and args.revision:
        options["revision"] = args.revision
    if args.arch != "glm":
        options["arch"] = args.arch
    path = build_tiny_model(args.kind, args.out, **options)
    print(f"built {args.kind} ({family}{', arch ' + args.arch if args.arch != 'glm' else ''}) in {path}")
    return 0
