"""glmport serve without a model: requests checked field by field, the prompt a conversation makes, replies as
OpenAI messages, stop sequences over streamed text, the API key, and the command's refusals before loading."""

from __future__ import annotations

import importlib.util
import json
import socket
from dataclasses import dataclass

import pytest

from glmport.data.templates import get_template
from glmport.serve.decoding import StopSequences
from glmport.serve.limits import check_api_key, is_loopback
from glmport.serve.prompt import prompt_messages, reply_message
from glmport.serve.protocol import APIError, parse_chat_request
from glmport.testing import ok, run_cli
from glmport.tiny.tokenizer import CHATGLM3, GLM4, build_fast_tokenizer
from glmport.toolcalls import parse_tool_call

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def tok3():
    return build_fast_tokenizer(CHATGLM3)


def body(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def refused(raw: bytes, status: int = 400) -> APIError:
    with pytest.raises(APIError) as caught:
        parse_chat_request(raw)
    assert caught.value.status == status
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}
    return caught.value


def test_a_plain_request_and_its_defaults():
    request = parse_chat_request(body(messages=[{"role": "developer", "content": "be brief"},
                                                {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                             {"type": "text", "text": "b"}]}]))
    assert request.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
    assert (request.stream, request.max_tokens, request.temperature, request.top_p, request.stop, request.seed) == \
        (False, None, 0.0, 1.0, [], None)
    request = parse_chat_request(body(stream=True, stream_options={"include_usage": True}, max_tokens=256.0,
                                      temperature=1, top_p=0.5, stop="\n", seed=-3, n=1, presence_penalty=0,
                                      user="me", tools=[WEATHER], tool_choice="auto"))
    assert (request.stream, request.include_usage, request.max_tokens, request.temperature, request.stop,
            request.seed, request.tools) == (True, True, 256, 1.0, ["\n"], -3, [WEATHER])
    assert parse_chat_request(body(tools=[WEATHER], tool_choice="none")).tools is None


@pytest.mark.parametrize(("raw", "says", "param"), [
    (b"{\"model\": ", "not valid JSON", None),
    (b"[1, 2]", "is an array; send a JSON object", None),
    (b"", "empty", None),
    (b"\xff\xfe{}", "not UTF-8", None),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply", None),
    (body(messages="hi"), "messages: expected an array, got a string", "messages"),
    (body(messages=[]), "messages: empty", "messages"),
    (body(messages=[{"role": "robot", "content": "x"}]), "messages[0].role: \"robot\" is not a role", "messages[0].role"),
    (body(messages=[{"role": "user"}]), "messages[0].content: missing", "messages[0].content"),
    (body(messages=[{"role": "user", "content": 5}]), "messages[0].content: expected a string", "messages[0].content"),
    (body(messages=[{"role": "tool", "content": "21"}]), "follows no assistant message with tool_calls", "messages[0]"),
    (body(max_tokens="10"), "max_tokens: expected an integer, got a string", "max_tokens"),
    (body(max_tokens=True), "max_tokens: expected an integer, got a boolean", "max_tokens"),
    (body(max_tokens=0), "max_tokens: 0; give at least 1", "max_tokens"),
    (body(temperature="hot"), "temperature: expected a number", "temperature"),
    (body(temperature=3), "outside [0, 2]", "temperature"),
    (body(top_p=0), "outside (0, 1]", "top_p"),
    (body(stream="yes"), "stream: expected true or false", "stream"),
    (body(n=2), "n: 2 choices asked for", "n"),
    (body(stop=["a", "b", "c", "d", "e"]), "at most 4", "stop"),
    (body(stop=[""]), "non-empty string", "stop"),
    (body(seed=2**70), "does not fit in 64 bits", "seed"),
    (body(frequency_penalty=0.5), "frequency_penalty: 0.5 is not supported", "frequency_penalty"),
    (body(logprobs=True), "logprobs: true is not supported", "logprobs"),
    (body(functions=[]), "Unrecognized request argument supplied: functions", "functions"),
    (body(model=7), "model: expected a string", "model"),
    (body(tools=[{"type": "retrieval"}]), "only \"function\" tools", "tools[0].type"),
    (body(tools=[{"type": "function", "function": {"name": "a b"}}]), "use 1 to 64 letters", "tools[0].function.name"),
    (body(tool_choice="required"), "tool_choice: \"required\" is not supported", "tool_choice"),
    (body(response_format={"type": "json_object"}), "response_format", "response_format"),
    (body(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "w", "arguments": "{oops"}}]}]),
     "arguments: not valid JSON", "messages[0].tool_calls[0].function.arguments"),
])
def test_a_bad_request_is_one_400_naming_the_field(raw, says, param):
    error = refused(raw)
    assert says in error.message
    assert error.param == param


