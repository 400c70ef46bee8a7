"""Record formats: each one read into messages, bad records named by field, and the conversations writer."""

from __future__ import annotations

import json

import pytest

from glmport.data.formats import RecordError, candidate_formats, detect_format, read_record
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


# ShareGPT (LLaMA-Factory's from/value layout) and OpenAI-style messages with tool_calls.
# A tool call in every format becomes what ChatGLM3's `tool` role gives: an assistant message named by
# its metadata holding the fenced tool_call(...) block, then the result as an observation.

WEATHER = {"name": "weather", "description": "the weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}
CALL_PARIS = Message("assistant", "```python\ntool_call(city='Paris', days=2)\n```", metadata="weather")


def test_sharegpt_golden():
    record = {
        "conversations": [
            {"from": "human", "value": "weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris", "days": 2}}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "21 degrees"},
            {"from": "user", "value": "thanks"},
            {"from": "assistant", "value": "you are welcome"},
        ],
        "system": "be brief",
        "tools": json.dumps([WEATHER]),
    }
    assert read_record("sharegpt", record) == [
        Message("system", "be brief", tools=[WEATHER]),
        Message("user", "weather in Paris?"),
        CALL_PARIS,
        Message("observation", '{"temp": 21}'),
        Message("assistant", "21 degrees"),
        Message("user", "thanks"),
        Message("assistant", "you are welcome"),
    ]


def test_sharegpt_tools_without_system_get_the_chatglm3_preamble_and_parallel_calls():
    record = {"tools": [WEATHER], "conversations": [
        {"from": "human", "value": "Paris and Rome?"},
        {"from": "function_call", "value": json.dumps([{"name": "weather", "arguments": {"city": "Paris", "days": 2}},
                                                       {"name": "weather", "arguments": '{"city": "Rome"}'}])},
        {"from": "tool", "value": "sun"},
        {"from": "gpt", "value": "sunny"},
    ]}
    assert read_record("sharegpt", record) == [
        Message("system", TOOLS_PREAMBLE, tools=[WEATHER]),
        Message("user", "Paris and Rome?"),
        CALL_PARIS,
        Message("assistant", "```python\ntool_call(city='Rome')\n```", metadata="weather"),
        Message("observation", "sun"),
        Message("assistant", "sunny"),
    ]


def test_sharegpt_empty_tools_and_system_are_absent():
    record = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}], "system": "", "tools": ""}
    assert read_record("sharegpt", record) == [Message("system", "s"), Message("user", "q"), Message("assistant", "a")]


def test_openai_golden():
    tools = [{"type": "function", "function": WEATHER}]
    record = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "weather in"}, {"type": "text", "text": "Paris and Rome?"}]},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "weather", "arguments": '{"city": "Paris", "days": 2}'}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "25"}]},
            {"role": "assistant", "content": "21 and 25 degrees", "loss": True},
        ],
        "tools": tools,
    }
    assert read_record("openai", record) == [
        Message("system", "be brief", tools=tools),
        Message("user", "weather in\nParis and Rome?"),
        Message("assistant", "Let me look."),
        CALL_PARIS,
        Message("assistant", "```python\ntool_call(city='Rome')\n```", metadata="weather"),
        Message("observation", "21"),
        Message("observation", "25"),
        Message("assistant", "21 and 25 degrees", loss=True),
    ]


def test_openai_tools_without_system_and_null_content():
    tools = [{"type": "function", "function": WEATHER}]
    record = {"tools": tools, "messages": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "content": "21"},
        {"role": "assistant", "content": "21"},
    ]}
    assert read_record("openai", record) == [
        Message("system", TOOLS_PREAMBLE, tools=tools), Message("user", "Paris?"), CALL_PARIS,
        Message("observation", "21"), Message("assistant", "21")]


