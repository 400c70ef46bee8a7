"""``glmport train``: fine-tune with LoRA, P-Tuning v2 or full SFT.

Two forms::

    glmport train CONFIG [KEY=VALUE ...] [--resume yes|N|no]
    glmport train DATA_DIR MODEL_DIR CONFIG [RESUME] [KEY=VALUE ...]     # the upstream script's arguments
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from glmport.errors import ConfigError
from glmport.train.recipe import run_training
from glmport.train.state import TrainRequest


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser(
        "train", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="fine-tune a ChatGLM3 / GLM-4 model (LoRA, P-Tuning v2, full SFT)",
        description=__doc__.split("\n", 2)[2],
    )
    p.add_argument("arguments", nargs="+", metavar="ARG",
                   help="CONFIG, or DATA_DIR MODEL_DIR CONFIG [RESUME]; then KEY=VALUE overrides, "
                        "e.g. training_args.max_steps=20")
    p.add_argument("--resume", metavar="yes|N|no", default=None,
                   help="resume from the latest complete checkpoint (yes), from checkpoint-N, or start over (no)")
    p.add_argument("--force-resume", action="store_true",
                   help="resume although the checkpoint was written with other settings or data (listed when "
                        "refused); the checkpoint's optimizer and schedule are restored as they were")
    add_remote_code_flags(p, config_keys=True)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings, progress lines and the summary")
    # the run checks the backend itself, after reading the config (glmport.emulate may make it available)
    p.set_defaults(handler=cmd_train, checks_backend=False)


def add_remote_code_flags(parser, *, config_keys: bool) -> None:
    """``--allow-unverified-patches`` and ``--[no-]trust-remote-code``, for ``train`` and ``infer``."""
    parser.add_argument("--allow-unverified-patches", action="store_true", default=False,
                        help="patch remote code whose revision is not in glmport's manifest"
                             + (" (glmport.allow_unverified_patches: true)" if config_keys else ""))
    parser.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=None,
                        help="run the model folder's Python files even when their revision is not in glmport's "
                             "manifest (patching them also takes --allow-unverified-patches); --no-trust-remote-code "
                             "runs none, not even known revisions. Default: only revisions in the manifest run"
                             + (" (glmport.trust_remote_code: true / false)" if config_keys else ""))


def parse_arguments(arguments: list[str], resume_flag: str | None) -> TrainRequest:
    positional = [a for a in arguments if "=" not in a]
    overrides = [a for a in arguments if "=" in a]
    if len(positional) == 1:
        return TrainRequest(Path(positional[0]), overrides, resume=resume_flag, resume_flag="--resume")
    if len(positional) in (3, 4):
        data_dir, model_dir, config = positional[:3]
        resume = positional[3] if len(positional) == 4 else None
        if resume is not None and resume_flag is not None:
            raise ConfigError("RESUME is given twice: as the fourth argument and as --resume; keep one")
        return TrainRequest(Path(config), overrides, Path(data_dir), Path(model_dir),
                            resume if resume is not None else resume_flag,
                            "RESUME" if resume is not None else "--resume")
    raise ConfigError(
        f"glmport train takes CONFIG or DATA_DIR MODEL_DIR CONFIG [RESUME] (plus KEY=VALUE overrides); "
        f"got {len(positional)} positional arguments: {' '.join(positional)}"
    )


def cmd_train(args, manager) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="[glmport] %(message)s")
    request = parse_arguments(args.arguments, args.resume)
    request.backend = args.backend
    request.force_resume = args.force_resume
    request.allow_unverified_patches = args.allow_unverified_patches
    request.trust_remote_code = args.trust_remote_code
    run_training(request, manager)
    return 0
