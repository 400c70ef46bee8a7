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
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings, progress lines and the summary")
    # the run checks the backend itself, after reading the config (glmport.emulate may make it available)
    p.set_defaults(handler=cmd_train, checks_backend=False)


def parse_arguments(arguments: list[str], resume_flag: str | None):
    from glmport.train.run import TrainRequest

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
    from glmport.train.run import run_training

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="[glmport] %(message)s")
    request = parse_arguments(args.arguments, args.resume)
    request.backend = args.backend
    run_training(request, manager)
    return 0
