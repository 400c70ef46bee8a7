"""``glmport train``: fine-tune with LoRA, P-Tuning v2 or full SFT.

Two forms::

    glmport train CONFIG [KEY=VALUE ...] [--resume yes|N|no]
    glmport train DATA_DIR MODEL_DIR CONFIG [RESUME] [KEY=VALUE ...]     # the upstream script's arguments

Several processes (one per device; a node's CPU processes share it)::

    glmport train CONFIG --nproc-per-node N [--devices 0,1]                          # one node
    glmport train CONFIG --nproc-per-node N --nnodes M --node-rank R --master-addr A [--master-port P]
    glmport train CONFIG --nproc-per-node N --dry-run      # print the command and environment of each node
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from glmport.errors import ConfigError
from glmport.launch.worker import launched, record_failure, stop_with_launcher
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
    add_launch_flags(p)
    # the run checks the backend itself, after reading the config (glmport.emulate may make it available)
    p.set_defaults(handler=cmd_train, checks_backend=False)


def add_launch_flags(parser) -> None:
    """The multi-process flags, named like torchrun's (the underscore spellings work too)."""
    group = parser.add_argument_group("several processes (through torch.distributed.run)")
    group.add_argument("--nproc-per-node", "--nproc_per_node", type=int, metavar="N", default=None,
                       help="start N processes on this node, one per device (CPU processes share the host)")
    group.add_argument("--nnodes", type=int, metavar="M", default=None, help="number of nodes (default 1)")
    group.add_argument("--node-rank", "--node_rank", type=int, metavar="R", default=None,
                       help="this node's number, 0 to M-1 (default 0)")
    group.add_argument("--master-addr", "--master_addr", metavar="HOST", default=None,
                       help="node 0's address, reachable from every node (needed with --nnodes > 1)")
    group.add_argument("--master-port", "--master_port", type=int, metavar="PORT", default=None,
                       help="rendezvous port on node 0 (default: a free port on one node, 29500 on several)")
    group.add_argument("--devices", metavar="0,1", default=None,
                       help="the devices to use, numbered among those visible now (sets the backend's "
                            "visible-devices variable for the processes)")
    group.add_argument("--dry-run", action="store_true",
                       help="print the command and environment of each node, check what can be checked here, exit")


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


def launch_request(args):
    """The launch flags as a :class:`~glmport.launch.plan.LaunchRequest`, or ``None`` when none was given."""
    from glmport.launch.plan import LaunchRequest

    given = {flag: getattr(args, flag) for flag in ("nnodes", "node_rank", "master_addr", "master_port", "devices")
             if getattr(args, flag) is not None}
    if args.nproc_per_node is None:
        if given or args.dry_run:
            named = ", ".join("--" + flag.replace("_", "-") for flag in [*given, *(["dry_run"] if args.dry_run else [])])
            raise ConfigError(f"{named} describe a multi-process launch: add --nproc-per-node N")
        return None
    return LaunchRequest(args.nproc_per_node, args.nnodes or 1, args.node_rank or 0, args.master_addr,
                         args.master_port, args.devices, args.dry_run)


def worker_arguments(args, backend_name: str) -> list[str]:
    """The ``glmport`` arguments each launched process runs: this command without the launch flags, with the
    backend the launcher resolved (so the processes cannot pick another)."""
    argv = ["train", *args.arguments]
    if args.resume is not None:
        argv += ["--resume", args.resume]
    if args.force_resume:
        argv.append("--force-resume")
    if args.allow_unverified_patches:
        argv.append("--allow-unverified-patches")
    if args.trust_remote_code is not None:
        argv.append("--trust-remote-code" if args.trust_remote_code else "--no-trust-remote-code")
    if args.quiet:
        argv.append("-q")
    argv += ["--backend", backend_name]
    for plugin in getattr(args, "plugins", None) or []:
        argv += ["-p", plugin]
    if getattr(args, "disable_plugin_autoload", False):
        argv.append("--disable-plugin-autoload")
    return argv


def cmd_train(args, manager) -> int:
    try:
        return _train(args, manager)
    except BaseException as exc:
        record_failure(exc)  # in a launched rank: for the launcher's report, which rank failed and why
        raise


def _train(args, manager) -> int:
    # ranks other than 0 say only what goes wrong: their progress, and their warnings about the data and the
    # config, are rank 0's too
    level = logging.WARNING if args.quiet else logging.INFO
    if launched() and os.environ.get("RANK", "0") != "0":
        level = logging.ERROR
    logging.basicConfig(level=level, format="[glmport] %(message)s")
    request = parse_arguments(args.arguments, args.resume)
    request.backend = args.backend
    request.force_resume = args.force_resume
    request.allow_unverified_patches = args.allow_unverified_patches
    request.trust_remote_code = args.trust_remote_code
    launch = launch_request(args)
    if launched():
        if launch is not None:
            raise ConfigError(f"this process was started by a launcher (LOCAL_RANK={os.environ['LOCAL_RANK']}, "
                              f"WORLD_SIZE={os.environ.get('WORLD_SIZE', '1')}): leave out --nproc-per-node and the "
                              "other launch flags, or run glmport train with them instead of the launcher")
        local_rank = getattr(args, "local_rank", None)  # the DeepSpeed launcher's argument
        if local_rank is not None and str(local_rank) != os.environ["LOCAL_RANK"]:
            raise ConfigError(f"--local_rank {local_rank} disagrees with LOCAL_RANK={os.environ['LOCAL_RANK']}")
        stop_with_launcher()
        run_training(request, manager)
        return 0
    if getattr(args, "local_rank", None) is not None:  # a launcher that passes the rank only as an argument
        os.environ["LOCAL_RANK"] = str(args.local_rank)
        return _train(args, manager)
    if launch is not None:
        return launch_training(args, manager, request, launch)
    run_training(request, manager)
    return 0


def launch_training(args, manager, request: TrainRequest, launch) -> int:
    """``--nproc-per-node``: check what can be checked here, then start the processes (or print them)."""
    from glmport.launch.plan import plan_launch
    from glmport.train.inputs import check_deepspeed, launch_config_and_backend

    config, backend = launch_config_and_backend(request, manager, dry_run=launch.dry_run)
    deepspeed = None
    if config.training_args.get("deepspeed"):
        deepspeed = backend.deepspeed()
        if not launch.dry_run:
            check_deepspeed(config, backend, dtypes=False)
    plan = plan_launch(launch, backend, worker_arguments(args, backend.name), deepspeed=deepspeed)
    if launch.dry_run:
        print(plan.render())
        return 0
    from glmport.launch.agent import run_plan

    run_plan(plan)
    return 0
