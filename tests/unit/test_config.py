"""The config file: upstream schema as is, legacy keys, YAML 1.2 scalars, overrides, one error for all."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from glmport.config import load_run_config
from glmport.errors import ConfigError


def write(tmp_path: Path, text: str, *, model=True, data=("train.json", "dev.json")) -> Path:
    for name in data:
        (tmp_path / name).write_text('{"conversations": []}\n')
    if model:
        (tmp_path / "model").mkdir(exist_ok=True)
        (tmp_path / "model" / "config.json").write_text("{}")
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


UPSTREAM_LORA = """\
data_config:
  train_file: train.json
  val_file: dev.json
  test_file: dev.json
  num_proc: 16
max_input_length: 256
max_output_length: 512
training_args:
  output_dir: ./output
  max_steps: 3000
  learning_rate: 5e-5
  per_device_train_batch_size: 4
  dataloader_num_workers: 16
  remove_unused_columns: false
  save_strategy: steps
  save_steps: 500
  log_level: info
  logging_strategy: steps
  logging_steps: 10
  per_device_eval_batch_size: 16
  evaluation_strategy: steps
  eval_steps: 500
  predict_with_generate: true
  generation_config:
    max_new_tokens: 512
  use_cpu: false
peft_config:
  peft_type: LORA
  task_type: CAUSAL_LM
  r: 8
  lora_alpha: 32
  lora_dropout: 0.1
