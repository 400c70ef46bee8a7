"""``glmport infer``, ``chat`` and ``eval`` on the generations before role tokens: ChatGLM2-6B (``[Round N]`` prompts)
and ChatGLM-6B (2-D positions, prefix-LM mask), tiny remote-code folders of each. Their replies are plain text
(no metadata line, no tool format), and their stop tokens and prompts come from their templates. And on a native
GLM-4-0414 folder (``Glm4ForCausalLM``, GLM-4's tokenizer with its chat template)."""

from __future__ import annotations

import io
import json
import sys

import pytest

from glmport.testing import ok, run_cli
from glmport.tiny.synthetic import make_records, write_jsonl
from glmport.train.metrics import score_texts

FAMILIES = ("chatglm2", "chatglm")
BUILD = {"chatglm2": ["tiny-remote", "--family", "chatglm2"], "chatglm": ["tiny-remote", "--family", "chatglm"],
         "native-glm4": ["tiny-native", "--arch", "glm4"]}
GENERATE = ["--max-new-tokens", "6", "-q"]
MLU = {"GLMPORT_EMULATE": "mlu"}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    for name, args in BUILD.items():
        ok(run_cli("init-model", args[0], root / name, *args[1:]))
    return {name: root / name for name in BUILD}


@pytest.mark.parametrize("family", [*FAMILIES, "native-glm4"])
def test_streamed_batched_and_on_emulated_mlu(family, family_models, tmp_path):
    model = family_models[family]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"hello"\n{"prompt": "Reverse the order of these words: a bb ccc", "history": [["hi", "yo"]]}\n'
                       '{"messages": [{"role": "user", "content": "Sort these words alphabetically: b a"}]}\n')
    streamed = ok(run_cli("infer", model, "--prompt", "hello", *GENERATE)).stdout
    complete = json.loads(ok(run_cli("infer", model, "--prompt", "hello", "--json", *GENERATE)).stdout)
    assert streamed == complete["reply"] + "\n" and complete["tool_call"] is None
    assert ("native glm4 model" if family == "native-glm4" else f"remote {family} model") in complete["model"]
    single = ok(run_cli("infer", model, "--file", prompts, "--batch-size", "1", *GENERATE)).stdout
    assert ok(run_cli("infer", model, "--file", prompts, "--batch-size", "3", *GENERATE)).stdout == single
    assert json.loads(single.splitlines()[0])["reply"] == complete["reply"]
    on_mlu = ok(run_cli("infer", model, "--file", prompts, "--batch-size", "3", "--backend", "mlu", "--dtype", "fp32",
                        *GENERATE, env=MLU)).stdout
    assert on_mlu == single
    guarded = json.loads(ok(run_cli("infer", model, "--prompt", "hello", "--json", "--backend", "mlu", *GENERATE,
                                    env=MLU)).stdout)
    assert guarded["guard_64bit"]["mode"] == "error" and guarded["guard_64bit"]["leaks"] == []
    assert guarded["guard_64bit"]["ops_checked"] > 100


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_and_chat(family, family_models, tmp_path, monkeypatch):
    model = family_models[family]
    data = tmp_path / "dev.jsonl"
    write_jsonl(data, make_records(6, seed=3))
    report = json.loads(ok(run_cli("eval", model, data, "-o", tmp_path / "eval", "--json", *GENERATE)).stdout)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert report["samples"] == len(rows) == 6
    assert report["metrics"] == score_texts([r["prediction"] for r in rows], [r["reference"] for r in rows])

    first = json.loads(ok(run_cli("infer", model, "--prompt", "hello", "--json", *GENERATE)).stdout)["reply"]
    follow_up = tmp_path / "follow-up.jsonl"
    follow_up.write_text(json.dumps({"prompt": "and again", "history": [["hello", first]]}) + "\n")
    second = json.loads(ok(run_cli("infer", model, "--file", follow_up, *GENERATE)).stdout)["reply"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand again\n"))
    assert ok(run_cli("chat", model, *GENERATE)).stdout == f"{first}\n{second}\n"

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "get_weather", "parameters": {}}]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    refused = ok(run_cli("chat", model, "--tools", tools, *GENERATE), exit_code=2)
    assert f"the {family} family has no tool format" in refused.stderr
