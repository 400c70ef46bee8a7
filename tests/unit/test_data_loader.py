"""Reading data files: JSON lines or arrays by content, locations in every error, skipping with a report."""

from __future__ import annotations

import json

import pytest

from glmport.data.loader import load_conversations, write_skip_report
from glmport.data.records import Message
from glmport.errors import DataError

GOOD = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def write_lines(path, *lines: str):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_line(answer: str = "a") -> str:
    return json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]})


def error_of(path, **kwargs) -> DataError:
    with pytest.raises(DataError) as caught:
        load_conversations(path, **kwargs)
    return caught.value


def test_json_lines_with_sources(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", good_line("one"), "", good_line("two"))
    result = load_conversations(path)
    assert result.format == "conversations" and result.path == path and result.skipped == []
    assert [c.source for c in result.conversations] == [f"{path}:1", f"{path}:3"]
    assert result.conversations[1].messages[1] == Message("assistant", "two")


def test_array_detected_from_content_not_suffix(tmp_path):
    path = tmp_path / "train.jsonl"  # an array, despite the suffix
    path.write_text('[\n  {"content": "a", "summary": "b"},\n\n  {"content": "c",\n   "summary": "d"}\n]\n')
    result = load_conversations(path)
    assert result.format == "advertisegen"
    assert [c.source for c in result.conversations] == [f"{path}[0] (line 2)", f"{path}[1] (line 4)"]


def test_json_lines_in_a_json_file(tmp_path):
    path = write_lines(tmp_path / "train.json", json.dumps({"context": "c", "target": "t"}))
    assert load_conversations(path).format == "context-target"


def test_invalid_json_on_line_3(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", good_line(), good_line(), '{"conversations": [}')
    error = error_of(path)
    assert str(error).startswith(f"{path}: 1 of 3 records are invalid")
    [problem] = error.problems
    assert problem.where == f"{path}:3"
    assert problem.what == "invalid JSON: Expecting value (column 20)"


def test_invalid_json_in_an_array_gives_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n {"content": "a", "summary": "b"},\n {"content": "c" "summary": "d"}\n]')
    [problem] = error_of(path).problems
    assert problem.where == f"{path}:3"
    assert problem.what == "invalid JSON: Expecting ',' delimiter (column 18)"


def test_every_problem_of_the_file_at_once(tmp_path):
    path = write_lines(
        tmp_path / "train.jsonl",
        json.dumps({"conversations": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}),
        json.dumps({"conversations": [{"role": "user", "content": "q"}]}),
        json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
        good_line(),
    )
    error = error_of(path)
    assert str(error).startswith(f"{path}: 4 of 5 records are invalid")
    assert [(p.where, p.what) for p in error.problems] == [
        (f"{path}:1", "conversations[0].content: expected a string, got a number (7)"),
        (f"{path}:2", "conversations[1].role: unknown role 'robot'"),
        (f"{path}:3", "no assistant message (roles here: user)"),
        (f"{path}:4", "conversations[1]: the assistant message is empty"),
    ]
    assert all(p.fix for p in error.problems)


def test_records_of_mixed_formats(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", good_line(), json.dumps({"instruction": "i", "output": "o"}), good_line(),
                       json.dumps({"question": "q"}))
    error = error_of(path)
    assert [(p.where, p.what) for p in error.problems] == [
        (f"{path}:2", "this record is in the alpaca format, the file's records are conversations"),
        (f"{path}:4", "keys 'question' match no known format"),
    ]


def test_explicit_format_checks_the_keys(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", good_line())
    [problem] = error_of(path, fmt="alpaca").problems
    assert problem.what == "this record is in the conversations format, the file's records are alpaca"
    assert "unknown data format 'csv'" in str(error_of(path, fmt="csv"))


def test_missing_file_names_the_path_and_the_key(tmp_path):
    path = tmp_path / "nope.jsonl"
    error = error_of(path, key="data_config.train_file")
    assert str(error).startswith("data file not found")
    [problem] = error.problems
    assert problem.where == "data_config.train_file" and problem.what == f"no such file: {path}"


@pytest.mark.parametrize(("text", "what"), [
    ("", "the file holds no records"),
    ("\n  \n", "the file holds no records"),
    ("[ ]", "the JSON array is empty"),
])
def test_empty_file(tmp_path, text, what):
    path = tmp_path / "train.jsonl"
    path.write_text(text)
    [problem] = error_of(path).problems
    assert problem.what == what


def test_single_pretty_printed_object_is_explained(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(GOOD, indent=2))
    assert error_of(path).problems[0].what == "the whole file is a single JSON object spread over several lines"


def test_unknown_format_everywhere(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", json.dumps({"prompt": "p", "response": "r"}))
    assert str(error_of(path)).startswith("cannot tell the data format")


def test_problem_list_is_capped(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", *["{bad"] * 25)
    error = error_of(path)
    assert len(error.problems) == 21
    assert error.problems[-1].what == "and 5 more invalid records"


def test_skip_invalid_keeps_every_skipped_record(tmp_path):
    bad_type = json.dumps({"conversations": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]})
    path = write_lines(tmp_path / "train.jsonl", good_line(), "{bad", bad_type, good_line())
    result = load_conversations(path, skip_invalid=True)
    assert [c.source for c in result.conversations] == [f"{path}:1", f"{path}:4"]
    assert [(s.source, s.raw_text) for s in result.skipped] == [(f"{path}:2", "{bad"), (f"{path}:3", bad_type)]

    report = write_skip_report(result, tmp_path / "out")
    assert report == tmp_path / "out" / "skipped_records.jsonl"
    rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"source": f"{path}:2", "reason": "invalid JSON: Expecting property name enclosed in double quotes (column 2)",
         "record": "{bad"},
        {"source": f"{path}:3", "reason": "conversations[0].content: expected a string, got a number (7)",
         "record": bad_type},
    ]
    assert [p.name for p in report.parent.iterdir()] == ["skipped_records.jsonl"]  # no temporary left behind


def test_skip_invalid_cannot_skip_everything(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", good_line(""), "{bad")
    error = error_of(path, skip_invalid=True)
    assert "2 of 2 records are invalid (all of them, so --skip-invalid cannot help)" in str(error)


def test_one_skip_report_for_several_files(tmp_path):
    first = load_conversations(write_lines(tmp_path / "train.jsonl", good_line(), "{bad"), skip_invalid=True)
    second = load_conversations(write_lines(tmp_path / "dev.jsonl", "[1]", good_line()), skip_invalid=True)
    report = write_skip_report([first, second], tmp_path)
    sources = [json.loads(line)["source"] for line in report.read_text(encoding="utf-8").splitlines()]
    assert sources == [f"{tmp_path / 'train.jsonl'}:2", f"{tmp_path / 'dev.jsonl'}:1"]


def test_one_line_array(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"content": "a", "summary": "b"}, {"content": "c", "summary": "d"}]\n')
    result = load_conversations(path)
    assert [c.source for c in result.conversations] == [f"{path}[0] (line 1)", f"{path}[1] (line 1)"]


def sharegpt_line(answer: str = "a") -> str:
    return json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]})


