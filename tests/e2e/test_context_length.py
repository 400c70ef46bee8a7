"""``glmport train`` refuses samples longer than the model's context before the model loads.

A training sample takes up to ``max_input_length + max_output_length + 1`` tokens (glmport.data.truncation's
budget), and a peft prefix (P-Tuning v2 on GLM-4 and native models) shifts the real tokens' positions by its
``num_virtual_tokens``. Past the model's context (``seq_length`` in a remote folder's config.json,
``max_sequence_length`` for ChatGLM-6B, ``max_position_embeddings`` in a native one) the remote code's rotary
table lookup used to fail with an IndexError, an internal error, after the model had loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from e2e_cli import summary, write_config

from glmport.testing import ok, run_cli
from glmport.tiny.synthetic import make_records, write_jsonl

CPU = ([], {})
MLU = (["--backend", "mlu"], {"GLMPORT_EMULATE": "mlu", "GLMPORT_EMULATE_BF16": "0"})
BACKENDS = pytest.mark.parametrize("backend", [CPU, MLU], ids=["cpu", "emulated-mlu"])
IN, OUT = 16, 8
BUDGET = IN + OUT + 1  # the longest training sample: prompt, answer and its stop token


def with_context(source: Path, folder: Path, key: str, value: int) -> Path:
    """A copy of the tiny model ``source`` whose config.json says its context is ``value`` tokens."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    assert key in config, f"{source}/config.json has no {key}"
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def setup(tmp_path: Path, model: Path, method: str = "lora", **settings) -> Path:
    write_jsonl(tmp_path / "train.jsonl", make_records(8, seed=1))
    write_jsonl(tmp_path / "dev.jsonl", make_records(4, seed=2))
    return write_config(tmp_path, method, max_input_length=IN, max_output_length=OUT,
                        glmport={"eval_samples": 4, "dtype": "fp32", "model_dir": str(model)}, **settings)


def line_of(config: Path, key: str) -> str:
    number = next(i for i, line in enumerate(config.read_text().splitlines(), 1) if line.startswith(f"{key}:"))
    return f"{config}:{number}"


@BACKENDS
def test_remote_model_shorter_than_a_sample_is_refused(tmp_path, models, backend):
    model = with_context(models["remote"], tmp_path / "model", "seq_length", BUDGET - 1)
    config = setup(tmp_path, model)
    flags, env = backend
    result = ok(run_cli("train", config, *flags, env=env), exit_code=2)
    err = result.stderr
    assert "Traceback" not in err and "IndexError" not in err, result
    assert f"{line_of(config, 'max_input_length')}: max_input_length {IN} + max_output_length {OUT} + 1" in err, result
    assert f"{model / 'config.json'} seq_length is {BUDGET - 1}" in err
    assert f"lower max_input_length and max_output_length to at most {BUDGET - 2} tokens together" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_chatglm6b_context_key(tmp_path, models):
    model = with_context(models["remote-chatglm"], tmp_path / "model", "max_sequence_length", BUDGET - 1)
    config = setup(tmp_path, model)
    result = ok(run_cli("train", config), exit_code=2)
    assert f"{model / 'config.json'} max_sequence_length is {BUDGET - 1}" in result.stderr, result


@BACKENDS
def test_native_prefix_takes_positions(tmp_path, models, backend):
    """peft's prefix tuning moves the real tokens past its virtual ones: they need room too."""
    model = with_context(models["native"], tmp_path / "model", "max_position_embeddings", BUDGET)
    config = setup(tmp_path, model, "ptuning")  # num_virtual_tokens 4
    flags, env = backend
    result = ok(run_cli("train", config, *flags, env=env), exit_code=2)
    assert f"+ peft_config.num_virtual_tokens 4 = {BUDGET + 4} positions" in result.stderr, result
    assert f"{model / 'config.json'} max_position_embeddings is {BUDGET}" in result.stderr
    assert f"at most {BUDGET - 1 - 4} tokens together" in result.stderr


def test_command_line_lengths_are_named_as_given(tmp_path, models):
    model = with_context(models["remote"], tmp_path / "model", "seq_length", BUDGET)
    config = setup(tmp_path, model)
    result = ok(run_cli("train", config, f"max_output_length={OUT + 1}"), exit_code=2)
    assert f"max_output_length {OUT + 1}" in result.stderr and f"seq_length is {BUDGET}" in result.stderr, result


@pytest.mark.slow
@pytest.mark.parametrize("name,method,key,prefix", [
    ("remote", "lora", "seq_length", 0),
    ("remote", "ptuning", "seq_length", 0),  # ChatGLM3's own prefix encoder: the prefix takes no position
    ("remote-glm4", "ptuning", "seq_length", 4),  # peft's prefix: it does
])
def test_a_context_that_just_fits_trains(tmp_path, models, name, method, key, prefix):
    """The check is exact: a context of the longest sample (+ the peft prefix) trains, on samples the
    budget trims to that length; one token less is refused."""
    model = with_context(models[name], tmp_path / "model", key, BUDGET + prefix)
    config = setup(tmp_path, model, method, training_args__max_steps=2, training_args__eval_steps=2,
                   training_args__save_steps=2)
    ok(run_cli("train", config, in_process=False))
    assert summary(tmp_path)["trained_steps"] == 2
    tight = with_context(models[name], tmp_path / "tight", key, BUDGET + prefix - 1)
    refused = ok(run_cli("train", config, f"glmport.model_dir={tight}",
                         "training_args.output_dir=" + str(tmp_path / "out2")), exit_code=2)
    assert f"{tight / 'config.json'} {key} is {BUDGET + prefix - 1}" in refused.stderr, refused


def test_evaluation_generation_must_fit_too(tmp_path, models):
    """predict_with_generate: the longest eval prompt (max_input_length + 1) and max_new_tokens after it."""
    model = with_context(models["remote"], tmp_path / "model", "seq_length", BUDGET)
    config = setup(tmp_path, model, training_args__generation_config={"max_new_tokens": BUDGET - IN})
    result = ok(run_cli("train", config), exit_code=2)
    assert (f"max_input_length {IN} + 1 + training_args.generation_config.max_new_tokens {BUDGET - IN} = "
            f"{BUDGET + 1} positions for evaluation's generation") in result.stderr, result
    assert f"at most {BUDGET - 1 - IN} (or max_input_length)" in result.stderr
    assert "longest training sample" not in result.stderr  # the samples themselves fit