def test_a_tool_call_reads_the_same_in_every_format():
    """ChatGLM3's `tool` role, ShareGPT's function_call and OpenAI's tool_calls: one representation."""
    chatglm3 = read_record("conversations", {"conversations": [
        {"role": "user", "content": "q"},
        {"role": "tool", "name": "weather", "parameters": {"city": "Paris", "days": 2}, "observation": "21"},
        {"role": "assistant", "content": "a"}]})
    sharegpt = read_record("sharegpt", {"conversations": [
        {"from": "human", "value": "q"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris", "days": 2}}'},
        {"from": "observation", "value": "21"}, {"from": "gpt", "value": "a"}]})
    openai = read_record("openai", {"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "content": "21"}, {"role": "assistant", "content": "a"}]})
    assert sharegpt[1] == openai[1] == chatglm3[1] == CALL_PARIS
    # ChatGLM3's reader marks the observation unlearned explicitly; unlearned is every observation's default.
    assert [m.content for m in sharegpt] == [m.content for m in openai] == [m.content for m in chatglm3]
    assert [m.role for m in sharegpt] == [m.role for m in openai] == ["user", "assistant", "observation", "assistant"]


def test_tool_calls_convert_to_chatglm3_conversations_and_back():
    record = {"tools": [WEATHER], "conversations": [
        {"from": "human", "value": "q"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris", "days": 2}}'},
        {"from": "observation", "value": "21"}, {"from": "gpt", "value": "a"}]}
    messages = read_record("sharegpt", record)
    written = to_conversations_record(Conversation(messages, "x:1"))
    assert written == {"conversations": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "```python\ntool_call(city='Paris', days=2)\n```", "metadata": "weather"},
        {"role": "observation", "content": "21"},
        {"role": "assistant", "content": "a"},
    ], "tools": [WEATHER]}
    assert read_record("conversations", written) == messages


@pytest.mark.parametrize(("record", "fmt"), [
    ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt"),
    ({"conversations": [{"role": "user", "content": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),  # a mix
    ({"conversations": [{"role": "user", "content": "q"}]}, "conversations"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages"),  # plain: both read it the same
    ({"messages": [{"role": "observation", "content": "r"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "r"}]}, "openai"),
    ({"messages": [{"role": "assistant", "tool_calls": []}]}, "openai"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}, "openai"),
    ({"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]}, "openai"),
])
def test_detection_by_message_keys(record, fmt):
    assert detect_format(record) == fmt


def test_candidate_formats_of_shared_keys():
    plain = {"messages": [{"role": "user", "content": "q"}]}
    assert candidate_formats(plain) == ("messages", "openai")
    assert candidate_formats({"messages": [{"role": "tool", "content": "r"}]}) == ("openai",)
    assert candidate_formats({"messages": [{"role": "tool"}, {"role": "observation"}]}) == ("openai", "messages")
    assert candidate_formats({"conversations": [{"from": "human"}]}) == ("sharegpt",)
    assert candidate_formats({"conversations": [{"role": "user"}, {"from": "gpt"}]}) == ("sharegpt", "conversations")
    assert candidate_formats({"prompt": "p"}) == ()


Q = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
HUMAN = {"from": "human", "value": "q"}
GPT = {"from": "gpt", "value": "a"}


def _call(arguments, name="f", **extra):
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments},
                                                 **extra}]}


@pytest.mark.parametrize(("fmt", "record", "what"), [
    ("sharegpt", {"conversations": [HUMAN, {"from": "bot", "value": "a"}]}, "conversations[1].from: unknown speaker 'bot'"),
    ("sharegpt", {"conversations": [HUMAN, {"from": "gpt", "value": 3}]},
     "conversations[1].value: expected a string, got a number (3)"),
    ("sharegpt", {"conversations": [HUMAN, {"from": "gpt"}]}, "conversations[1]: no 'value' key"),
    ("sharegpt", {"conversations": [HUMAN, {"role": "assistant", "content": "a"}]},
     "conversations[1]: a ChatGLM3 message (role/content) among ShareGPT messages (from/value)"),
    ("conversations", {"conversations": [Q, GPT]},
     "conversations[1]: a ShareGPT message (from/value) among ChatGLM3 messages (role/content)"),
    ("sharegpt", {"conversations": [HUMAN, {"from": "function_call", "value": "weather(city=Paris)"}, GPT]},
     "conversations[1].value: the function call is not valid JSON"),
    ("sharegpt", {"conversations": [HUMAN, {"from": "function_call", "value": '{"arguments": {}}'}, GPT]},
     "conversations[1].value: no 'name' key"),
    ("sharegpt", {"conversations": [HUMAN, {"from": "function_call", "value": '{"name": "f", "arguments": [1]}'}, GPT]},
     "conversations[1].value.arguments: expected an object, got an array"),
    ("sharegpt", {"conversations": [HUMAN, {"from": "function_call", "value": '{"name": "f", "arguments": {"a-b": 1}}'},
                                    GPT]},
     "conversations[1].value.arguments: parameter name 'a-b' is not a Python identifier"),
    ("sharegpt", {"conversations": [HUMAN, GPT], "tools": "[{name: f}]"}, "tools: not valid JSON"),
    ("sharegpt", {"conversations": [HUMAN, GPT], "tools": '{"name": "f"}'}, "tools: expected an array, got an object"),
    ("sharegpt", {"conversations": [HUMAN, GPT], "system": 1}, "system: expected a string, got a number (1)"),
    ("sharegpt", {"conversations": [HUMAN, GPT, {"from": "system", "value": "s"}], "system": "s"},
     "conversations[2]: a second system message"),
    ("openai", {"messages": [Q, {"role": "bot", "content": "a"}]}, "messages[1].role: unknown role 'bot'"),
    ("openai", {"messages": [Q, {"role": "assistant", "content": None}]},
     "messages[1].content: null, and the assistant message has no tool_calls"),
    ("openai", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, A]},
     "messages[0].content[0].type: 'image_url' parts are not supported"),
    ("openai", {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}, A]},
     "messages[0].content[0].text: expected a string, got a number (1)"),
    ("openai", {"messages": [Q, _call("{city: Paris}")]},
     "messages[1].tool_calls[0].function.arguments: not valid JSON"),
    ("openai", {"messages": [Q, _call("[1]")]},
     "messages[1].tool_calls[0].function.arguments: expected an object, got an array"),
    ("openai", {"messages": [Q, _call("{}", name="")]}, "messages[1].tool_calls[0].function.name: empty tool name"),
    ("openai", {"messages": [Q, {"role": "assistant", "tool_calls": [{"type": "code", "function": {}}]}]},
     "messages[1].tool_calls[0].type: 'code' calls are not supported"),
    ("openai", {"messages": [Q, {"role": "assistant", "tool_calls": [{"type": "function"}]}]},
     "messages[1].tool_calls[0]: no 'function' key"),
    ("openai", {"messages": [Q, {"role": "tool", "content": "r"}, A]},
     "messages[1]: a tool result before any tool call"),
    ("openai", {"messages": [Q, _call("{}", id="call_1"), {"role": "tool", "tool_call_id": "call_9", "content": "r"}, A]},
     "messages[2].tool_call_id: 'call_9' answers no earlier tool call (ids so far: 'call_1')"),
    ("openai", {"messages": [Q, _call("{}"), {"role": "observation", "content": "r"}, A]},
     "messages[2].role: 'observation' is GLM-4's role for a tool result, in an OpenAI-style record"),
    ("openai", {"messages": [{"role": "system", "content": "", "tools": []}, Q, _call("{}"),
                             {"role": "tool", "content": "r"}, A]},
     "messages[0].tools: GLM-4 puts tools on the system message; this record is OpenAI-style"),
    ("openai", {"messages": [Q, A], "tools": [{"name": "f"}]},
     "tools[0]: expected {\"type\": \"function\", \"function\": {...}}"),
    ("messages", {"messages": [Q, _call("{}"), {"role": "tool", "content": "r"}, A]},
     "messages[1].tool_calls: OpenAI-style tool calls in a GLM-4 record"),
])
def test_bad_sharegpt_and_openai_records_name_the_field(fmt, record, what):
    with pytest.raises(RecordError) as caught:
        read_record(fmt, record)
    assert caught.value.what.startswith(what), caught.value.what
    assert caught.value.fix


