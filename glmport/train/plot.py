"""The loss curve, from the Trainer's log history."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("glmport")


def loss_points(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    return train, evals


def write_loss_plot(log_history: list[dict], target: Path, title: str) -> Path | None:
    """Write ``target`` (PNG) atomically; returns None (with a warning) when matplotlib is missing."""
    train, evals = loss_points(log_history)
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no loss plot: matplotlib is not installed (pip install 'glmport[plot]')")
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    partial = target.with_name(target.name + ".partial.png")
    fig.savefig(partial)
    plt.close(fig)
    os.replace(partial, target)
    return target
