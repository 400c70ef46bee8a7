"""Bad input to ``glmport train`` and ``glmport infer``, as users make it: each case checks the exit status,
that the message names the file and line, key or flag at fault and says what to do, and that nothing was
written to the output folder.

Input errors happen before any model is loaded, so these run in this process in a second or two; the few
that load remote code, or train, run in a fresh interpreter. Each case runs on the plain ``cpu`` backend
and, where the code path differs, on emulated ``mlu``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from e2e_cli import write_config

from glmport.testing import ok, run_cli

REPO = Path(__file__).resolve().parents[2]
CPU = ([], {})
MLU = (["--backend", "mlu"], {"GLMPORT_EMULATE": "mlu"})
BACKENDS = pytest.mark.parametrize("backend", [CPU, MLU], ids=["cpu", "emulated-mlu"])


def fake_model(folder: Path) -> Path:
    """A folder that passes the config checks (they only look for config.json); never loaded here."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "glm", "vocab_size": 100}')
    return folder


def setup(tmp_path: Path, **settings) -> Path:
    """A small config in ``tmp_path`` with its data and a model folder next to it; ``settings`` go into it
    as write_config's section__key=value. Its output folder is ``tmp_path/out``."""
    for split in ("train.jsonl", "dev.jsonl"):
        shutil.copyfile(DATA / split, tmp_path / split)
    settings.setdefault("glmport", {"eval_samples": 4, "dtype": "fp32", "model_dir": str(fake_model(tmp_path / "model"))})
    return write_config(tmp_path, "lora", **settings)


def train(tmp_path: Path, *args, backend=CPU, **settings):
    """``glmport train CONFIG ARGS`` (in this process) with the config :func:`setup` writes."""
    flags, env = backend
    config = setup(tmp_path, **settings)
    return config, run_cli("train", config, *args, *flags, env=env)


def line_of(config: Path, text: str) -> int:
    """The 1-based line of ``config`` that starts with ``text`` (indentation aside)."""
    return next(i for i, line in enumerate(config.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
                if line.strip().startswith(text))


def nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "out").exists()


@pytest.fixture(scope="module", autouse=True)
def _data(tmp_path_factory):
    from glmport.tiny.synthetic import make_records, write_jsonl

    global DATA
    DATA = tmp_path_factory.mktemp("data")
    write_jsonl(DATA / "train.jsonl", make_records(8, seed=1))
    write_jsonl(DATA / "dev.jsonl", make_records(4, seed=2))


# --- 1, 2. training numbers that cannot make a run -------------------------------------------------


@BACKENDS
@pytest.mark.parametrize("steps", [0, -2])
def test_max_steps_that_trains_nothing_is_refused_naming_the_key(tmp_path, backend, steps):
    config, result = train(tmp_path, backend=backend, training_args__max_steps=steps)
    ok(result, exit_code=2)
    line = line_of(config, "max_steps:")
    assert f"{config}:{line}: training_args.max_steps: {steps}" in result.stderr, result
    assert "-1 to train for training_args.num_train_epochs" in result.stderr
    assert "Traceback" not in result.stderr and nothing_written(tmp_path)


def test_max_steps_minus_one_needs_epochs(tmp_path):
    config, result = train(tmp_path, training_args__max_steps=-1, training_args__num_train_epochs=0)
    ok(result, exit_code=2)
    assert f"{config}:{line_of(config, 'num_train_epochs')}: training_args.num_train_epochs: 0" in result.stderr, result
    assert "1 problem(s)" in result.stderr and nothing_written(tmp_path)


@BACKENDS
def test_a_negative_learning_rate_is_a_config_problem(tmp_path, backend):
    config, result = train(tmp_path, backend=backend, training_args__learning_rate=-1e-4)
    ok(result, exit_code=2)
    assert f"{config}:{line_of(config, 'learning_rate')}: training_args.learning_rate: -0.0001" in result.stderr, result
    assert "must be 0 or more" in result.stderr
    assert "Traceback" not in result.stderr and nothing_written(tmp_path)


def test_a_learning_rate_override_is_blamed_on_the_override(tmp_path):
    _, result = train(tmp_path, "training_args.learning_rate=.nan")
    ok(result, exit_code=2)
    assert "override `training_args.learning_rate=.nan`: training_args.learning_rate: nan" in result.stderr, result
    assert nothing_written(tmp_path)


# --- 3. a config file that is not UTF-8 --------------------------------------------------------------


