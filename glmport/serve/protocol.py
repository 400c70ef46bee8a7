"""OpenAI's chat-completions protocol as ``glmport serve`` speaks it: requests checked field by field, and
responses, stream chunks and errors in OpenAI's shapes.

A request is read with the standard library (``json``) and checked here rather than by a pydantic model
behind FastAPI: every mistake becomes one 400 in OpenAI's error shape whose message names the field
(``messages[2].role``) and says what to send, where FastAPI would answer 422 in a shape no OpenAI client
reads. Arguments OpenAI has and glmport cannot honour (``n`` > 1, penalties, logprobs) are refused, not
ignored: a client that asks for them should know it did not get them. Unknown arguments are refused too,
as OpenAI does, naming the argument.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field

from glmport.data.formats import json_preview, json_type  # one wording of JSON types in every error

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_STOP_SEQUENCES = 4  # as OpenAI
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes

# Arguments a client may send that change nothing here (OpenAI bookkeeping), and the values of otherwise
# unsupported arguments that ask for the default behaviour and so are fine.
IGNORED = ("user", "store", "metadata", "service_tier", "parallel_tool_calls", "prediction", "modalities")
DEFAULT_ONLY = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,),
                "logit_bias": ({},), "top_logprobs": (0,)}


class APIError(Exception):
    """An answer other than 200, in OpenAI's error shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    """A checked ``POST /v1/chat/completions`` body. ``messages`` and ``tools`` keep OpenAI's shapes (roles
    normalised: ``developer`` is ``system``); :mod:`glmport.serve.prompt` turns them into the family's prompt."""

    model: str
    messages: list[dict]
    tools: list[dict] | None = None  # None: no tools, or tool_choice "none"
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    max_tokens: int | None = None  # None: as many as fit (up to the server's cap)
    # Greedy unless asked otherwise, as glmport infer (OpenAI samples at 1.0 by default): the same request
    # gets the same reply, which is what a fine-tuned model is usually checked with.
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


