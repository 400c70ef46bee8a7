"""Tool calls in the families' formats (glmport.toolcalls): reading the model's calls, writing calls and tools."""

from __future__ import annotations

import json

import pytest

from glmport.data.formats import read_record
from glmport.data.records import TOOLS_PREAMBLE, Message
from glmport.errors import DataError
from glmport.toolcalls import (
    ToolCall,
    family_message,
    family_tools,
    format_tool_call,
    observation_message,
    parse_tool_call,
    python_tool_call,
    read_tools_file,
    tools_message,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_a_plain_answer_is_no_call(family):
    assert parse_tool_call(family, "\nIt is sunny.") is None
    assert parse_tool_call(family, "It is sunny, no newline at all") is None
    assert parse_tool_call(family, "  \nIt is sunny.\nSecond line") is None  # metadata of white space only


def test_chatglm3_call_in_a_fenced_python_block():
    call = parse_tool_call("chatglm3", "get_weather\n```python\ntool_call(city='Paris', days=[1, 2], exact=True)\n```")
    assert call == ToolCall("get_weather", {"city": "Paris", "days": [1, 2], "exact": True},
                            "```python\ntool_call(city='Paris', days=[1, 2], exact=True)\n```")
    assert call.describe() == 'get_weather {"city": "Paris", "days": [1, 2], "exact": true}'
    assert call.to_openai("call_1") == {"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "days": [1, 2], "exact": true}'}}
    assert call.message() == Message("assistant", call.content, metadata="get_weather")


def test_glm4_call_as_json_and_the_other_syntax_too():
    call = parse_tool_call("glm4", 'get_weather\n{"city": "北京", "unit": null}')
    assert (call.name, call.arguments, call.error) == ("get_weather", {"city": "北京", "unit": None}, None)
    # glmport trains every format's calls as ChatGLM3's block: a GLM-4 model fine-tuned by glmport writes that
    assert parse_tool_call("glm4", "get_weather\n```python\ntool_call(city='x')\n```").arguments == {"city": "x"}
    assert parse_tool_call("chatglm3", 'get_weather\n{"city": "x"}').arguments == {"city": "x"}
    assert parse_tool_call("glm4", "get_weather\n{'city': 'x'}").arguments == {"city": "x"}  # Python dict literal


def test_the_last_assistant_turn_is_the_call_as_upstream_reads_it():
    text = "\nLet me look that up.<|assistant|>get_weather\n```python\ntool_call(city='Oslo')\n```"
    assert parse_tool_call("chatglm3", text).arguments == {"city": "Oslo"}


@pytest.mark.parametrize("content, error", [
    ("```python\ntool_call('Paris')\n```", "by name only"),
    ("```python\ntool_call(city=open('x'))\n```", "not a literal"),
    ("```python\ntool_call(city='x') + 1\n```", "not one tool_call"),
    ("```python\nprint(1)\n```", "neither"),
    ("```python\ntool_call(city=\n```", "not valid Python"),
    ("{\"city\": ", "not valid JSON"),
    ("[1, 2]", "neither"),
    ("import os\nos.remove('x')", "neither"),
])
def test_unreadable_arguments_are_reported_and_never_run(content, error):
    call = parse_tool_call("chatglm3", "get_weather\n" + content)
    assert call.name == "get_weather" and call.arguments is None and error in call.error
    assert call.content == content


def test_chatglm3_interpreter_code_is_a_call_without_arguments():
    call = parse_tool_call("chatglm3", "interpreter\n```python\nprint(2 + 2)\n```")
    assert call.name == "interpreter" and call.arguments is None and "```python" in call.content


def test_families_without_a_tool_format_make_no_calls():
    assert parse_tool_call("chatglm2", "get_weather\n{\"city\": \"x\"}") is None
    with pytest.raises(ValueError, match="chatglm2 family has no tool format"):
        format_tool_call("chatglm2", "get_weather", {})


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_a_written_call_reads_back(family):
    arguments = {"city": "Paris", "days": [1, 2], "options": {"metric": True, "note": None}}
    message = format_tool_call(family, "get_weather", arguments)
    assert message.role == "assistant" and message.metadata == "get_weather"
    assert parse_tool_call(family, message.metadata + "\n" + message.content).arguments == arguments
    assert format_tool_call(family, "get_weather", json.dumps(arguments)) == message  # OpenAI's JSON text
    assert message.content == (python_tool_call(arguments) if family == "chatglm3" else
                               json.dumps(arguments, ensure_ascii=False))


def test_bad_arguments_to_write_are_value_errors():
    with pytest.raises(ValueError, match="not valid JSON"):
        format_tool_call("glm4", "f", "{oops")
    with pytest.raises(ValueError, match="not a JSON object"):
        format_tool_call("glm4", "f", "[1]")
    with pytest.raises(ValueError, match="not a Python identifier"):
        format_tool_call("chatglm3", "f", {"not valid": 1})


def test_chatglm3_writes_calls_as_its_training_data_does():
    """The call a chat puts back into the history is the text training renders a tool message as."""
    record = {"tools": [WEATHER["function"]], "conversations": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2]},
         "observation": {"weather": "sunny"}},
        {"role": "assistant", "content": "Sunny."}]}
    messages = read_record("conversations", record)
    assert messages[0] == tools_message("chatglm3", [WEATHER])
    assert messages[2] == format_tool_call("chatglm3", "get_weather", {"city": "Paris", "days": [1, 2]})
    observation = observation_message({"weather": "sunny"})  # training marks it "loss": false; never learned
    assert (messages[3].role, messages[3].content) == (observation.role, observation.content)


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
@pytest.mark.parametrize("fmt", ["openai", "sharegpt", "conversations"])
def test_calls_and_tools_given_as_data_render_as_chat_writes_them(family, fmt):
    """Every data format's tool call and tool list, through the templates' entry (family_message), is the message
    chat and serve write (format_tool_call, tools_message), so training and inference prompts agree."""
    arguments = {"city": "Paris", "days": [1, 2]}
    record = {
        "openai": {"tools": [WEATHER], "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}],
             "loss": False},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]},
        "sharegpt": {"tools": json.dumps([WEATHER]), "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": arguments})},
            {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]},
        "conversations": {"tools": [WEATHER["function"]], "conversations": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "tool", "name": "get_weather", "parameters": arguments, "observation": "sunny"},
            {"role": "assistant", "content": "Sunny."}]},
    }[fmt]
    system, _, call, observation, _ = (family_message(family, m) for m in read_record(fmt, record))
    assert system == tools_message(family, [WEATHER])  # GLM-4: no ChatGLM3 preamble; ChatGLM3: bare functions
    assert (call.role, call.metadata, call.content) == (
        "assistant", "get_weather", format_tool_call(family, "get_weather", arguments).content)
    assert call.loss is (False if fmt == "openai" else None)  # the record's loss flag survives the rendering
    assert parse_tool_call(family, f"{call.metadata}\n{call.content}").arguments == arguments
    assert (observation.role, observation.content) == ("observation", "sunny")