def openai_call_line() -> str:
    return json.dumps({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "a"},
    ]})


def plain_messages_line() -> str:
    return json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


def test_sharegpt_file(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", sharegpt_line("one"), sharegpt_line("two"))
    result = load_conversations(path)
    assert result.format == "sharegpt"
    assert [c.messages for c in result.conversations][1] == [Message("user", "q"), Message("assistant", "two")]


def test_plain_messages_go_with_the_openai_records_of_their_file(tmp_path):
    # Most records have no tool call and read the same as GLM-4 messages: the file is still OpenAI-style.
    path = write_lines(tmp_path / "train.jsonl", plain_messages_line(), plain_messages_line(), openai_call_line())
    result = load_conversations(path)
    assert result.format == "openai" and len(result.conversations) == 3
    assert load_conversations(write_lines(tmp_path / "plain.jsonl", plain_messages_line())).format == "messages"


def test_a_glm4_record_among_openai_records_names_its_line(tmp_path):
    glm4 = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"},
                                    {"role": "observation", "content": "r"}, {"role": "assistant", "content": "a"}]})
    path = write_lines(tmp_path / "train.jsonl", openai_call_line(), plain_messages_line(), glm4, openai_call_line())
    [problem] = error_of(path).problems
    assert (problem.where, problem.what) == (f"{path}:3", "this record is in the messages format, the file's records are openai")


def test_a_record_mixing_sharegpt_and_chatglm3_messages_names_its_line(tmp_path):
    mixed = json.dumps({"conversations": [{"role": "user", "content": "q"}, {"from": "gpt", "value": "a"}]})
    path = write_lines(tmp_path / "train.jsonl", good_line(), mixed, good_line())
    [problem] = error_of(path).problems
    assert problem.where == f"{path}:2"
    assert problem.what.startswith("conversations[1]: a ShareGPT message (from/value) among ChatGLM3 messages")
    path = write_lines(tmp_path / "sharegpt.jsonl", sharegpt_line(), mixed, sharegpt_line())
    [problem] = error_of(path).problems
    assert problem.where == f"{path}:2"
    assert problem.what.startswith("conversations[0]: a ChatGLM3 message (role/content) among ShareGPT messages")
    # A record of the other format as a whole is named as such.
    path = write_lines(tmp_path / "two.jsonl", good_line(), sharegpt_line(), good_line())
    assert error_of(path).problems[0].what == "this record is in the sharegpt format, the file's records are conversations"


def test_skip_invalid_skips_bad_sharegpt_and_openai_records(tmp_path):
    bad_call = json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f("},
                                             {"from": "gpt", "value": "a"}]})
    path = write_lines(tmp_path / "sharegpt.jsonl", sharegpt_line(), bad_call, sharegpt_line())
    result = load_conversations(path, skip_invalid=True)
    assert [s.source for s in result.skipped] == [f"{path}:2"]
    assert result.skipped[0].reason.startswith("conversations[1].value: the function call is not valid JSON")

    bad_tool = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                                        {"role": "assistant", "content": "a"}]})
    path = write_lines(tmp_path / "openai.jsonl", openai_call_line(), bad_tool)
    result = load_conversations(path, skip_invalid=True)
    assert result.format == "openai" and len(result.conversations) == 1
    assert [(s.source, s.reason) for s in result.skipped] == [(f"{path}:2", "messages[1]: a tool result before any tool call")]


def test_explicit_format_for_shared_keys(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", openai_call_line())
    assert error_of(path, fmt="messages").problems[0].what == (
        "this record is in the openai format, the file's records are messages")
    assert load_conversations(write_lines(tmp_path / "plain.jsonl", plain_messages_line()), fmt="openai").format == "openai"