def parse_chat_request(body: bytes) -> ChatRequest:
    """Check a request body; raise :class:`APIError` (400) naming the first field at fault."""
    data = _json_object(body)
    known = {"model", "messages", "tools", "tool_choice", "stream", "stream_options", "max_tokens",
             "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n", "response_format",
             *IGNORED, *DEFAULT_ONLY}
    for key in data:
        if key not in known:
            raise bad_request(f"Unrecognized request argument supplied: {key} (glmport serve takes "
                              f"{', '.join(sorted(known - set(IGNORED)))})", param=key)
    for key, defaults in DEFAULT_ONLY.items():
        if key in data and data[key] is not None and not _equal_default(data[key], defaults):
            raise bad_request(f"{key}: {json_preview(data[key])} is not supported by glmport serve (leave it out)",
                              param=key)
    model = _typed(data.get("model"), str, "model", required=True)
    if not model:
        raise bad_request("model: empty; name one of GET /v1/models", param="model")
    request = ChatRequest(model=model, messages=_messages(data.get("messages")))
    request.stream = _typed(data.get("stream"), bool, "stream") or False
    options = _typed(data.get("stream_options"), dict, "stream_options")
    if options:
        request.include_usage = _typed(options.get("include_usage"), bool, "stream_options.include_usage") or False
    n = _integer(data.get("n"), "n")
    if n is not None and n != 1:
        raise bad_request(f"n: {n} choices asked for; glmport serve generates one (n=1)", param="n")
    for key in ("max_tokens", "max_completion_tokens"):
        value = _integer(data.get(key), key)
        if value is not None:
            if value < 1:
                raise bad_request(f"{key}: {value}; give at least 1", param=key)
            request.max_tokens = value
    temperature = _number(data.get("temperature"), "temperature")
    if temperature is not None:
        if not 0 <= temperature <= 2:
            raise bad_request(f"temperature: {temperature} is outside [0, 2]", param="temperature")
        request.temperature = temperature
    top_p = _number(data.get("top_p"), "top_p")
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise bad_request(f"top_p: {top_p} is outside (0, 1]", param="top_p")
        request.top_p = top_p
    request.stop = _stop(data.get("stop"))
    seed = _integer(data.get("seed"), "seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise bad_request(f"seed: {seed} does not fit in 64 bits", param="seed")
    request.seed = seed
    response_format = _typed(data.get("response_format"), dict, "response_format")
    if response_format and response_format.get("type") != "text":
        raise bad_request(f"response_format: {json_preview(response_format)} is not supported (only {{\"type\": \"text\"}})",
                          param="response_format")
    tools = _tools(data.get("tools"))
    choice = data.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise bad_request(f"tool_choice: {json_preview(choice)} is not supported; use \"auto\" (the model decides) or "
                          "\"none\" (glmport cannot force a call)", param="tool_choice")
    request.tools = None if choice == "none" else tools
    return request


def _json_object(body: bytes) -> dict:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:  # "[[[[...": nested deeper than the parser goes
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body is {json_type(data)}; send a JSON object")
    return data


def _messages(value) -> list[dict]:
    items = _typed(value, list, "messages", required=True)
    if not items:
        raise bad_request("messages: empty; send at least one message", param="messages")
    messages: list[dict] = []
    calls_open = False  # a tool result must answer an assistant message with tool_calls
    for index, item in enumerate(items):
        where = f"messages[{index}]"
        _typed(item, dict, where, required=True)
        role = _typed(item.get("role"), str, f"{where}.role", required=True)
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise bad_request(f"{where}.role: {json_preview(role)} is not a role; use system, user, assistant or tool",
                              param=f"{where}.role")
        message: dict = {"role": role}
        if role == "assistant":
            calls = _tool_calls(item.get("tool_calls"), f"{where}.tool_calls")
            message["content"] = _content(item, where, nullable=bool(calls))
            if calls:
                message["tool_calls"] = calls
            calls_open = bool(calls)
        elif role == "tool":
            if not calls_open:
                raise bad_request(f"{where}: a tool result that follows no assistant message with tool_calls",
                                  param=where)
            message["content"] = _content(item, where)
            call_id = _typed(item.get("tool_call_id"), str, f"{where}.tool_call_id")
            if call_id is not None:
                message["tool_call_id"] = call_id
        else:
            message["content"] = _content(item, where)
            calls_open = False
        messages.append(message)
    return messages


def _content(item: dict, where: str, nullable: bool = False) -> str | None:
    """A string, or a list of ``{"type": "text", "text": ...}`` parts (joined with newlines)."""
    value = item.get("content")
    if value is None:
        if nullable:
            return None
        raise bad_request(f"{where}.content: {'missing' if 'content' not in item else 'null'}; send the text as a "
                          "string", param=f"{where}.content")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad_request(f"{where}.content: expected a string or a list of text parts, got {json_type(value)}",
                          param=f"{where}.content")
    texts = []
    for index, part in enumerate(value):
        place = f"{where}.content[{index}]"
        _typed(part, dict, place, required=True)
        if part.get("type") != "text":
            raise bad_request(f"{place}.type: {json_preview(part.get('type'))} parts are not supported (text only)",
                              param=f"{place}.type")
        texts.append(_typed(part.get("text"), str, f"{place}.text", required=True))
    return "\n".join(texts)


def _tool_calls(value, where: str) -> list[dict]:
    calls = _typed(value, list, where) or []
    checked = []
    for index, call in enumerate(calls):
        place = f"{where}[{index}]"
        _typed(call, dict, place, required=True)
        if call.get("type", "function") != "function":
            raise bad_request(f"{place}.type: {json_preview(call.get('type'))}; only function calls", param=f"{place}.type")
        function = _typed(call.get("function"), dict, f"{place}.function", required=True)
        name = _typed(function.get("name"), str, f"{place}.function.name", required=True)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except (json.JSONDecodeError, RecursionError):
                raise bad_request(f"{place}.function.arguments: not valid JSON", param=f"{place}.function.arguments") from None
        if not isinstance(arguments, dict):
            raise bad_request(f"{place}.function.arguments: expected a JSON object, got {json_type(arguments)}",
                              param=f"{place}.function.arguments")
        checked.append({"id": _typed(call.get("id"), str, f"{place}.id"), "type": "function",
                        "function": {"name": name, "arguments": arguments}})
    return checked


def _tools(value) -> list[dict] | None:
    tools = _typed(value, list, "tools")
    if not tools:
        return None
    checked = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        _typed(tool, dict, where, required=True)
        if tool.get("type") != "function":
            raise bad_request(f"{where}.type: {json_preview(tool.get('type'))}; only \"function\" tools", param=f"{where}.type")
        function = _typed(tool.get("function"), dict, f"{where}.function", required=True)
        name = _typed(function.get("name"), str, f"{where}.function.name", required=True)
        if not TOOL_NAME.match(name):
            raise bad_request(f"{where}.function.name: {json_preview(name)}; use 1 to 64 letters, digits, _ or -",
                              param=f"{where}.function.name")
        _typed(function.get("description"), str, f"{where}.function.description")
        _typed(function.get("parameters"), dict, f"{where}.function.parameters")
        checked.append(tool)
    return checked


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else _typed(value, list, "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop: {len(stops)} sequences; at most {MAX_STOP_SEQUENCES}", param="stop")
    for index, stop in enumerate(stops):
        if not isinstance(stop, str) or not stop:
            raise bad_request(f"stop[{index}]: expected a non-empty string, got {json_preview(stop)}", param="stop")
    return list(stops)


def _typed(value, kind: type, where: str, required: bool = False):
    if value is None:
        if required:
            raise bad_request(f"{where}: missing; it is required", param=where)
        return None
    # bool is an int in Python; JSON keeps them apart, so do we.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad_request(f"{where}: expected {_KIND_NAMES[kind]}, got {json_type(value)} ({json_preview(value)})",
                          param=where)
    return value


def _integer(value, where: str) -> int | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 256.0 from a JavaScript client
    return _typed(value, int, where)


def _number(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{where}: expected a number, got {json_type(value)} ({json_preview(value)})", param=where)
    return float(value)


def _equal_default(value, defaults: tuple) -> bool:
    return any(type(value) is type(d) and value == d for d in defaults) or \
        (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0 and 0 in defaults)


_KIND_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "true or false", int: "an integer"}




# --- responses ---------------------------------------------------------------------------------------------

def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def assistant_message(content: str | None, tool_calls: list[dict] | None) -> dict:
    message: dict = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def completion(id_: str, created: int, model: str, message: dict, finish_reason: str, usage_: dict) -> dict:
    return {"id": id_, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_}


def chunk(id_: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    """One stream event; ``delta`` None gives the usage-only chunk (``choices`` empty), as OpenAI sends it."""
    out: dict = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [] if delta is None else
                 [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line; the stream ends with ``data: [DONE]``."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def now() -> int:
    return int(time.time())
