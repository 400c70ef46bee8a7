"""The ChatGLM-6B tuning tutorial's data format (mymusise/ChatGLM-Tuning ``{"context", "target"}`` records):
``glmport data convert --to context-target`` (alpaca as the tutorial's cover_alpaca2jsonl.py converts it,
any other format as ChatGLM-6B's own prompt), detection, and ``glmport data check`` with the chatglm template."""

from __future__ import annotations

import json

from glmport.data.loader import load_conversations
from glmport.data.templates import get_template
from glmport.testing import ok, run_cli
from glmport.tiny.tokenizer import CHATGLM, build_fast_tokenizer


def write_lines(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_alpaca_converts_as_the_tutorial_does(tmp_path):
    source = write_lines(tmp_path / "alpaca.jsonl", [
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
        {"instruction": "Translate", "input": "hello", "output": "你好"},
    ])
    result = ok(run_cli("data", "convert", source, tmp_path / "out.jsonl", "--to", "context-target"))
    assert "wrote 2 context/target records (alpaca -> context-target)" in result.stdout
    assert read_lines(tmp_path / "out.jsonl") == [
        {"context": "Instruction: Give three tips for staying healthy.\nAnswer: ", "target": "1. Eat well."},
        {"context": "Instruction: Translate\nInput: hello\nAnswer: ", "target": "你好"},
    ]
    assert load_conversations(tmp_path / "out.jsonl").format == "context-target"


def test_conversations_convert_to_chatglm6b_prompts_that_train_the_same(tmp_path):
    records = [
        {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
                           {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                           {"role": "assistant", "content": "a2"}]},
        {"conversations": [{"role": "user", "content": "only"}, {"role": "assistant", "content": "one"}]},
    ]
    source = write_lines(tmp_path / "conv.jsonl", records)
    ok(run_cli("data", "convert", source, tmp_path / "ct.jsonl", "--to", "context-target"))
    converted = read_lines(tmp_path / "ct.jsonl")
    assert converted == [
        {"context": "Be brief.\n[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答：", "target": "a2"},
        {"context": "only", "target": "one"},
    ]
    template = get_template("chatglm", build_fast_tokenizer(CHATGLM, "问答"))
    originals = load_conversations(source).conversations
    for original, again in zip(originals, load_conversations(tmp_path / "ct.jsonl").conversations):
        assert template.train_sample(again, 256, 256) == template.train_sample(original, 256, 256)


def test_what_one_context_and_target_cannot_hold_is_listed(tmp_path):
    source = write_lines(tmp_path / "alpaca.jsonl", [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "", "output": "d", "history": [["q", "a"]]},
        {"instruction": "e", "input": "", "output": "f", "system": "s"},
    ])
    result = ok(run_cli("data", "convert", source, tmp_path / "out.jsonl", "--to", "context-target"), exit_code=2)
    assert "2 of 3 records are invalid" in result.stderr
    assert f"{source}:2" in result.stderr and "has history" in result.stderr and f"{source}:3" in result.stderr
    assert "--to conversations" in result.stderr and not (tmp_path / "out.jsonl").exists()
    tools = write_lines(tmp_path / "tools.jsonl", [{"conversations": [
        {"role": "user", "content": "weather?"},
        {"role": "tool", "name": "weather", "parameters": {"city": "Paris"}, "observation": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}])
    result = ok(run_cli("data", "convert", tools, tmp_path / "t.jsonl", "--to", "context-target"), exit_code=2)
    assert "is a tool call; ChatGLM-6B has no tool" in result.stderr


def test_data_check_reads_context_target_with_the_chatglm_template(tmp_path):
    source = write_lines(tmp_path / "ct.jsonl", [{"context": "Instruction: sort b a\nAnswer: ", "target": "a b"}])
    result = ok(run_cli("data", "check", source, "--template", "chatglm", "--show", "1", "--json"))
    report = json.loads(result.stdout)
    assert (report["format"], report["template"], report["valid"]) == ("context-target", "chatglm", 1)