@BACKENDS
def test_a_config_that_is_not_utf8_is_named_with_its_line(tmp_path, backend):
    config = setup(tmp_path)
    text = config.read_text(encoding="utf-8").replace("train_file: train.jsonl", "train_file: train.jsonl  # 训练集")
    config.write_bytes(text.encode("gbk"))
    flags, env = backend
    result = ok(run_cli("train", config, *flags, env=env), exit_code=2)
    line = line_of(config, "train_file")
    assert re.search(rf"{re.escape(str(config))}:{line}:\d+: not UTF-8 text \(byte 0x[0-9a-f]{{2}} at offset \d+\)",
                     result.stderr), result
    assert "save the file as UTF-8" in result.stderr
    assert "Traceback" not in result.stderr and nothing_written(tmp_path)


def test_a_utf8_config_with_a_byte_order_mark_is_read(tmp_path):
    config = setup(tmp_path)
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    result = ok(run_cli("train", config, "training_args.max_steps=0"), exit_code=2)
    assert "training_args.max_steps: 0" in result.stderr and "problem(s)" in result.stderr, result


def test_yaml_tags_that_build_python_objects_are_refused_not_run(tmp_path):
    config = setup(tmp_path)
    marker = tmp_path / "ran"
    with config.open("a", encoding="utf-8") as out:
        out.write(f"swanlab: !!python/object/apply:os.system ['touch {marker}']\n")
    result = ok(run_cli("train", config), exit_code=2)
    assert f"{config}:{line_of(config, 'swanlab')}" in result.stderr and "python/object" in result.stderr, result
    assert not marker.exists() and nothing_written(tmp_path)


# --- 4. mixed precision the backend cannot do --------------------------------------------------------


def test_fp16_on_the_cpu_is_a_config_problem(tmp_path):
    config, result = train(tmp_path, training_args__fp16=True)
    ok(result, exit_code=2)
    assert f"{config}:{line_of(config, 'fp16')}: training_args.fp16: backend cpu has no fp16 (it supports fp32, bf16)" \
        in result.stderr, result
    assert "training_args.bf16: true instead, or remove training_args.fp16" in result.stderr
    assert nothing_written(tmp_path)


def test_bf16_on_an_mlu_without_bf16_is_a_config_problem(tmp_path):
    config, result = train(tmp_path, backend=(["--backend", "mlu"], {"GLMPORT_EMULATE": "mlu", "GLMPORT_EMULATE_BF16": "0"}),
                           training_args__bf16=True)
    ok(result, exit_code=2)
    assert f"{config}:{line_of(config, 'bf16')}: training_args.bf16: backend mlu has no bf16 (it supports fp32, fp16)" \
        in result.stderr, result
    assert "training_args.fp16: true instead" in result.stderr and nothing_written(tmp_path)


def test_fp16_on_an_mlu_passes_the_precision_check(tmp_path):
    """Nothing wrong with fp16 there: a run with another problem lists only that one."""
    _, result = train(tmp_path, "training_args.max_steps=0", backend=MLU, training_args__fp16=True)
    ok(result, exit_code=2)
    assert "1 problem(s)" in result.stderr and "training_args.fp16" not in result.stderr, result


@BACKENDS
def test_a_base_dtype_the_backend_lacks_is_refused_before_anything_is_written(tmp_path, backend):
    flags, env = backend
    env = dict(env, GLMPORT_EMULATE_BF16="0")
    config, result = train(tmp_path, "glmport.dtype=bf16" if flags else "glmport.dtype=fp16", backend=(flags, env))
    ok(result, exit_code=2)
    wanted = "glmport.dtype: backend mlu has no bf16" if flags else "glmport.dtype: backend cpu has no fp16"
    assert wanted in result.stderr and "override `glmport.dtype=" in result.stderr, result
    assert nothing_written(tmp_path)


# --- 5. a data path that is a folder ------------------------------------------------------------------


@pytest.mark.parametrize("synthetic", [False, True], ids=["files", "synthetic-data"])
def test_a_data_path_that_is_a_folder_says_so(tmp_path, synthetic):
    (tmp_path / "dev_set").mkdir()
    glmport = {"eval_samples": 4, "dtype": "fp32", "model_dir": str(fake_model(tmp_path / "model")),
               **({"synthetic_data": {"train": 4, "val": 4}} if synthetic else {})}
    config, result = train(tmp_path, glmport=glmport, data_config={"train_file": "train.jsonl", "val_file": "dev_set"})
    ok(result, exit_code=2)
    where = f"{config}:{line_of(config, 'val_file')}"
    assert f"{where}: data_config.val_file: {tmp_path / 'dev_set'} is a folder; a data file is expected" \
        in result.stderr, result
    assert "does not exist" not in result.stderr
    assert "name a .jsonl or .json file inside it (data_config.val_file: dev_set/dev.jsonl, say)" in result.stderr and nothing_written(tmp_path)


