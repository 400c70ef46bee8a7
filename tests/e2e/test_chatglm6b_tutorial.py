"""The ChatGLM-6B tuning tutorial (mymusise/ChatGLM-Tuning) end to end on a tiny ChatGLM-6B folder: its alpaca
data converted to ``{"context", "target"}`` records as the tutorial's cover_alpaca2jsonl.py does, ``glmport
train`` with LoRA on ``query_key_value`` (the tutorial's method) on cpu and on emulated mlu with the 64-bit
guard, and the result answering the tutorial's prompt through ``glmport infer``."""

from __future__ import annotations

import json
import math

import pytest
from e2e_cli import summary, write_config

from glmport.testing import ok, run_cli
from glmport.tiny.synthetic import make_records

pytestmark = pytest.mark.slow


def alpaca_records(count: int, seed: int) -> list[dict]:
    """The synthetic tasks as alpaca records: "Sort these words alphabetically" + input "b a" -> "a b"."""
    records = []
    for record in make_records(count, seed):
        turns = {message["role"]: message["content"] for message in record["conversations"]}
        instruction, _, words = turns["user"].partition(": ")
        records.append({"instruction": instruction, "input": words, "output": turns["assistant"]})
    return records


@pytest.fixture(scope="module")
def tutorial_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatglm-tuning")
    for split, count, seed in (("train", 32, 1), ("dev", 8, 2)):
        alpaca = folder / f"alpaca_{split}.json"  # a JSON array, like the tutorial's data/alpaca_data.json
        alpaca.write_text(json.dumps(alpaca_records(count, seed), ensure_ascii=False), encoding="utf-8")
        ok(run_cli("data", "convert", alpaca, folder / f"{split}.jsonl", "--to", "context-target"))
    return folder


@pytest.mark.parametrize("backend", ["cpu", "mlu"])
def test_the_tutorials_context_target_data_trains_a_chatglm6b_folder(backend, models, tutorial_data, tmp_path):
    records = [json.loads(line) for line in (tutorial_data / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 32 and all(set(record) == {"context", "target"} for record in records)
    assert records[0]["context"].startswith("Instruction: ") and records[0]["context"].endswith("\nAnswer: ")
    checked = json.loads(ok(run_cli("data", "check", tutorial_data / "train.jsonl", "--model",
                                    models["remote-chatglm"], "--json")).stdout)
    assert (checked["format"], checked["template"], checked["valid"]) == ("context-target", "chatglm", 32)

    config = write_config(tmp_path, "lora")
    env = {"GLMPORT_EMULATE": "mlu"} if backend == "mlu" else {}
    ok(run_cli("train", tutorial_data, models["remote-chatglm"], config, "--backend", backend, "-q", env=env,
               in_process=False))
    s = summary(tmp_path)
    assert (s["model_family"], s["method"], s["backend"], s["steps"]) == ("chatglm", "lora", backend, 4)
    assert s["data"]["train"]["samples"] == 32 and s["data"]["train"]["label_tokens"] > 32
    assert math.isfinite(s["first_loss"]) and math.isfinite(s["last_loss"]) and math.isfinite(s["eval"]["loss"])
    if backend == "mlu":
        assert s["guard_64bit"]["mode"] == "error" and s["guard_64bit"]["leaks"] == []
    final = tmp_path / "out" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["target_modules"] == ["query_key_value"]
    assert json.loads((final / "glmport_result.json").read_text())["template"] == "chatglm"

    prompt = records[0]["context"]
    out = ok(run_cli("infer", final, "--prompt", prompt, "--max-new-tokens", "4", "--json", "--backend", backend,
                     env=env, in_process=False))
    reply = json.loads(out.stdout.strip().splitlines()[-1])
    assert reply["backend"] == backend and isinstance(reply["reply"], str)
    assert reply["finish_reason"] in ("stop", "length") and " + adapter " in reply["model"]