"""


def test_upstream_chatglm3_lora_yaml_is_accepted_as_is(tmp_path, caplog):
    config = load_run_config(write(tmp_path, UPSTREAM_LORA), model_dir=tmp_path / "model")
    assert config.method == "lora"
    assert config.training_args["learning_rate"] == 5e-5  # YAML 1.2 float, not the string "5e-5"
    assert config.training_args["eval_strategy"] == "steps" and "evaluation_strategy" not in config.training_args
    assert any("evaluation_strategy is now training_args.eval_strategy" in w for w in config.warnings)
    assert config.data_path("train") == tmp_path / "train.json"


def test_yaml_12_keeps_no_as_a_string(tmp_path):
    config = load_run_config(write(tmp_path, UPSTREAM_LORA.replace("save_strategy: steps", "save_strategy: no")),
                             model_dir=tmp_path / "model")
    assert config.training_args["save_strategy"] == "no"


def test_glm4_keys_and_glmport_section(tmp_path):
    text = UPSTREAM_LORA + "combine: true\nfreezeV: true\nglmport:\n  backend: cpu\n  eval_samples: 7\n"
    config = load_run_config(write(tmp_path, text), model_dir=tmp_path / "model")
    assert config.combine and config.freeze_vision and config.glmport.eval_samples == 7


def test_every_problem_is_reported_at_once_with_its_line(tmp_path):
    text = UPSTREAM_LORA.replace("max_steps: 3000", "max_step: 3000").replace("r: 8", "r: 8\n  bogus: 1")
    text = text.replace("per_device_train_batch_size: 4", "per_device_train_batch_size: four")
    text += "combin: true\n"
    with pytest.raises(ConfigError) as caught:
        load_run_config(write(tmp_path, text, data=("dev.json",)), model_dir=tmp_path / "model")
    message = str(caught.value)
    path = tmp_path / "config.yaml"
    assert f"{path}:10: training_args.max_step: unknown key" in message and "did you mean 'max_steps'" in message
    assert f"{path}:12: training_args.per_device_train_batch_size: expected int, got 'four'" in message
    assert "combin: unknown top-level key" in message and "did you mean 'combine'" in message
    assert "peft_config: peft rejects it" in message and "bogus" in message
    assert "data_config.train_file:" in message and "train.json does not exist" in message
    assert "problem(s) in the configuration" in message


def test_overrides_win_and_are_named_in_errors(tmp_path):
    path = write(tmp_path, UPSTREAM_LORA)
    config = load_run_config(path, ["training_args.max_steps=20", "glmport.eval_samples=3"], model_dir=tmp_path / "model")
    assert config.training_args["max_steps"] == 20 and config.glmport.eval_samples == 3
    with pytest.raises(ConfigError, match=r"override `training_args.max_steps=lots`: training_args.max_steps: expected int"):
        load_run_config(path, ["training_args.max_steps=lots"], model_dir=tmp_path / "model")


def test_malformed_override_and_yaml_syntax(tmp_path):
    path = write(tmp_path, UPSTREAM_LORA)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_run_config(path, ["=3"], model_dir=tmp_path / "model")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training_args:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3:1: YAML syntax error"):
        load_run_config(bad)


def test_missing_model_and_deepspeed_files(tmp_path):
    text = UPSTREAM_LORA.replace("  use_cpu: false", "  use_cpu: false\n  deepspeed: ds_zero_9.json")
    with pytest.raises(ConfigError) as caught:
        load_run_config(write(tmp_path, text, model=False), model_dir=tmp_path / "nowhere")
    message = str(caught.value)
    assert "nowhere is not a model folder (no config.json)" in message
    assert "training_args.deepspeed: ds_zero_9.json not found" in message


def test_removed_training_args_are_dropped_with_a_reason(tmp_path):
    text = UPSTREAM_LORA.replace("  use_cpu: false", "  use_cpu: false\n  overwrite_output_dir: true\n  logging_dir: runs")
    config = load_run_config(write(tmp_path, text), model_dir=tmp_path / "model")
    assert "overwrite_output_dir" not in config.training_args and "logging_dir" not in config.training_args
    assert any("overwrite_output_dir is ignored" in w for w in config.warnings)


def test_shipped_configs_validate(repo_root, tmp_path):
    for name in ("lora.yaml", "ptuning_v2.yaml", "sft.yaml"):
        for split in ("train.json", "dev.json"):
            (tmp_path / split).write_text("")
        (tmp_path / "m").mkdir(exist_ok=True)
        (tmp_path / "m" / "config.json").write_text("{}")
        config = load_run_config(repo_root / "configs" / name, data_dir=tmp_path, model_dir=tmp_path / "m")
        assert config.method == {"lora.yaml": "lora", "ptuning_v2.yaml": "ptuning", "sft.yaml": "sft"}[name]


# --- values, files and overrides that cannot make a run (each reported with its line or override) -----


def _problems(path: Path, overrides=(), **kwargs) -> list[str]:
    from glmport.config import read_run_config

    _, problems = read_run_config(path, list(overrides), **kwargs)
    return [str(p) for p in problems]


@pytest.mark.parametrize("key, value, expected", [
    ("max_steps", 0, "training_args.max_steps: 0 trains nothing"),
    ("max_steps", -5, "training_args.max_steps: -5 trains nothing"),
    ("learning_rate", -0.001, "training_args.learning_rate: -0.001: must be 0 or more"),
    ("learning_rate", ".inf", "training_args.learning_rate: inf: must be 0 or more"),
    ("per_device_train_batch_size", 0, "training_args.per_device_train_batch_size: 0: must be 1 or more"),
    ("gradient_accumulation_steps", -1, "training_args.gradient_accumulation_steps: -1: must be 1 or more"),
    ("warmup_steps", -0.1, "training_args.warmup_steps: -0.1: must be 0 or more"),
])
def test_training_numbers_that_cannot_make_a_run(tmp_path, key, value, expected):
    path = write(tmp_path, UPSTREAM_LORA)
    problems = _problems(path, [f"training_args.{key}={value}"], model_dir=tmp_path / "model")
    assert problems == [f"override `training_args.{key}={value}`: {expected}"] or \
        (len(problems) == 1 and problems[0].startswith(f"override `training_args.{key}={value}`: {expected}\n"))


def test_max_steps_minus_one_trains_for_the_epochs(tmp_path):
    path = write(tmp_path, UPSTREAM_LORA.replace("max_steps: 3000", "max_steps: -1\n  num_train_epochs: 2"))
    assert _problems(path, model_dir=tmp_path / "model") == []
    problems = _problems(path, ["training_args.num_train_epochs=0"], model_dir=tmp_path / "model")
    assert len(problems) == 1 and "training_args.num_train_epochs: 0 trains nothing" in problems[0]


def test_a_config_that_is_not_utf8_names_line_column_and_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data_config:\n  train_file: tr\u00e9in.jsonl\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    assert caught.value.problems[0].where == f"{path}:2:17"
    assert caught.value.problems[0].what == "not UTF-8 text (byte 0xe9 at offset 29)"
    assert "save the file as UTF-8" in caught.value.problems[0].fix


def test_a_data_path_that_is_a_folder(tmp_path):
    path = write(tmp_path, UPSTREAM_LORA.replace("test_file: dev.json", "test_file: splits"))
    (tmp_path / "splits").mkdir()
    problems = _problems(path, model_dir=tmp_path / "model")
    assert problems == [f"{path}:4: data_config.test_file: {tmp_path / 'splits'} is a folder; a data file is expected\n"
                        "    -> name a .jsonl or .json file inside it (data_config.test_file: splits/test.jsonl, say)"]


def test_keys_an_override_adds_are_blamed_on_it(tmp_path):
    path = write(tmp_path, UPSTREAM_LORA)
    problems = _problems(path, ["nosuch.key=1", "training_args.generation_config.bogus.deep=2",
                                "peft_config.r=8"], model_dir=tmp_path / "model")
    assert problems[0] == "override `nosuch.key=1`: nosuch: unknown top-level key\n    -> remove it"
    assert problems[1].startswith("override `training_args.generation_config.bogus.deep=2`: "
                                  "training_args.generation_config.bogus: not a generation setting")
    assert len(problems) == 2  # an override of a key the file has is fine


def test_bad_overrides_are_listed_with_the_other_problems(tmp_path):
    path = write(tmp_path, UPSTREAM_LORA)
    problems = _problems(path, ["=3", "max_input_length.x=1", "training_args.max_steps=[1", "combin=true"],
                         model_dir=tmp_path / "model")
    assert [p.split(":")[0] for p in problems] == [
        "override `=3`", "override `max_input_length.x=1`", "override `training_args.max_steps=[1`",
        "override `combin=true`"]
    assert "max_input_length is not a mapping, so it has no key 'x'" in problems[1]


def test_trust_remote_code_is_a_glmport_setting(tmp_path):
    path = write(tmp_path, UPSTREAM_LORA + "glmport:\n  trust_remote_code: false\n")
    config = load_run_config(path, model_dir=tmp_path / "model")
    assert config.glmport.trust_remote_code is False and config.locate("glmport.trust_remote_code") == f"{path}:34"
    assert load_run_config(write(tmp_path, UPSTREAM_LORA), model_dir=tmp_path / "model").glmport.trust_remote_code is None
    with pytest.raises(ConfigError, match="glmport.trust_remote_code: expected bool | None, got 'maybe'"):
        load_run_config(path, ["glmport.trust_remote_code=maybe"], model_dir=tmp_path / "model")


def test_config_files_that_cannot_be_used(tmp_path):
    for text, expected in (("- a list\n", ":1: the top level is a list, not a mapping of keys"),
                           ("x: !!python/object/apply:os.system ['true']\n", ":1:4: YAML tag not allowed")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_run_config(path)
        assert f"{path}{expected}" in str(caught.value)
    with pytest.raises(ConfigError, match="is a folder; the config is a YAML file"):
        load_run_config(tmp_path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nowhere.yaml")


@pytest.mark.parametrize("fmt", ["sharegpt", "openai", "alpaca", "context-target"])
def test_every_data_format_can_be_named_in_the_config(tmp_path, fmt):
    config = load_run_config(write(tmp_path, UPSTREAM_LORA + f"glmport:\n  data_format: {fmt}\n"),
                             model_dir=tmp_path / "model")
    assert config.glmport.data_format == fmt
    with pytest.raises(ConfigError, match="glmport.data_format"):
        load_run_config(write(tmp_path, UPSTREAM_LORA + "glmport:\n  data_format: sharegtp\n"),
                        model_dir=tmp_path / "model")