# --- 6. overrides are blamed for what they add --------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("nosuch.key=1", "nosuch: unknown top-level key"),
    ("training_args.nosuch.deep=1", "training_args.nosuch: unknown key"),
    ("glmport.nosuch=1", "glmport.nosuch: unknown key"),
])
def test_an_unknown_key_from_an_override_is_blamed_on_the_override(tmp_path, override, key):
    config, result = train(tmp_path, override)
    ok(result, exit_code=2)
    assert f"override `{override}`: {key}" in result.stderr, result
    assert f". {config}" not in result.stderr  # no problem is blamed on the file
    assert nothing_written(tmp_path)


def test_every_bad_override_is_listed_with_the_config_problems(tmp_path):
    config, result = train(tmp_path, "training_args.max_steps.deep=1", "=3", "nosuch=1")
    ok(result, exit_code=2)
    assert "3 problem(s)" in result.stderr, result
    assert "override `training_args.max_steps.deep=1`: training_args.max_steps is not a mapping" in result.stderr
    assert "override `=3`: expected KEY=VALUE" in result.stderr
    assert "override `nosuch=1`: nosuch: unknown top-level key" in result.stderr and nothing_written(tmp_path)


# --- 7. an unavailable backend is one of the problems -------------------------------------------------


NO_MLU = {"GLMPORT_EMULATE": None, "GLMPORT_BACKEND": None}


def test_an_unavailable_backend_is_listed_with_the_config_problems(tmp_path):
    config, result = train(tmp_path, "nosuch.key=1", backend=(["--backend", "mlu"], NO_MLU),
                           training_args__max_steps=0)
    ok(result, exit_code=2)
    assert "3 problem(s)" in result.stderr, result
    assert "--backend mlu: backend 'mlu' is not available" in result.stderr
    assert "override `nosuch.key=1`: nosuch: unknown top-level key" in result.stderr
    assert f"{config}:{line_of(config, 'max_steps')}: training_args.max_steps: 0" in result.stderr
    assert nothing_written(tmp_path)


def test_an_unavailable_backend_from_the_config_names_its_line(tmp_path):
    glmport = {"backend": "mlu", "model_dir": str(fake_model(tmp_path / "model"))}
    config, result = train(tmp_path, "training_args.max_steps=0", backend=([], NO_MLU), glmport=glmport)
    ok(result, exit_code=2)
    assert f"{config}:{line_of(config, 'backend: mlu')}: backend 'mlu' is not available" in result.stderr, result
    assert nothing_written(tmp_path)


def test_an_unavailable_backend_alone_exits_3(tmp_path):
    _, result = train(tmp_path, backend=(["--backend", "mlu"], NO_MLU))
    ok(result, exit_code=3)
    assert "backend 'mlu' is not available" in result.stderr and "problem(s)" not in result.stderr, result
    assert nothing_written(tmp_path)