def test_tools_and_tool_calls_become_the_familys_own_turns(tok3):
    tok4 = build_fast_tokenizer(GLM4)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21"}]
    request = parse_chat_request(body(messages=history, tools=[WEATHER]))

    messages = prompt_messages(request, get_template("chatglm3", tok3))
    assert [(m.role, m.metadata) for m in messages] == [("system", ""), ("user", ""), ("assistant", "weather"),
                                                         ("observation", "")]
    assert messages[0].tools == [WEATHER["function"]]  # ChatGLM3 declares the bare functions after its preamble
    assert messages[2].content == "```python\ntool_call(city='Paris')\n```"
    assert messages[3].content == "21"

    messages = prompt_messages(request, get_template("glm4", tok4))
    assert messages[0].tools == [WEATHER] and messages[2].content == '{"city": "Paris"}'

    with_system = parse_chat_request(body(messages=[{"role": "system", "content": "Be brief."}, *history], tools=[WEATHER]))
    first = prompt_messages(with_system, get_template("chatglm3", tok3))[0]
    assert (first.role, first.content, first.tools) == ("system", "Be brief.", [WEATHER["function"]])


@dataclass
class FakeReply:
    text: str
    tool_call: object
    stop: int | None = 2


@dataclass
class FakeOutcome:
    reply: FakeReply
    text: str
    stopped_by_sequence: bool = False
    finish_reason: str = "stop"


def test_a_readable_call_is_tool_calls_and_an_unreadable_one_is_text(tok3):
    template = get_template("chatglm3", tok3)
    call = parse_tool_call("chatglm3", "weather\n```python\ntool_call(city='Paris')\n```")
    message, finish, _ = reply_message(FakeOutcome(FakeReply("", call), ""), template, tools_offered=True)
    assert finish == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
    assert message["tool_calls"][0]["id"].startswith("call_")

    broken = parse_tool_call("chatglm3", "weather\n```python\ntool_call(city=')\n```")
    assert broken is not None and broken.arguments is None
    message, finish, text = reply_message(FakeOutcome(FakeReply("", broken), ""), template, tools_offered=True)
    assert finish == "stop" and "tool_calls" not in message
    assert message["content"] == text == "weather\n```python\ntool_call(city=')\n```"

    # a call nobody offered tools for is what the model wrote, as text
    message, finish, _ = reply_message(FakeOutcome(FakeReply("", call), ""), template, tools_offered=False)
    assert finish == "stop" and message["content"].startswith("weather\n```python")


def test_stop_sequences_hold_back_what_may_be_their_start():
    sent = []
    stops = StopSequences(["END", "\n\n"], sent.append)
    for piece in ("Hello E", "N", "d of it. E", "ND and more"):
        stops.feed(piece)
    assert stops.hit and "".join(sent) == "Hello ENd of it. " == stops.text
    assert stops.cut("Hello ENd of it. END and more") == "Hello ENd of it. "
    assert stops.rest("Hello ENd of it. ") == ""

    sent.clear()
    stops = StopSequences(["END"], sent.append)
    stops.feed("abcE")
    assert "".join(sent) == "abc" and not stops.hit  # "E" may begin "END"
    assert stops.rest("abcEF") == "EF"  # the reply ended without it


def test_the_api_key_is_checked_and_loopback_is_told_apart():
    check_api_key(None, None)
    check_api_key("Bearer s3cret", "s3cret")
    for header in (None, "", "Bearer", "Basic s3cret", "Bearer s3cre", "Bearer s3cret2"):
        with pytest.raises(APIError) as caught:
            check_api_key(header, "s3cret")
        assert caught.value.status == 401 and caught.value.code == "invalid_api_key"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


def test_serving_beyond_loopback_needs_a_key_and_flags_are_checked_before_anything_loads(tmp_path):
    result = ok(run_cli("serve", tmp_path, "--host", "0.0.0.0", env={"GLMPORT_API_KEY": None}), exit_code=2)
    assert "--api-key" in result.stderr and "0.0.0.0" in result.stderr
    result = ok(run_cli("serve", tmp_path, "--adapter", "nameless", "--max-queue", "-1", "--queue-timeout", "0"),
                exit_code=2)
    assert "3 bad serve flag(s)" in result.stderr and "'nameless' is not NAME=PATH" in result.stderr


def test_a_port_in_use_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = ok(run_cli("serve", tmp_path, "--port", str(port), "--backend", "cpu"), exit_code=2)
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr


def test_without_the_extra_the_command_says_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    result = ok(run_cli("serve", tmp_path), exit_code=2)
    assert 'pip install "glmport[serve]"' in result.stderr
