"""Padding-free packed training gives the loss of padded training (glmport.packing), on cpu and emulated mlu."""

from __future__ import annotations

import json

import pytest
from e2e_cli import summary, write_config

from glmport.testing import ok, run_cli


def _losses(folder) -> list[float]:
    lines = (folder / "out" / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record and "step" in record]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "mlu"])
def test_packed_and_padded_training_give_the_same_loss_over_20_steps(backend, models, data_dir, tmp_path):
    env = {"GLMPORT_EMULATE": "mlu"} if backend == "mlu" else {}
    runs = {}
    for packing in (True, False):
        folder = tmp_path / f"packing-{packing}"
        folder.mkdir()
        config = write_config(folder, "lora", training_args__max_steps=20, training_args__per_device_train_batch_size=8,
                              training_args__lr_scheduler_type="constant", training_args__save_strategy="no",
                              training_args__eval_strategy="no", training_args__predict_with_generate=False,
                              data_config={"train_file": "train.jsonl"}, glmport={"dtype": "fp32", "packing": packing})
        result = ok(run_cli("train", data_dir, models["remote"], config, "--backend", backend, env=env,
                            in_process=False))
        assert ("padding-free packed batches" in result.stderr) == packing, result.stderr[-2000:]
        assert summary(folder)["steps"] == 20
        runs[packing] = _losses(folder)
    assert len(runs[True]) == len(runs[False]) == 20
    assert max(abs(a - b) for a, b in zip(runs[True], runs[False])) < 1e-3, runs
    assert runs[True][-1] < runs[True][0]  # it trains


@pytest.mark.slow
def test_packing_true_on_a_model_it_cannot_pack_is_refused_before_training(models, data_dir, tmp_path):
    config = write_config(tmp_path, "ptuning", training_args__eval_strategy="no", glmport={"dtype": "fp32", "packing": True})
    result = ok(run_cli("train", data_dir, models["remote"], config, "-q", in_process=False), exit_code=2)
    assert "glmport.packing" in result.stderr and "P-Tuning" in result.stderr
