"""``glmport infer``, ``chat`` and ``eval`` on results trained once for this module: a LoRA adapter and a ChatGLM3
prefix encoder on the remote-code model, peft prefix tuning and full SFT on the native one; on the cpu backend
and on mlu under emulation, where the 64-bit guard watches every forward of the generation.

What must hold: the streamed reply is the complete reply; a file of prompts generated in left-padded batches
gives what one prompt at a time gives; a chat through a pipe gives the replies ``infer`` gives for the same
conversations; ``eval`` reproduces the run's own test predictions and scores them with training's functions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_cli import write_config

from glmport.testing import ok, run_cli
from glmport.train.metrics import score_texts

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("infer-chat-eval")]  # train once, on one worker

RUNS = {  # name: (base model, method, config overrides)
    "lora": ("remote", "lora", {}),
    "ptuning": ("remote", "ptuning", {}),  # ChatGLM3's own prefix encoder: prefix_encoder.safetensors
    "prefix": ("native", "ptuning", {}),  # peft prefix tuning
    "sft": ("native", "sft", {"training_args__max_steps": 12, "training_args__learning_rate": 1e-2}),
}
CONTENT = {"lora": "adapter", "ptuning": "prefix-encoder", "prefix": "adapter", "sft": "full-model"}
BACKENDS = {"cpu": ([], {}), "mlu": (["--backend", "mlu"], {"GLMPORT_EMULATE": "mlu"})}
PROMPT = "Sort these words alphabetically: pear fig"
GENERATE = ["--max-new-tokens", "8", "-q"]


@pytest.fixture(scope="module")
def results(models, data_dir, tmp_path_factory) -> dict[str, Path]:
    """name -> OUTPUT_DIR/final; each run also predicted its test split (dev.jsonl) into predictions.jsonl."""
    root = tmp_path_factory.mktemp("trained")
    finals = {}
    for name, (kind, method, overrides) in RUNS.items():
        folder = root / name
        folder.mkdir()
        config = write_config(folder, method, data_config={"train_file": "train.jsonl", "test_file": "dev.jsonl"},
                              training_args__eval_strategy="no", training_args__save_strategy="no", **overrides)
        ok(run_cli("train", data_dir, models[kind], config, "-q", in_process=False))
        finals[name] = folder / "out" / "final"
    return finals


def _prompts_file(path: Path) -> Path:
    """Prompts of different lengths, in each form --file takes: the batch needs padding."""
    lines = [PROMPT,
             {"prompt": "How many words are there in: a bb ccc dddd", "system": "Answer with the result only."},
             {"prompt": "Write these words in capitals: x", "history": [["Reverse: a b", "b a"]]},
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "Reverse the order of these words: one two three four"}]},
             "ok"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _infer_json(final: Path, *args, env=None) -> dict:
    return json.loads(ok(run_cli("infer", final, *args, "--json", *GENERATE, env=env)).stdout)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", sorted(RUNS))
def test_the_streamed_reply_is_the_complete_reply(name, backend, results):
    flags, env = BACKENDS[backend]
    streamed = ok(run_cli("infer", results[name], "--prompt", PROMPT, *GENERATE, *flags, env=env)).stdout
    complete = _infer_json(results[name], "--prompt", PROMPT, *flags, env=env)
    assert streamed == complete["reply"] + "\n"
    assert f" + {CONTENT[name]} {results[name]}" in complete["model"] and complete["backend"] == backend
    guard = complete["guard_64bit"]
    if backend == "mlu":  # every forward of the generation ran under the guard, and nothing 64-bit got through
        assert guard["mode"] == "error" and guard["ops_checked"] > 100 and guard["leaks"] == []
        assert ("int32/native-mask32" if RUNS[name][0] == "native" else "int32/int32-positions") in complete["patches"]
    else:
        assert guard["mode"] is None
        assert ok(run_cli("infer", results[name], "--prompt", PROMPT, "--no-stream", *GENERATE)).stdout == streamed


@pytest.mark.parametrize("name, backend", [*((name, "cpu") for name in sorted(RUNS)), ("lora", "mlu"), ("prefix", "mlu")])
def test_a_file_in_left_padded_batches_gives_what_one_prompt_at_a_time_gives(name, backend, results, tmp_path):
    flags, env = BACKENDS[backend]
    if backend == "mlu":
        flags = [*flags, "--dtype", "fp32"]  # bf16 on a CPU is emulated slowly; the batching is what is tested
    prompts = _prompts_file(tmp_path / "prompts.jsonl")
    batched, single = tmp_path / "out" / "batched.jsonl", tmp_path / "out" / "single.jsonl"
    ok(run_cli("infer", results[name], "--file", prompts, "--batch-size", "3", "-o", batched, *GENERATE, *flags, env=env))
    ok(run_cli("infer", results[name], "--file", prompts, "--batch-size", "1", "-o", single, *GENERATE, *flags, env=env))
    rows = [json.loads(line) for line in batched.read_text().splitlines()]
    assert rows == [json.loads(line) for line in single.read_text().splitlines()]
    assert len(rows) == 5 and all(isinstance(row["reply"], str) for row in rows)
    assert rows[1]["system"] == "Answer with the result only."  # the record comes back with its reply added
    assert sorted(os.listdir(batched.parent)) == ["batched.jsonl", "single.jsonl"]  # written whole, no leftovers
    assert rows[0]["reply"] == _infer_json(results[name], "--prompt", PROMPT, *flags, env=env)["reply"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_eval_reproduces_the_runs_test_predictions_and_scores_them_as_training_does(name, results, data_dir, tmp_path):
    """The run predicted its test split (dev.jsonl) after training; eval of the result on the same file, with the
    run's own lengths and max_new_tokens (read from its glmport_config.yaml), must give the same rows."""
    report = json.loads(ok(run_cli("eval", results[name], data_dir / "dev.jsonl", "-o", tmp_path, "--json", "-q")).stdout)
    assert report["settings"]["max_new_tokens"] == 4 and report["settings"]["max_input_length"] == 64
    assert "the training run" in report["settings"]["lengths_from"]
    ours = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    runs = [json.loads(line) for line in (results[name].parent / "predictions.jsonl").read_text().splitlines()]
    assert [(r["source"], r["prompt"], r["prediction"], r["reference"]) for r in ours] == \
        [(r["source"], r["prompt"], r["prediction"], r["reference"]) for r in runs]
    assert report["samples"] == len(runs) == 8 and report["records"] == 8
    assert report["metrics"] == score_texts([r["prediction"] for r in runs], [r["reference"] for r in runs])
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_eval_scores_match_training_on_predictions_that_score(results, data_dir, tmp_path):
    """A data file (alpaca format) whose answers are the model's own replies for half the prompts: those score 100,
    the rest what they score; the report's numbers are training's functions on the predictions written."""
    prompts = [json.loads(line)["conversations"][-2]["content"]
               for line in (data_dir / "train.jsonl").read_text().splitlines()[:8]]
    asked = tmp_path / "prompts.jsonl"
    asked.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    replies = tmp_path / "replies.jsonl"
    ok(run_cli("infer", results["ptuning"], "--file", asked, "-o", replies, *GENERATE))
    records = []
    for index, row in enumerate(json.loads(line) for line in replies.read_text().splitlines()):
        own = index % 2 == 0 and row["reply"].strip()
        records.append({"instruction": row["prompt"], "output": row["reply"] if own else "pear fig"})
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records, indent=1))
    report = json.loads(ok(run_cli("eval", results["ptuning"], data, "-o", tmp_path / "eval", "--json",
                                   *GENERATE)).stdout)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert report["format"] == "alpaca" and len(rows) == 8
    assert report["metrics"] == score_texts([r["prediction"] for r in rows], [r["reference"] for r in rows])
    own = [row for row, record in zip(rows, records) if record["output"] != "pear fig"]
    assert own and all(row["scores"]["rouge-1"] == 100.0 for row in own)
    assert 0 < report["metrics"]["rouge-1"] < 100