def test_openai_tool_calls_convert_to_glm4_messages_that_render_the_same(tmp_path):
    """``glmport data convert --to messages``: the call as GLM-4 writes it (name in metadata, JSON arguments),
    tools on a system message with no text; read back, each message renders for glm4 as the original does."""
    from glmport.testing import ok, run_cli
    from glmport.toolcalls import family_message

    record = {"tools": [{"type": "function", "function": WEATHER}], "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21"}, {"role": "assistant", "content": "a"}]}
    source, target = tmp_path / "openai.jsonl", tmp_path / "glm4.jsonl"
    source.write_text(json.dumps(record) + "\n", encoding="utf-8")
    done = ok(run_cli("data", "convert", source, target, "--to", "messages"))
    assert "wrote 1 GLM-4 messages records (openai -> messages)" in done.stdout
    written = json.loads(target.read_text(encoding="utf-8"))
    assert written["messages"][0]["role"] == "system" and written["messages"][0]["content"] == ""
    assert written["messages"][2] == {"role": "assistant", "content": '{"city": "Paris", "days": 2}', "metadata": "weather"}
    assert written["messages"][3] == {"role": "observation", "content": "21"}

    def rendered(messages):
        return [(m.role, m.content, m.metadata, m.tools) for m in (family_message("glm4", m) for m in messages)]

    assert rendered(read_record("messages", written)) == rendered(read_record("openai", record))