def test_an_unreadable_config_and_an_unknown_backend_are_reported_together(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("training_args:\n  max_steps: [1, 2\n")
    result = ok(run_cli("train", config, "--backend", "nosuch"), exit_code=2)
    assert f"{config}:3:1: YAML syntax error" in result.stderr, result
    assert "--backend nosuch: no such backend. Known backends:" in result.stderr


# --- 8, 11. remote code: consent and unverified revisions --------------------------------------------


def test_train_accepts_allow_unverified_patches_and_trust_remote_code(tmp_path):
    """The flags parse on `glmport train` (the run then stops at the config problem)."""
    _, result = train(tmp_path, "training_args.max_steps=0", "--allow-unverified-patches", "--trust-remote-code")
    ok(result, exit_code=2)
    assert "unrecognized arguments" not in result.stderr and "training_args.max_steps: 0" in result.stderr, result


@pytest.fixture(scope="module")
def unknown_remote(tmp_path_factory) -> Path:
    """The tiny remote-code model with one line added to modeling_chatglm.py: a revision no manifest knows,
    which writes a marker file when it is imported (run)."""
    folder = tmp_path_factory.mktemp("unknown") / "model"
    ok(run_cli("init-model", "tiny-remote", folder))
    marker = folder.parent / "remote-code-ran"
    with (folder / "modeling_chatglm.py").open("a", encoding="utf-8") as out:
        out.write(f"\nopen({str(marker)!r}, 'a').close()  # local edit\n")
    return folder


def ran(model: Path) -> bool:
    return (model.parent / "remote-code-ran").exists()


@BACKENDS
def test_train_refuses_unknown_remote_code_before_running_it(tmp_path, unknown_remote, backend):
    glmport = {"eval_samples": 4, "dtype": "fp32", "model_dir": str(unknown_remote)}
    _, result = train(tmp_path, backend=backend, glmport=glmport)
    ok(result, exit_code=2)
    assert f"{unknown_remote / 'modeling_chatglm.py'}: sha256 " in result.stderr, result
    assert "not a revision glmport knows" in result.stderr
    assert ("pass --allow-unverified-patches --trust-remote-code (or set glmport.allow_unverified_patches: true "
            "and glmport.trust_remote_code: true)") in result.stderr
    assert not ran(unknown_remote) and nothing_written(tmp_path)


def test_train_with_only_allow_unverified_still_asks_for_trust(tmp_path, unknown_remote):
    glmport = {"eval_samples": 4, "dtype": "fp32", "model_dir": str(unknown_remote)}
    _, result = train(tmp_path, "--allow-unverified-patches", glmport=glmport)
    ok(result, exit_code=2)
    assert "pass --trust-remote-code (or set glmport.trust_remote_code: true)" in result.stderr, result
    assert "--allow-unverified-patches" not in result.stderr.split("->")[-1]
    assert not ran(unknown_remote) and nothing_written(tmp_path)


def test_train_with_only_trust_asks_to_allow_unverified_patches(tmp_path, unknown_remote):
    glmport = {"eval_samples": 4, "dtype": "fp32", "model_dir": str(unknown_remote), "trust_remote_code": True}
    _, result = train(tmp_path, glmport=glmport)
    ok(result, exit_code=2)
    assert "unknown revision" in result.stderr and "--allow-unverified-patches" in result.stderr, result
    assert "glmport.allow_unverified_patches: true" in result.stderr
    assert not ran(unknown_remote) and nothing_written(tmp_path)


def test_trust_remote_code_false_refuses_even_a_known_revision(tmp_path):
    model = tmp_path / "remote"
    ok(run_cli("init-model", "tiny-remote", model))
    glmport = {"eval_samples": 4, "dtype": "fp32", "model_dir": str(model), "trust_remote_code": False}
    config, result = train(tmp_path, glmport=glmport)
    ok(result, exit_code=2)
    assert f"{config}:{line_of(config, 'trust_remote_code')}: glmport.trust_remote_code is false" in result.stderr, result
    assert "modeling_chatglm.py" in result.stderr and "remove glmport.trust_remote_code: false" in result.stderr
    assert nothing_written(tmp_path)


def test_infer_refuses_unknown_remote_code_and_names_its_flags(unknown_remote):
    result = ok(run_cli("infer", unknown_remote, "--prompt", "hi", "--allow-unverified-patches"), exit_code=2)
    assert "not a revision glmport knows" in result.stderr, result
    assert "pass --trust-remote-code" in result.stderr and "glmport.trust_remote_code" not in result.stderr
    assert not ran(unknown_remote)
    result = ok(run_cli("infer", unknown_remote, "--prompt", "hi", "--trust-remote-code"), exit_code=2)
    assert "--allow-unverified-patches" in result.stderr and not ran(unknown_remote), result


def test_infer_no_trust_remote_code_refuses_a_known_revision(tmp_path):
    model = tmp_path / "remote"
    ok(run_cli("init-model", "tiny-remote", model))
    result = ok(run_cli("infer", model, "--prompt", "hi", "--no-trust-remote-code"), exit_code=2)
    assert "--no-trust-remote-code" in result.stderr and "modeling_chatglm.py" in result.stderr, result


def test_known_remote_code_is_named_with_its_hash_before_it_runs(tmp_path):
    model = tmp_path / "remote"
    ok(run_cli("init-model", "tiny-remote", model))
    result = ok(run_cli("infer", model, "--prompt", "hi", "--max-new-tokens", "2", in_process=False))
    line = next(x for x in result.stderr.splitlines() if "running the model's remote code" in x)
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"):
        assert re.search(rf"{name} sha256 [0-9a-f]{{12}} = glmport-fixture-", line), line


@pytest.mark.slow
def test_unknown_remote_code_runs_with_both_flags(tmp_path, unknown_remote):
    glmport = {"eval_samples": 2, "dtype": "fp32", "model_dir": str(unknown_remote)}
    config = setup(tmp_path, glmport=glmport, training_args__max_steps=1, training_args__save_steps=1,
                   training_args__eval_strategy="no", training_args__predict_with_generate=False)
    result = ok(run_cli("train", config, "--allow-unverified-patches", "--trust-remote-code", in_process=False))
    line = next(x for x in result.stderr.splitlines() if "running the model's remote code" in x)
    assert "modeling_chatglm.py sha256" in line and "NOT IN THE MANIFEST" in line, line
    assert (tmp_path / "out" / "final").is_dir() and ran(unknown_remote)


# --- 9. the output folder is named where the run starts -----------------------------------------------


@BACKENDS
def test_the_output_folder_is_printed_absolute_and_relative_to_the_working_directory(tmp_path, backend):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "train.jsonl").write_text('{"conversations": "not a list"}\n')
    glmport = {"eval_samples": 4, "dtype": "fp32", "model_dir": str(fake_model(tmp_path / "model"))}
    config = write_config(tmp_path, "lora", glmport=glmport, data_config={"train_file": "train.jsonl"},
                          training_args__output_dir="rel-out")
    flags, env = backend
    result = ok(run_cli("train", config, *flags, env=env, cwd=work), exit_code=2)  # the data record is bad
    assert f"[glmport] output folder: {work / 'rel-out'} (training_args.output_dir" in result.stderr, result
    assert not (work / "rel-out").exists() and not (tmp_path / "rel-out").exists()


