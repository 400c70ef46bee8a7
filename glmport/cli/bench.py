"""``glmport bench``: throughput, memory and MFU of glmport's training step, next to the reference recipe.

::

    glmport bench                                        # mini shape, LoRA, W1: reference vs glmport
    glmport bench --shape chatglm3-6b --workload W2      # on a GPU/MLU
    glmport bench --recipe all --json                    # each optimization one at a time, as JSON
    glmport bench --steps 5 --allow-few-steps            # a quick look (below the 50-step minimum)

The model has seeded random weights at the shape asked for (built once into a cache folder); the samples
are the seeded synthetic workloads W1/W2/W3. Every recipe trains the same samples in the same order, the
same number per optimizer step. The first --warmup steps are discarded; the rest are timed.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from pathlib import Path

from glmport.cli._output import print_json, table
from glmport.errors import ConfigError, Problem

MIN_STEPS = 50


def add_parser(subparsers, common) -> None:
    from glmport.bench.shapes import SHAPES
    from glmport.bench.workloads import WORKLOADS

    p = subparsers.add_parser("bench", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="measure training throughput, memory and MFU against the reference recipe",
                              description=__doc__.split("\n", 2)[2])
    p.add_argument("--shape", default="mini", metavar="NAME|CONFIG",
                   help=f"model shape: {', '.join(SHAPES)}, or a config.json (default mini)")
    p.add_argument("--workload", default="W1", choices=sorted(WORKLOADS), help="synthetic workload (default W1)")
    p.add_argument("--method", default="lora", choices=("lora", "ptuning", "sft"), help="training method (default lora)")
    p.add_argument("--recipe", default="reference", choices=("glmport", "reference", "all"),
                   help="glmport alone; reference: the reference recipe and glmport (default); all: each "
                        "optimization added one at a time")
    p.add_argument("--steps", type=int, default=MIN_STEPS, help=f"timed optimizer steps (default {MIN_STEPS})")
    p.add_argument("--allow-few-steps", action="store_true",
                   help=f"allow --steps below {MIN_STEPS} (quick looks on a CPU; the numbers are noisier)")
    p.add_argument("--warmup", type=int, default=10, help="optimizer steps run before timing (default 10)")
    p.add_argument("--samples-per-step", type=int, default=16, help="samples per optimizer step (default 16)")
    p.add_argument("--row-tokens", type=int, default=None, metavar="N",
                   help="tokens per packed row (default: the micro-batch's longest sample, as training packs)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8, alpha 32, on query_key_value)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="base weight dtype (default: the backend's, as training picks it)")
    p.add_argument("--no-packing", action="store_true", help="leave padding-free packing out of glmport's recipe")
    p.add_argument("--micro-batch", type=int, default=None, metavar="N",
                   help="samples per micro-batch of glmport's recipe (the last one measured), with gradient "
                        "accumulation up to --samples-per-step (default: all samples of a step in one micro-batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the samples (default 0)")
    p.add_argument("--model-cache", type=Path, default=None, metavar="DIR",
                   help="where the random-weight model folders are kept (default ~/.cache/glmport/bench-models)")
    p.add_argument("--estimate", action="store_true",
                   help="predict peak memory of glmport's recipe at this shape without allocating anything")
    p.add_argument("--tokens-per-step", type=int, default=None, metavar="N",
                   help="with --estimate: tokens per micro-batch to estimate for (default: from the workload)")
    p.add_argument("--checkpointing", default=None, choices=("off", "full", "selective"),
                   help="gradient checkpointing of glmport's recipe (the last one measured; default: the recipe's, "
                        "off), or of the estimated configuration with --estimate (default off)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer layer in glmport's recipe (where the backend supports it)")
    p.add_argument("--attention", default="fused", choices=("fused", "masked"),
                   help="with --estimate: fused (flash/varlen kernels, no score matrix; default) or masked (SDPA "
                        "with a dense mask, as on a CPU)")
    p.add_argument("--rows", type=int, default=1, help="with --estimate: rows the micro-batch's tokens are in (default 1)")
    p.add_argument("--quantization", default="none", choices=("none", "4bit", "8bit"),
                   help="with --estimate: QLoRA's base weights through bitsandbytes (glmport.quantization; LoRA only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines on stderr")
    p.set_defaults(handler=cmd_bench)


def _check(args) -> None:
    problems = []
    if args.steps < 1 or (args.steps < MIN_STEPS and not args.allow_few_steps):
        problems.append(Problem("--steps", f"{args.steps} is below the {MIN_STEPS} timed steps a result needs",
                                f"use --steps {MIN_STEPS} or more, or add --allow-few-steps for a quick look"
                                if args.steps >= 1 else "use a positive number"))
    for flag, value, least in (("--warmup", args.warmup, 0), ("--samples-per-step", args.samples_per_step, 1),
                               ("--row-tokens", args.row_tokens or 16, 16), ("--lora-rank", args.lora_rank, 1)):
        if value < least:
            problems.append(Problem(flag, f"{value} is below {least}", f"use {least} or more"))
    if args.micro_batch is not None and (args.micro_batch < 1 or args.samples_per_step % args.micro_batch):
        problems.append(Problem("--micro-batch", f"{args.micro_batch} does not divide --samples-per-step "
                                f"{args.samples_per_step}", "use a divisor of the samples per step"))
    if args.recipe != "glmport" and args.samples_per_step % 4:
        problems.append(Problem("--samples-per-step", f"{args.samples_per_step} is not a multiple of 4, the "
                                "reference recipe's batch size", "use a multiple of 4, or --recipe glmport"))
    if problems:
        raise ConfigError("glmport bench: bad arguments", problems)


def cmd_bench(args, manager) -> int:
    from glmport.bench.shapes import resolve_shape
    from glmport.cli.infer import configure_logging, on_backend

    configure_logging(args)
    shape = resolve_shape(args.shape)
    if args.estimate:
        return _estimate(args, shape)
    _check(args)
    return on_backend(args, manager, lambda backend: _bench(args, manager, backend, shape))


def _bench(args, manager, backend, shape) -> int:
    from glmport.bench.runner import BenchSettings
    from glmport.bench.shapes import model_folder
    from glmport.train.environment import EnvironmentChanges

    settings = BenchSettings(method=args.method, samples_per_step=args.samples_per_step, steps=args.steps,
                             warmup=args.warmup, seed=args.seed, dtype=args.dtype, row_tokens=args.row_tokens,
                             lora_rank=args.lora_rank)
    folder = model_folder(shape, args.seed, args.model_cache)
    # stdout is the report: what the libraries print while training (DeepSpeed's accelerator notice
    # among them, which logs to stdout) goes to stderr
    with contextlib.redirect_stdout(sys.stderr), EnvironmentChanges() as env:
        for key, value in backend.environment().items():  # as a training run sets them (DS_ACCELERATOR...)
            env.set(key, value, keep_existing=True)
        report = _run(args, manager, backend, shape, settings, folder)
    if args.json:
        print_json(report)
    else:
        print(render(report))
    return 0


def _run(args, manager, backend, shape, settings, folder) -> dict:
    from glmport.bench.recipes import select
    from glmport.bench.report import run_bench

    return run_bench(shape=shape, folder=folder, workload=args.workload,
                     recipes=select(args.recipe, packing=not args.no_packing, checkpointing=args.checkpointing,
                                    compile=args.compile, micro_batch=args.micro_batch),
                     settings=settings, backend=backend,
                     patch_sets=manager.patch_sets, command="glmport " + shlex.join(sys.argv[1:]),
                     progress=None if args.quiet else lambda line: print(f"[glmport] {line}", file=sys.stderr))


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def render(report: dict) -> str:
    env, shape = report["environment"], report["shape"]
    lines = [f"glmport bench: {shape['name']} shape ({shape['num_layers']} layers, hidden {shape['hidden_size']}, "
             f"vocabulary {shape['vocab']}), {report['settings']['method']}, {report['workload']['name']} "
             f"({report['workload']['definition']})",
             f"backend {env['backend']}{' (emulated)' if env['emulated'] else ''} on {env['device']}; "
             f"{report['settings']['samples_per_step']} samples per step, {report['settings']['steps']} timed steps "
             f"after {report['settings']['warmup']} warm-up; {env['date']}", ""]
    rows = []
    for r in report["results"]:
        if "skipped" in r:
            rows.append([r["recipe"], f"skipped: {r['skipped']}"] + [""] * 9)
            continue
        rows.append([r["recipe"], f"{r['tokens_per_s']:,.0f}", f"{r['label_tokens_per_s']:,.0f}",
                     f"{r['samples_per_s']:.2f}", f"{r['step_s']['mean']:.3f}", f"{r['padding_fraction']:.0%}",
                     _mib(r["peak_above_start"]), _mib(r["peak_allocated"]),
                     f"{r['mfu']:.1%}" if r.get("mfu") is not None else "",
                     f"{r['ceiling_fraction']:.1%}" if r.get("ceiling_fraction") is not None else "",
                     f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else "",
                     f"{r['max_loss_diff_vs_reference']:.1e}" if r.get("max_loss_diff_vs_reference") is not None else ""])
    lines.append(table(["recipe", "tokens/s", "label tok/s", "samples/s", "step s", "padding", "peak+ MiB",
                        "peak MiB", "MFU", "of ceiling", "vs reference", "loss diff"], rows))
    ceiling = report["matmul_ceiling"]
    if ceiling:
        lines.append(f"\nmatmul ceiling measured in this run ({ceiling['dtype']} GEMMs at the model's shapes): "
                     f"{ceiling['flops_per_s'] / 1e9:,.1f} GFLOP/s")
    lines.append("peak+ = peak memory above what the process held before the run (device allocated; RSS on a CPU)")
    for r in report["results"]:
        if "skipped" not in r:
            lines.append(f"  {r['recipe']}: {r['change']}")
    return "\n".join(lines)


def _estimate(args, shape) -> int:
    from glmport.bench.estimate import estimate_peak, render_estimate

    if args.quantization != "none" and args.method != "lora":
        raise ConfigError(f"--quantization {args.quantization}: QLoRA quantizes the frozen base of LoRA; "
                          f"--method {args.method} trains the weights themselves: use --method lora or leave it out")
    result = estimate_peak(shape, method=args.method, workload=args.workload, dtype=args.dtype,
                           tokens=args.tokens_per_step, checkpointing=args.checkpointing or "off",
                           samples_per_step=args.samples_per_step, lora_rank=args.lora_rank,
                           attention=args.attention, rows=args.rows, quantization=args.quantization)
    if args.json:
        print_json(result)
    else:
        print(render_estimate(result))
    return 0
