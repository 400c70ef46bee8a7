"""``glmport data check`` and ``glmport data convert`` through the command line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmport.data.loader import load_conversations
from glmport.testing import ok, run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
CHAT = FIXTURES / "chat.jsonl"  # three conversations: single turn, multi-turn with system, tools + tool call

# Lengths of CHAT's samples by the ChatGLM3 layout at one token per character (hand-counted).
TOOLS_SYSTEM_TEXT = ("Answer the following questions as best as you can. You have access to the following tools:\n"
                     '[\n    {\n        "name": "f",\n        "parameters": {\n            "x": "int"\n        }\n    }\n]')
SINGLE = 2 + (2 + 2) + (2 + 2) + 1  # [gMASK] sop, <|user|> \n hi, <|assistant|> \n ok, </s>
MULTI = 2 + (2 + 8) + 4 * 4 + 1
TOOLS = 2 + (2 + len(TOOLS_SYSTEM_TEXT)) + (2 + 5) + (1 + 2 + 28) + (2 + 8) + (2 + 6) + 1


@pytest.fixture
def glmport():
    """``glmport(*argv) -> (exit status, stdout, stderr)``, run in this process."""

    def run(*argv) -> tuple[int, str, str]:
        result = run_cli(*argv)
        return result.exit_code, result.stdout, result.stderr

    return run


def test_check_prints_counts_and_percentiles(glmport):
    code, out, _ = glmport("data", "check", CHAT)
    assert code == 0
    assert f"{CHAT}: 3 records in the conversations format, 3 valid; template chatglm3" in out
    assert "character-level estimates" in out
    assert "Messages: system 2, user 4, assistant 5, observation 1" in out
    assert "Conversations: 1 multi-turn, 1 with tools" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["P50", "P90", "P99", "MAX"])
    assert [int(v) for v in lines[header + 2].split()] == [MULTI, TOOLS, TOOLS, TOOLS]
    assert "Trimmed by glmport: 0 of 3 samples" in out
    assert "Eval samples: 5" in out


def test_check_json_is_exact(glmport):
    code, out, _ = glmport("data", "check", CHAT, "--json")
    assert code == 0
    assert json.loads(out) == {
        "file": str(CHAT),
        "format": "conversations",
        "template": "chatglm3",
        "tokenizer": "estimate: one token per character (no --model)",
        "records": 3,
        "valid": 3,
        "messages": {"system": 2, "user": 4, "assistant": 5, "observation": 1},
        "multi_turn": 1,
        "with_tools": 1,
        "max_input_length": 256,
        "max_output_length": 512,
        "budget": 769,
        "train_tokens": {"p50": MULTI, "p90": TOOLS, "p99": TOOLS, "max": TOOLS},
        "trimmed": {"samples": 0, "tokens": 0, "messages": 0},
        "upstream_truncation_loses_all_labels": 0,
        "eval_samples": 5,  # one per reply, the tool call included
        "skipped": [],
    }


def test_check_counts_trimming_and_what_upstream_would_lose(glmport, tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text("".join(CHAT.read_text().splitlines(keepends=True)[:2]))
    code, out, _ = glmport("data", "check", path, "--max-input-length", "8", "--max-output-length", "4", "--json")
    report = json.loads(out)
    # The multi-turn sample (29 tokens, budget 13): the first turn goes, "go" goes, "be brief" keeps "ef".
    assert report["trimmed"] == {"samples": 1, "tokens": MULTI - 13, "messages": 2}
    # Upstream keeps its first 13 tokens: [gMASK] sop, the system message, <|user|>: no label left.
    assert report["upstream_truncation_loses_all_labels"] == 1


def test_check_show_prints_the_token_table(glmport):
    code, out, _ = glmport("data", "check", CHAT, "--show", "1")
    assert code == 0
    table = out[out.index("Sample 1: 11 tokens"):]
    lines = [line.split() for line in table.splitlines()[3:14]]
    assert lines == [
        ["64790", "-100", "'[gMASK]'"], ["64792", "-100", "'sop'"], ["64795", "-100", "'<|user|>'"],
        ["355", "-100", "'\\n'"], ["276", "-100", "'h'"], ["277", "-100", "'i'"],
        ["64796", "-100", "'<|assistant|>'"], ["355", "355", "'\\n'"], ["283", "283", "'o'"], ["279", "279", "'k'"],
        ["2", "2", "'</s>'"],
    ]
    assert "Sample 2" not in out


def test_check_impossible_budget_is_an_error_or_skipped(glmport):
    code, _, err = glmport("data", "check", CHAT, "--max-input-length", "8", "--max-output-length", "4")
    assert code == 2
    assert f"glmport: error: {CHAT}: 1 of 3 records are invalid" in err
    assert f"{CHAT}:3: even with the history dropped" in err

    code, out, _ = glmport("data", "check", CHAT, "--max-input-length", "8", "--max-output-length", "4",
                           "--skip-invalid", "--json")
    report = json.loads(out)
    assert code == 0 and (report["records"], report["valid"]) == (3, 2)
    assert [s["source"] for s in report["skipped"]] == [f"{CHAT}:3"]


def test_check_invalid_record_exits_2_with_its_line(glmport, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(CHAT.read_text() + '{"conversations": [{"role": "user", "content": 1}]}\n')
    code, _, err = glmport("data", "check", path)
    assert code == 2
    assert f"{path}:4: conversations[0].content: expected a string, got a number (1)" in err


def test_check_with_a_model_folder_detects_its_template(glmport, tmp_path):
    from glmport.tiny.tokenizer import GLM4, save_fast_tokenizer

    save_fast_tokenizer(tmp_path / "model", GLM4)
    code, out, _ = glmport("data", "check", CHAT, "--model", tmp_path / "model", "--combine", "--json")
    report = json.loads(out)
    assert code == 0 and (report["template"], report["tokenizer"]) == ("glm4", str(tmp_path / "model"))
    assert report["eval_samples"] == 3  # combine: the last reply of each conversation
    # GLM-4 closes with <|user|> instead of </s>: the same lengths except the tools system message.
    assert report["train_tokens"]["p50"] == MULTI


def test_check_missing_file_and_bad_model(glmport, tmp_path):
    code, _, err = glmport("data", "check", tmp_path / "none.jsonl")
    assert code == 2 and "data file not found" in err
    code, _, err = glmport("data", "check", CHAT, "--model", tmp_path / "nowhere")
    assert code == 2 and f"--model {tmp_path / 'nowhere'}: no such folder" in err
    code, _, err = glmport("data", "check", CHAT, "--model", tmp_path)
    assert code == 2 and f"cannot load a tokenizer from {tmp_path}" in err


@pytest.mark.parametrize("source", [CHAT, FIXTURES / "alpaca.json"])
def test_convert_round_trips(glmport, tmp_path, source):
    target = tmp_path / "out" / "converted.jsonl"
    code, out, _ = glmport("data", "convert", source, target)
    assert code == 0 and out.startswith("wrote ") and "-> conversations) to" in out
    before, after = load_conversations(source), load_conversations(target)
    assert after.format == "conversations"
    assert [c.messages for c in after.conversations] == [c.messages for c in before.conversations]
    assert [p.name for p in target.parent.iterdir()] == ["converted.jsonl"]  # no temporary left behind


def test_convert_refuses_to_overwrite_its_input(glmport, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(CHAT.read_text())
    code, _, err = glmport("data", "convert", path, tmp_path / "." / "train.jsonl")
    assert code == 2 and "refusing to overwrite the input file" in err
    assert path.read_text() == CHAT.read_text()


def test_the_data_command_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys, glmport.cli.data, glmport.data.loader, glmport.data.templates, glmport.data.stats;"
            "print(','.join(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# Records in the peers' formats, written here: ShareGPT (LLaMA-Factory) and OpenAI-style tool_calls.
WEATHER = {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}], "system": "be brief"},
    {"conversations": [{"from": "human", "value": "Paris?"},
                       {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
                       {"from": "observation", "value": "21"}, {"from": "gpt", "value": "21 degrees"}],
     "tools": json.dumps([WEATHER])},
]
OPENAI = [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]},
    {"messages": [{"role": "user", "content": "Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "21"},
                  {"role": "assistant", "content": "21 degrees"}],
     "tools": [{"type": "function", "function": WEATHER}]},
]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize(("fmt", "records"), [("sharegpt", SHAREGPT), ("openai", OPENAI)])
def test_convert_peer_formats_round_trips_with_their_tool_calls(tmp_path, fmt, records):
    source, target = _jsonl(tmp_path / "in.jsonl", records), tmp_path / "out.jsonl"
    result = ok(run_cli("data", "convert", source, target))
    assert f"wrote 2 conversations ({fmt} -> conversations) to {target}" in result.stdout
    before, after = load_conversations(source), load_conversations(target)
    assert (before.format, after.format) == (fmt, "conversations")
    assert [c.messages for c in after.conversations] == [c.messages for c in before.conversations]
    tool_conversation = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()][1]
    assert {"role": "assistant", "content": "```python\ntool_call(city='Paris')\n```", "metadata": "weather"} in (
        tool_conversation["conversations"])


@pytest.mark.parametrize(("fmt", "records"), [("sharegpt", SHAREGPT), ("openai", OPENAI)])
def test_check_peer_formats(tmp_path, fmt, records):
    path = _jsonl(tmp_path / "train.jsonl", records)
    report = json.loads(ok(run_cli("data", "check", path, "--json")).stdout)
    assert (report["format"], report["records"], report["valid"]) == (fmt, 2, 2)
    assert report["messages"] == {"system": 2, "user": 2, "assistant": 3, "observation": 1}
    assert report["with_tools"] == 1


def test_check_peer_format_errors_and_skip_invalid(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": "{city: Paris}"}}]}]}
    path = _jsonl(tmp_path / "train.jsonl", [*OPENAI, bad])
    result = ok(run_cli("data", "check", path), 2)
    assert f"{path}:3: messages[1].tool_calls[0].function.arguments: not valid JSON" in result.stderr
    report = json.loads(ok(run_cli("data", "check", path, "--skip-invalid", "--json")).stdout)
    assert (report["valid"], [s["source"] for s in report["skipped"]]) == (2, [f"{path}:3"])