# --- 10. glmport infer on a training checkpoint -------------------------------------------------------


def _checkpoint(run: Path, step: int) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    (folder / "glmport_checkpoint.json").write_text(json.dumps({"step": step}))
    return folder


def test_infer_on_a_checkpoint_says_how_to_use_it(tmp_path):
    folder = _checkpoint(tmp_path / "out", 3)
    result = ok(run_cli("infer", folder, "--prompt", "hi"), exit_code=2)
    assert f"{folder}: a training checkpoint (step 3) of {tmp_path / 'out'}" in result.stderr, result
    assert "--resume 3" in result.stderr and f"glmport infer {tmp_path / 'out' / 'final'}" in result.stderr
    assert "no config.json" not in result.stderr


def test_infer_on_an_adapter_checkpoint_whose_base_is_gone_explains(tmp_path):
    folder = _checkpoint(tmp_path / "out", 2)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone"),
                                                            "peft_type": "LORA"}))
    result = ok(run_cli("infer", folder, "--prompt", "hi"), exit_code=2)
    assert f"its adapter_config.json names the base model {tmp_path / 'gone'}, which is not a model folder" \
        in result.stderr, result
    assert "--resume 2" in result.stderr


@BACKENDS
def test_infer_loads_an_adapter_checkpoint_like_a_result(tmp_path, backend):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tmp_path / "native"
    ok(run_cli("init-model", "tiny-native", base))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    folder = _checkpoint(tmp_path / "out", 4)
    model.save_pretrained(str(folder))
    flags, env = backend
    result = ok(run_cli("infer", folder, "--prompt", "hi", "--max-new-tokens", "2", "--json", *flags, env=env))
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert f"adapter {folder}" in reply["model"] and str(base) in reply["model"], reply
    assert "training checkpoint (step 4)" in result.stderr


# --- 12. nothing glmport loads is evaluated -----------------------------------------------------------


def test_torch_load_is_only_called_with_weights_only():
    calls = []
    for folder in ("glmport", "backends", "patches"):
        for path in (REPO / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"\btorch\.load\(", line) and "weights_only=True" not in line:
                    calls.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not calls, "torch.load without weights_only=True:\n" + "\n".join(calls)


def test_yaml_is_read_with_a_safe_loader():
    import yaml

    from glmport.yamlfile import yaml_loader

    assert issubclass(yaml_loader(), yaml.SafeLoader)
    source = (REPO / "glmport").rglob("*.py")
    unsafe = [str(p) for p in source if re.search(r"yaml\.(unsafe_load|full_load)|Loader=yaml\.(Unsafe|Full)?Loader\b",
                                                      p.read_text(encoding="utf-8"))]
    assert not unsafe, unsafe
