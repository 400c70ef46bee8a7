"""Model FLOPs of a training step (the MFU numerator of the performance notes, section 3) and the
device's matmul ceiling, measured in the same process at the model's own GEMM shapes.

Two numerators:

* ``model``: the notes' formula. It counts the output layer on every real token (``N`` includes ``V*h``),
  whatever a recipe actually computes, so recipes are compared on the same work;
* ``executed``: what glmport's step really multiplies: the output layer only on label rows (the label-row
  loss skips prompt positions; the reference recipe runs it on every position, padding included, and is
  credited with that). Divided by the matmul ceiling, it says how close the step is to what this device's
  GEMMs can do.

Neither counts recomputation (checkpointing) or padding: those are costs, not work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Dense half-precision peak of devices whose figure is published (FLOP/s); MFU against it where known.
NOMINAL_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "A800": 312e12, "H800": 989.4e12,
                "L40S": 362e12, "4090": 165.2e12}


@dataclass(frozen=True)
class StepWork:
    """What one step's samples ask of the model: real tokens, Σ s², label rows."""

    tokens: int
    squares: int
    label_rows: int
    padded_tokens: int  # positions the step ran the layers on (padding included)
    head_rows: int  # rows the output layer ran on


def linear_params(shape) -> int:
    """N of the notes: matmul parameters touched per token, output layer included, embedding excluded."""
    h, g, d, f = shape.hidden_size, shape.kv_groups, shape.head_dim, shape.ffn_hidden_size
    per_layer = h * (h + 2 * g * d) + h * h + h * 2 * f + f * h
    return shape.num_layers * per_layer + shape.vocab * shape.hidden_size


def model_flops(shape, method: str, work: StepWork, *, adapter_params: int = 0, prefix: int = 0) -> float:
    """The notes' F for ``method`` (lora / ptuning / sft)."""
    n, layers, h = linear_params(shape), shape.num_layers, shape.hidden_size
    t = work.tokens
    if method == "sft":
        return 6 * n * t + 6 * layers * h * work.squares
    if method == "ptuning":
        return 4 * n * t + 12 * layers * h * (prefix * t + work.squares / 2)
    return 4 * n * t + 6 * layers * h * work.squares + 6 * adapter_params * t


def executed_flops(shape, method: str, work: StepWork, *, adapter_params: int = 0, prefix: int = 0) -> float:
    """The same work with the output layer counted on the rows it really ran on."""
    head = shape.vocab * shape.hidden_size
    factor = 6 if method == "sft" else 4
    return model_flops(shape, method, work, adapter_params=adapter_params, prefix=prefix) \
        - factor * head * work.tokens + factor * head * work.head_rows


def layer_gemms(shape, rows: int, label_rows: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of one layer's forward GEMMs at ``rows`` tokens, and the output layer's at ``label_rows``."""
    h, g, d, f = shape.hidden_size, shape.kv_groups, shape.head_dim, shape.ffn_hidden_size
    gemms = [(rows, h, h + 2 * g * d), (rows, h, h), (rows, h, 2 * f), (rows, f, h)]
    if label_rows:
        gemms.append((label_rows, h, shape.vocab))
    return gemms


def matmul_ceiling(backend, shape, dtype, *, rows: int, label_rows: int, repeats: int = 7,
                   budget_s: float = 20.0) -> dict:
    """FLOP/s of this device's GEMMs at the model's shapes, in ``dtype``: each GEMM timed alone (after
    one warm-up call), best of ``repeats`` (the best, because on a shared host a slower repeat measures the
    neighbours), combined as total FLOPs over total time (the mix a layer runs). Time-boxed: repeats stop
    once ``budget_s`` has passed."""
    import torch

    device = backend.device()
    gemms = layer_gemms(shape, rows, label_rows)
    best: list[float] = [float("inf")] * len(gemms)
    with torch.no_grad():
        operands = [(torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device))
                    for m, k, n in gemms]
        for a, b in operands:
            torch.matmul(a, b)
        backend.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            for i, (a, b) in enumerate(operands):
                t0 = time.perf_counter()
                torch.matmul(a, b)
                backend.synchronize()
                best[i] = min(best[i], time.perf_counter() - t0)
            if time.perf_counter() - started > budget_s:
                break
    flops = sum(2 * m * k * n for m, k, n in gemms)
    return {"flops_per_s": flops / sum(best), "gemms": [list(g) for g in gemms], "dtype": str(dtype).replace("torch.", ""),
            "per_gemm_flops_per_s": [2 * m * k * n / t for (m, k, n), t in zip(gemms, best)]}


def nominal_peak(device_name: str) -> float | None:
    for key, value in NOMINAL_PEAK.items():
        if key in device_name:
            return value
    return None
