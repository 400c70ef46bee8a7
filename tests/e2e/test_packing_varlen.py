"""Packed rows through the variable-length attention kernel (issue 16): on the emulated MLU (its CPU
reference kernel, 64-bit guard on) packed training gives the per-step losses of packed training on the
cpu backend (SDPA over a block-diagonal mask) and of padded training, for ChatGLM3 and GLM-4: the first step
and the one after an update (2 steps: each test trains three times, and CI time counts)."""

from __future__ import annotations

import json

import pytest
from e2e_cli import summary, write_config

from glmport.testing import ok, run_cli


def _losses(folder) -> list[float]:
    lines = (folder / "out" / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record and "step" in record]


def _train(tmp_path, models, data_dir, model: str, backend: str, packing: bool) -> list[float]:
    folder = tmp_path / f"{backend}-packing-{packing}"
    folder.mkdir()
    config = write_config(folder, "lora", training_args__max_steps=2, training_args__per_device_train_batch_size=8,
                          training_args__lr_scheduler_type="constant", training_args__save_strategy="no",
                          training_args__eval_strategy="no", training_args__predict_with_generate=False,
                          data_config={"train_file": "train.jsonl"}, glmport={"dtype": "fp32", "packing": packing})
    env = {"GLMPORT_EMULATE": "mlu"} if backend == "mlu" else {}
    result = ok(run_cli("train", data_dir, models[model], config, "--backend", backend, env=env, in_process=False))
    assert ("padding-free packed batches" in result.stderr) == packing, result.stderr[-2000:]
    done = summary(folder)
    assert done["steps"] == 2
    if backend == "mlu":  # the kernel path: the accelerator set's attention, the guard on
        assert "accelerator/attention-varlen" in done["patches"], done["patches"]
    return _losses(folder)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["remote", "remote-glm4"])
def test_packed_varlen_training_matches_block_diagonal_and_padded(model, models, data_dir, tmp_path):
    varlen = _train(tmp_path, models, data_dir, model, "mlu", packing=True)
    block_diagonal = _train(tmp_path, models, data_dir, model, "cpu", packing=True)
    padded = _train(tmp_path, models, data_dir, model, "mlu", packing=False)
    assert len(varlen) == len(block_diagonal) == len(padded) == 2
    assert max(abs(a - b) for a, b in zip(varlen, block_diagonal)) < 1e-5, (varlen, block_diagonal)
    assert max(abs(a - b) for a, b in zip(varlen, padded)) < 1e-4, (varlen, padded)