def test_a_system_text_of_the_data_is_kept_and_plain_messages_pass_through():
    declared = family_message("glm4", Message("system", "Be brief.", tools=[WEATHER["function"]]))
    assert declared == Message("system", "Be brief.", tools=[WEATHER])
    plain = Message("assistant", "get_weather\nwritten by hand", metadata="get_weather")
    assert family_message("glm4", plain) is plain  # a GLM-4 record's own call text is trained as written


def test_tools_are_declared_the_family_way():
    bare = WEATHER["function"]
    assert family_tools("chatglm3", [WEATHER]) == [bare] == family_tools("chatglm3", [bare])
    assert family_tools("glm4", [bare]) == [WEATHER] == family_tools("glm4", [WEATHER])
    assert tools_message("chatglm3", [WEATHER]) == Message("system", TOOLS_PREAMBLE, tools=[bare])
    assert tools_message("chatglm3", [WEATHER], "Be brief.") == Message("system", "Be brief.", tools=[bare])
    assert tools_message("glm4", [WEATHER]) == Message("system", "", tools=[WEATHER])
    assert observation_message("plain text") == Message("observation", "plain text")
    assert observation_message({"t": "雨"}) == Message("observation", '{"t": "雨"}')


def test_tools_file(tmp_path):
    good = tmp_path / "tools.json"
    good.write_text(json.dumps({"tools": [WEATHER, {"name": "now"}]}))
    assert read_tools_file(good) == [WEATHER, {"name": "now"}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([WEATHER, {"function": {"description": "no name"}}, {"name": "x", "parameters": []}]))
    with pytest.raises(DataError) as info:
        read_tools_file(bad)
    text = str(info.value)
    assert "2 invalid tool(s)" in text and "tool 1" in text and "no function name" in text
    assert "tool 2 (x)" in text and "parameters is not an object" in text
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"name": }\n]')
    with pytest.raises(DataError, match="broken.json:2"):
        read_tools_file(broken)
    with pytest.raises(DataError, match="no such file"):
        read_tools_file(tmp_path / "missing.json")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="holds no tools"):
        read_tools_file(empty)
