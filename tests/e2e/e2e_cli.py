"""Writing small configs for end-to-end runs, and reading what a run wrote.

The commands themselves run through :func:`glmport.testing.run_cli`: in this process when the command
fails before any model loads or only builds one, in a fresh interpreter (``in_process=False``) for
training runs, which load remote code and set global torch state the way a user's run does.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

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
