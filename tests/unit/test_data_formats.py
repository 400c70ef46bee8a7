"""Record formats: each one read into messages, bad records named by field, and the conversations writer."""

from __future__ import annotations

import pytest

from glmport.data.formats import RecordError, detect_format, read_record
from glmport.data.records import TOOLS_PREAMBLE, Conversation, Message, to_conversations_record


def test_conversations_plain():
    record = {"conversations": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok", "loss": False},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "sure"},
    ]}
    assert read_record("conversations", record) == [
        Message("system", "be brief"),
        Message("user", "hi"),
        Message("assistant", "ok", loss=False),
        Message("user", "again"),
        Message("assistant", "sure"),
    ]


def test_conversations_loss_on_user_is_ignored_as_the_readme_says():
    record = {"conversations": [{"role": "user", "content": "q", "loss": True}, {"role": "assistant", "content": "a"}]}
    assert read_record("conversations", record)[0] == Message("user", "q")


def test_conversations_tools_and_tool_role():
    tools = [{"name": "weather", "parameters": {"city": "string"}}]
    record = {
        "tools": tools,
        "conversations": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "tool", "name": "weather", "parameters": {"city": "Paris", "days": 2},
             "observation": {"temp": 21, "sky": "晴"}, "loss": False},
            {"role": "assistant", "content": "21 degrees"},
        ],
    }
    assert read_record("conversations", record) == [
        Message("system", TOOLS_PREAMBLE, tools=tools),
        Message("user", "weather in Paris?"),
        Message("assistant", "```python\ntool_call(city='Paris', days=2)\n```", metadata="weather", loss=False),
        Message("observation", '{"temp": 21, "sky": "晴"}', loss=False),
        Message("assistant", "21 degrees"),
    ]


def test_tool_observation_string_is_kept_verbatim():
    record = {"conversations": [
        {"role": "user", "content": "q"},
        {"role": "tool", "name": "f", "parameters": {}, "observation": "plain text"},
        {"role": "assistant", "content": "a"},
    ]}
    messages = read_record("conversations", record)
    assert messages[1] == Message("assistant", "```python\ntool_call()\n```", metadata="f")
    assert messages[2] == Message("observation", "plain text", loss=False)


def test_messages_glm4_tools_on_system_drop_null_properties():
    function = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}, "b": None}}}
    record = {"messages": [
        {"role": "system", "content": "", "tools": [{"type": "function", "function": function}]},
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": '{"name": "f", "arguments": {"a": "x"}}'},
        {"role": "observation", "content": "done"},
        {"role": "assistant", "content": "f said done"},
    ]}
    messages = read_record("messages", record)
    assert messages[0].tools == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}]
    assert function["parameters"]["properties"]["b"] is None  # the caller's record is not modified
    assert messages[2] == Message("assistant", '{"name": "f", "arguments": {"a": "x"}}')
    assert messages[3] == Message("observation", "done")


def test_advertisegen_context_target_and_alpaca():
    assert read_record("advertisegen", {"content": "类型#裙", "summary": "<UNK> BRAND"}) == [
        Message("user", "类型#裙"), Message("assistant", "<UNK> BRAND")]
    assert read_record("context-target", {"context": "Input: x\nAnswer: ", "target": "y"}) == [
        Message("user", "Input: x\nAnswer: "), Message("assistant", "y")]
    assert read_record("alpaca", {"instruction": "do", "input": "", "output": "done"}) == [
        Message("user", "do"), Message("assistant", "done")]
    full = {"system": "s", "history": [["q1", "a1"]], "instruction": "do", "input": "this", "output": "done"}
    assert read_record("alpaca", full) == [
        Message("system", "s"), Message("user", "q1"), Message("assistant", "a1"),
        Message("user", "do\nthis"), Message("assistant", "done")]


@pytest.mark.parametrize(("record", "fmt"), [
    ({"conversations": []}, "conversations"),
    ({"messages": []}, "messages"),
    ({"instruction": "", "input": "", "output": ""}, "alpaca"),
    ({"content": "", "summary": ""}, "advertisegen"),
    ({"context": "", "target": ""}, "context-target"),
    ({"prompt": "", "response": ""}, None),
])
def test_detection_by_keys(record, fmt):
    assert detect_format(record) == fmt


