"""A whole benchmark: the samples, each recipe, the matmul ceiling, and the comparison."""

from __future__ import annotations

import datetime
import gc
import platform
import sys
from importlib import metadata

from glmport.bench.flops import matmul_ceiling, nominal_peak
from glmport.bench.runner import BenchSettings, run_recipe
from glmport.bench.workloads import WORKLOADS, make_samples


def environment(backend) -> dict:
    versions = {}
    for package in ("glmport", "torch", "transformers", "peft", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    import torch

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "backend": backend.name, "emulated": bool(getattr(backend, "emulated", False)),
            "device": device_name(backend), "host": platform.node(), "cpu_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "versions": versions}


def device_name(backend) -> str:
    """What the device is, for people; the CPU model on the host."""
    if backend.device_type != "cpu" and not getattr(backend, "emulated", False):
        return backend.describe().get("device_name") or backend.device_name()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def run_bench(*, shape, folder, workload: str, recipes, settings: BenchSettings, backend, patch_sets,
              command: str = "", progress=None) -> dict:
    """Run ``recipes`` on the same samples; returns the report (the ``--json`` output)."""
    samples = make_samples(workload, (settings.warmup + settings.steps) * settings.samples_per_step,
                           vocab_limit=min(shape.vocab - 1024, 60000), seed=settings.seed,
                           max_length=shape.seq_length)
    env = environment(backend)
    peak = nominal_peak(env["device"]) if not env["emulated"] and backend.device_type != "cpu" else None
    results = []
    for recipe in recipes:
        if progress:
            progress(f"recipe {recipe.name}: {recipe.change}")
        results.append(run_recipe(recipe, settings, shape=shape, folder=folder, samples=samples, backend=backend,
                                  patch_sets=patch_sets, peak_flops=peak))
        gc.collect()
    measured = [r for r in results if "skipped" not in r]
    ceiling = None
    if measured:
        last = measured[-1]
        import torch

        from glmport.modeling import resolve_dtype

        dtype, _ = resolve_dtype(settings.dtype, backend, shape.family, settings.method)
        if settings.method == "sft" and backend.preferred_dtype() == torch.bfloat16:
            dtype = torch.bfloat16  # full SFT computes under bf16 autocast
        if progress:
            progress("matmul ceiling at the model's GEMM shapes")
        ceiling = matmul_ceiling(backend, shape, dtype, rows=max(int(last["mean_micro_batch_tokens"]), 1),
                                 label_rows=int(last["mean_micro_batch_label_rows"]))
        for r in measured:
            r["ceiling_fraction"] = r["executed_flops_per_s"] / ceiling["flops_per_s"]
    _compare(results)
    return {"command": command, "environment": env, "shape": vars(shape) | {"vocab": shape.vocab},
            "workload": {"name": workload, "definition": WORKLOADS[workload]},
            "settings": vars(settings), "nominal_peak_flops": peak, "matmul_ceiling": ceiling, "results": results}


def _compare(results: list[dict]) -> None:
    """Speed-up over the reference and the largest per-step loss difference from it, per recipe."""
    reference = next((r for r in results if r["recipe"] == "reference" and "skipped" not in r), None)
    for r in results:
        if reference is None or "skipped" in r:
            continue
        r["speedup_vs_reference"] = r["tokens_per_s"] / reference["tokens_per_s"]
        r["memory_vs_reference"] = r["peak_above_start"] / max(reference["peak_above_start"], 1)
        pairs = list(zip(r["losses"], reference["losses"]))
        r["max_loss_diff_vs_reference"] = max((abs(a - b) for a, b in pairs), default=None)