def test_compare_a_base_model_with_its_fine_tune(models, results, data_dir, tmp_path):
    out = ok(run_cli("eval", models["native"], results["sft"], "--data", data_dir / "dev.jsonl", "-o", tmp_path, "-q"))
    comparison = json.loads((tmp_path / "compare.json").read_text())
    labels = [model["label"] for model in comparison["models"]]
    assert labels == ["native", "out/final"] and set(comparison["metrics"]) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
    for label, model in zip(labels, comparison["models"]):
        folder = tmp_path / label.replace("/", "_")
        assert json.loads((folder / "report.json").read_text())["metrics"] == model["metrics"]
        assert len((folder / "predictions.jsonl").read_text().splitlines()) == 8
        assert all(comparison["metrics"][m][label] == model["metrics"][m] for m in comparison["metrics"])
    header = next(line for line in out.stdout.splitlines() if line.strip().startswith("metric"))
    assert header.split() == ["metric", "native", "out/final", "out/final", "-", "native"]
    rouge = next(line for line in out.stdout.splitlines() if line.strip().startswith("rouge-1")).split()
    a, b = comparison["metrics"]["rouge-1"]["native"], comparison["metrics"]["rouge-1"]["out/final"]
    assert rouge == ["rouge-1", f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"]


def test_eval_on_emulated_mlu_under_the_guard_predicts_what_the_cpu_does(results, data_dir, tmp_path):
    args = ("eval", results["lora"], data_dir / "dev.jsonl", "--json", "-q", "--dtype", "fp32")
    cpu = json.loads(ok(run_cli(*args, "-o", tmp_path / "cpu")).stdout)
    mlu = json.loads(ok(run_cli(*args, "-o", tmp_path / "mlu", "--backend", "mlu", env={"GLMPORT_EMULATE": "mlu"})).stdout)
    assert mlu["backend"] == "mlu" and mlu["guard_64bit"]["mode"] == "error" and mlu["guard_64bit"]["leaks"] == []
    assert mlu["guard_64bit"]["ops_checked"] > 100 and cpu["guard_64bit"]["ops_checked"] == 0
    assert (tmp_path / "mlu" / "predictions.jsonl").read_text() == (tmp_path / "cpu" / "predictions.jsonl").read_text()
    assert mlu["metrics"] == cpu["metrics"]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_chat_through_a_pipe_gives_the_replies_of_infer(backend, results, tmp_path):
    """A scripted conversation on stdin (not a terminal): two turns, /reset, the first question again, then the
    end of input. Each reply must be infer's for the same conversation, and nothing else is printed."""
    flags, env = BACKENDS[backend]
    final, second = results["lora"], "How many words are there in: a b"
    first_reply = _infer_json(final, "--prompt", PROMPT, *flags, env=env)["reply"]
    conversation = tmp_path / "conversation.jsonl"
    conversation.write_text(json.dumps({"messages": [{"role": "user", "content": PROMPT},
                                                     {"role": "assistant", "content": first_reply},
                                                     {"role": "user", "content": second}]}) + "\n")
    second_reply = json.loads(ok(run_cli("infer", final, "--file", conversation, *GENERATE, *flags, env=env))
                              .stdout)["reply"]
    done = subprocess.run([sys.executable, "-m", "glmport", "chat", str(final), *GENERATE, *flags],
                          input=f"{PROMPT}\n{second}\n/reset\n{PROMPT}\n", capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{first_reply}\n{second_reply}\n{first_reply}\n"
    assert "you>" not in done.stderr and "/reset" not in done.stderr  # no prompts or banner in a pipe


def test_an_adapter_whose_base_moved_needs_base_and_works_with_it(models, results, tmp_path):
    moved, gone = tmp_path / "result", tmp_path / "gone"
    shutil.copytree(results["lora"], moved)
    adapter_config = json.loads((moved / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(gone)
    (moved / "adapter_config.json").write_text(json.dumps(adapter_config))
    result = json.loads((moved / "glmport_result.json").read_text())
    result["base_model"] = str(gone)
    (moved / "glmport_result.json").write_text(json.dumps(result))

    failed = ok(run_cli("infer", moved, "--prompt", PROMPT, *GENERATE), exit_code=2)
    assert f"{moved / 'adapter_config.json'}: base_model_name_or_path: its base model {gone} is not there" \
        in failed.stderr and "pass --base DIR" in failed.stderr
    expected = _infer_json(results["lora"], "--prompt", PROMPT)["reply"]
    assert _infer_json(moved, "--prompt", PROMPT, "--base", models["remote"])["reply"] == expected
    (moved / "glmport_result.json").unlink()  # a bare peft adapter, as upstream's finetune_hf.py leaves one
    assert _infer_json(moved, "--prompt", PROMPT, "--base", models["remote"])["reply"] == expected

    shutil.copy(results["lora"] / "glmport_result.json", moved)
    wrong = ok(run_cli("infer", moved, "--prompt", PROMPT, "--base", models["remote-glm4"], *GENERATE), exit_code=2)
    assert "the result was trained on a chatglm3 model" in wrong.stderr
    full = ok(run_cli("infer", results["sft"], "--prompt", PROMPT, "--base", models["native"], *GENERATE), exit_code=2)
    assert "holds a full model" in full.stderr and "needs no base model" in full.stderr