@pytest.mark.parametrize(("fmt", "record", "what"), [
    ("conversations", {"conversations": [{"role": "user", "content": 42}]},
     "conversations[0].content: expected a string, got a number (42)"),
    ("conversations", {"conversations": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     "conversations[1].role: unknown role 'bot'"),
    ("conversations", {"conversations": [{"role": "user"}]}, "conversations[0]: no 'content' key"),
    ("conversations", {"conversations": {"role": "user"}}, "conversations: expected an array, got an object"),
    ("conversations", {"conversations": [{"role": "user", "content": "q"}]},
     "no assistant message (roles here: user)"),
    ("conversations", {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "conversations[1]: the assistant message is empty"),
    ("conversations", {"conversations": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a", "loss": "no"}]},
     "conversations[1].loss: expected true or false, got a string"),
    ("conversations", {"conversations": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a", "loss": False}]},
     'every assistant message has "loss": false'),
    ("conversations", {"conversations": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                                         {"role": "assistant", "content": "a"}]},
     "conversations[1]: the system message comes after a user message"),
    ("conversations", {"tools": [], "conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}]},
     "conversations[0]: a second system message (the record's `tools` add one)"),
    ("conversations", {"conversations": [{"role": "user", "content": "q"},
                                         {"role": "tool", "name": "f", "parameters": {"a-b": 1}, "observation": 1},
                                         {"role": "assistant", "content": "a"}]},
     "conversations[1].parameters: parameter name 'a-b' is not a Python identifier"),
    ("conversations", {"conversations": [{"role": "user", "content": "q"},
                                         {"role": "tool", "name": "f", "parameters": {}}]},
     "conversations[1]: a tool message needs an 'observation' key"),
    ("messages", {"messages": [{"role": "user", "content": "q", "tools": []}, {"role": "assistant", "content": "a"}]},
     "messages[0].tools: tools on a user message"),
    ("messages", {"messages": [{"role": "tool", "content": "q"}]}, "messages[0].role: unknown role 'tool'"),
    ("alpaca", {"instruction": "q", "output": 3}, "output: expected a string, got a number (3)"),
    ("alpaca", {"instruction": "q", "output": "a", "history": [["only one"]]},
     'history[0]: expected [question, answer] (two strings), got ["only one"]'),
    ("advertisegen", {"content": "q", "summary": ""}, "summary: the assistant message is empty"),
    ("context-target", {"context": "q"}, "no 'target' key for the context-target format (keys here: 'context')"),
    ("advertisegen", ["content", "summary"], "expected a JSON object, got an array"),
])
def test_bad_records_name_the_field(fmt, record, what):
    with pytest.raises(RecordError) as caught:
        read_record(fmt, record)
    assert caught.value.what.startswith(what), caught.value.what
    assert caught.value.fix  # every problem says what to do


def test_unknown_role_lists_the_known_ones():
    with pytest.raises(RecordError) as caught:
        read_record("conversations", {"conversations": [{"role": "bot", "content": "a"}]})
    assert caught.value.fix == "use one of system, user, assistant, observation, tool"


def _round_trip(messages: list[Message]) -> list[Message]:
    return read_record("conversations", to_conversations_record(Conversation(messages, "x:1")))


def test_conversations_record_round_trips_every_field():
    tools = [{"name": "f"}]
    chatglm3 = [
        Message("system", TOOLS_PREAMBLE, tools=tools),
        Message("user", "q"),
        Message("assistant", "```python\ntool_call(a=1)\n```", metadata="f", loss=True),
        Message("observation", "{}", loss=False),
        Message("assistant", "a"),
    ]
    record = to_conversations_record(Conversation(chatglm3, "x:1"))
    assert record["tools"] == tools and record["conversations"][0] == {"role": "user", "content": "q"}
    assert _round_trip(chatglm3) == chatglm3
    glm4 = [Message("system", "", tools=[{"type": "function", "function": {"name": "f"}}]),
            Message("user", "q"), Message("assistant", "a")]
    assert _round_trip(glm4) == glm4
