"""Running the glmport CLI for real in end-to-end tests, and writing small configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def run_glmport(*args, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("GLMPORT_EMULATE", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "glmport", *map(str, args)], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}"
    return result


METHODS = {
    "lora": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 16, "lora_dropout": 0.0},
    "ptuning": {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4},
    "sft": None,
}


def write_config(folder: Path, method: str, **overrides) -> Path:
    """A small config in the upstream schema; ``overrides`` use section__key=value."""
    config = {
        "data_config": {"train_file": "train.jsonl", "val_file": "dev.jsonl"},
        "max_input_length": 64,
        "max_output_length": 32,
        "training_args": {
            "output_dir": str(folder / "out"), "max_steps": 4, "learning_rate": 5e-3,
            "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "logging_steps": 1,
            "save_strategy": "steps", "save_steps": 2, "eval_strategy": "steps", "eval_steps": 4,
            "predict_with_generate": True, "generation_config": {"max_new_tokens": 4}, "report_to": "none",
            "seed": 0,
        },
        "glmport": {"eval_samples": 4, "dtype": "fp32"},
    }
    if METHODS[method]:
        config["peft_config"] = dict(METHODS[method])
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            config.setdefault(section, {})[name] = value
        else:
            config[section] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def summary(folder: Path) -> dict:
    return json.loads((folder / "out" / "run_summary.json").read_text())
