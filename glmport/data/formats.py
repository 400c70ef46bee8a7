"""Readers for the record formats users bring, each turning one JSON object into a list of messages.

A reader raises :class:`RecordError` naming the field at fault (``conversations[2].content``); the
loader adds the file and line. Formats are told apart by their keys, never by the file name.
"""

from __future__ import annotations

import ast
import copy
import json

from glmport.data.records import ROLES, TOOLS_PREAMBLE, Message, learned_by_default

# Keys that identify a format, in the order detection tries them (a record holding the keys of two
# formats is read as the first).
SIGNATURES = {
    "conversations": ("conversations",),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "advertisegen": ("content", "summary"),
    "context-target": ("context", "target"),
}
FORMATS = tuple(SIGNATURES)


class RecordError(Exception):
    """One record is not valid in its format; ``what`` starts with the field at fault."""

    def __init__(self, what: str, fix: str = ""):
        super().__init__(what)
        self.what = what
        self.fix = fix


def detect_format(record: dict) -> str | None:
    for name, keys in SIGNATURES.items():
        if all(key in record for key in keys):
            return name
    return None


def describe_signatures() -> str:
    return "; ".join(f"{name}: {', '.join(keys)}" for name, keys in SIGNATURES.items())


def read_record(fmt: str, record) -> list[Message]:
    """The messages of one record in format ``fmt``, checked for types, roles and a learnable reply."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {_json_type(record)}",
                          "write one object per record, e.g. {\"conversations\": [...]}")
    missing = [key for key in SIGNATURES[fmt] if key not in record]
    if missing:
        raise RecordError(f"no {_quoted(missing)} key for the {fmt} format (keys here: {_quoted(sorted(record))})",
                          f"records of the {fmt} format have the keys {_quoted(SIGNATURES[fmt])}")
    located = READERS[fmt](record)
    _check_dialogue(located)
    return [message for message, _ in located]


# Each reader returns (message, field) pairs so that the dialogue checks can name the field at fault.
Located = list[tuple[Message, str]]


def _read_conversations(record: dict) -> Located:
    items = _typed(record["conversations"], list, "conversations")
    located: Located = []
    if record.get("tools") is not None:
        tools = _check_tools(record["tools"], "tools")
        located.append((Message("system", TOOLS_PREAMBLE, tools=tools), "tools"))
    for index, item in enumerate(items):
        field = f"conversations[{index}]"
        _typed(item, dict, field)
        role = _field(item, "role", str, field)
        if role == "tool":
            located.extend(_tool_call(item, field))
            continue
        located.append((_plain_message(item, role, field, extra_roles=("tool",)), field))
    return located


def _tool_call(item: dict, field: str) -> Located:
    """A ChatGLM3 ``tool`` message: the call as an assistant turn, then its result as an observation."""
    name = _field(item, "name", str, field)
    if not name:
        raise RecordError(f"{field}.name: empty tool name", "give the name of the tool that was called")
    parameters = _field(item, "parameters", dict, field)
    if "observation" not in item:
        raise RecordError(f"{field}: a tool message needs an 'observation' key (the tool's result)",
                          "add \"observation\": the value the tool returned")
    loss = _optional(item, "loss", bool, field)
    call = Message("assistant", _python_call(parameters, f"{field}.parameters"), metadata=name, loss=loss)
    observation = item["observation"]
    text = observation if isinstance(observation, str) else json.dumps(observation, ensure_ascii=False)
    # The result is the tool's, not the model's: never a target.
    return [(call, field), (Message("observation", text, loss=False), field)]


def _python_call(parameters: dict, field: str) -> str:
    """The fenced ``tool_call(k=v, ...)`` block ChatGLM3 writes for a tool call (PROMPT_en.md)."""
    for key in parameters:
        if not key.isidentifier():
            raise RecordError(f"{field}: parameter name {key!r} is not a Python identifier",
                              "tool parameters are rendered as tool_call(name=value); rename the parameter")
    keywords = [ast.keyword(arg=key, value=_python_value(value)) for key, value in parameters.items()]
    call = ast.Call(func=ast.Name(id="tool_call", ctx=ast.Load()), args=[], keywords=keywords)
    return "```python\n" + ast.unparse(call) + "\n```"


def _python_value(value) -> ast.expr:
    if isinstance(value, list):
        return ast.List(elts=[_python_value(v) for v in value], ctx=ast.Load())
    if isinstance(value, dict):
        return ast.Dict(keys=[ast.Constant(k) for k in value], values=[_python_value(v) for v in value.values()])
    return ast.Constant(value)


def _read_messages(record: dict) -> Located:
    items = _typed(record["messages"], list, "messages")
    located: Located = []
    for index, item in enumerate(items):
        field = f"messages[{index}]"
        _typed(item, dict, field)
        role = _field(item, "role", str, field)
        located.append((_plain_message(item, role, field), field))
    return located


def _plain_message(item: dict, role: str, field: str, extra_roles: tuple[str, ...] = ()) -> Message:
    if role not in ROLES:
        known = ", ".join((*ROLES, *extra_roles))
        raise RecordError(f"{field}.role: unknown role {role!r}", f"use one of {known}")
    content = _field(item, "content", str, field)
    metadata = _optional(item, "metadata", str, field) or ""
    loss = _optional(item, "loss", bool, field)
    if role in ("system", "user"):
        loss = None  # the prompt is never a target (README: loss is forced off for system and user)
    tools = None
    if item.get("tools") is not None:
        if role != "system":
            raise RecordError(f"{field}.tools: tools on a {role} message",
                              "declare tools on the system message (GLM-4) or at the record's top level (ChatGLM3)")
        tools = _check_tools(item["tools"], f"{field}.tools")
    return Message(role, content, metadata=metadata, loss=loss, tools=tools)


def _check_tools(tools, field: str) -> list:
    _typed(tools, list, field)
    cleaned = []
    for index, tool in enumerate(tools):
        _typed(tool, dict, f"{field}[{index}]")
        cleaned.append(_without_null_properties(tool))
    return cleaned


def _without_null_properties(tool: dict) -> dict:
    """Drop None-valued entries of ``function.parameters.properties``.

    Files written by `datasets` (Arrow) give every tool the union of all tools' property names, the
    missing ones as null; a null property is not a property, and rendering it would put ``null`` into
    the prompt. GLM-4's demo drops them the same way.
    """
    function = tool.get("function")
    parameters = function.get("parameters") if isinstance(function, dict) else None
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    if not isinstance(properties, dict) or None not in properties.values():
        return tool
    tool = copy.deepcopy(tool)  # the caller's record stays as it was read
    tool["function"]["parameters"]["properties"] = {k: v for k, v in properties.items() if v is not None}
    return tool


def _read_alpaca(record: dict) -> Located:
    located: Located = []
    system = _optional(record, "system", str, "")
    if system:
        located.append((Message("system", system), "system"))
    history = _optional(record, "history", list, "") or []
    for index, pair in enumerate(history):
        field = f"history[{index}]"
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError(f"{field}: expected [question, answer] (two strings), got {_preview(pair)}",
                              "write each earlier turn as [\"question\", \"answer\"]")
        located += [(Message("user", pair[0]), f"{field}[0]"), (Message("assistant", pair[1]), f"{field}[1]")]
    instruction = _field(record, "instruction", str, "")
    extra = _optional(record, "input", str, "") or ""
    prompt = instruction + ("\n" + extra if extra else "")
    located += [(Message("user", prompt), "instruction"), (Message("assistant", _field(record, "output", str, "")), "output")]
    return located


def _pair_reader(prompt_key: str, answer_key: str):
    def read(record: dict) -> Located:
        return [
            (Message("user", _field(record, prompt_key, str, "")), prompt_key),
            (Message("assistant", _field(record, answer_key, str, "")), answer_key),
        ]

    return read


READERS = {
    "conversations": _read_conversations,
    "messages": _read_messages,
    "alpaca": _read_alpaca,
    "advertisegen": _pair_reader("content", "summary"),
    "context-target": _pair_reader("context", "target"),
}


def _check_dialogue(located: Located) -> None:
    """Rules every conversation obeys, whatever its format."""
    systems = [field for message, field in located if message.role == "system"]
    if len(systems) > 1:
        hint = " (the record's `tools` add one)" if "tools" in systems else ""
        raise RecordError(f"{systems[1]}: a second system message{hint}",
                          "keep one system message, before the first user message")
    roles = [message.role for message, _ in located]
    if systems and "user" in roles and roles.index("system") > roles.index("user"):
        raise RecordError(f"{systems[0]}: the system message comes after a user message",
                          "move the system message before the first user message")
    for role in ("user", "assistant"):
        if role not in roles:
            raise RecordError(f"no {role} message (roles here: {', '.join(roles) or 'none'})",
                              "every conversation needs at least one user message and one assistant reply")
    for message, field in located:
        if message.role == "assistant" and not message.content.strip():
            raise RecordError(f"{field}: the assistant message is empty",
                              "write the reply the model should learn, or remove the message")
    if not any(learned_by_default(message) for message, _ in located):
        raise RecordError("every assistant message has \"loss\": false, so there is nothing to learn",
                          "set loss true (or remove the key) on at least one assistant message")


# Small typed accessors. `parent` is the field path of the object the key lives in ("" at the top).
def _field(obj: dict, key: str, kind: type, parent: str):
    path = f"{parent}.{key}" if parent else key
    if key not in obj:
        raise RecordError(f"{parent + ': ' if parent else ''}no {key!r} key", f"add \"{key}\" ({_KIND_NAMES[kind]})")
    return _typed(obj[key], kind, path)


def _optional(obj: dict, key: str, kind: type, parent: str):
    if obj.get(key) is None:
        return None
    return _typed(obj[key], kind, f"{parent}.{key}" if parent else key)


def _typed(value, kind: type, path: str):
    # bool is an int in Python; JSON keeps them apart, so do we.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RecordError(f"{path}: expected {_KIND_NAMES[kind]}, got {_json_type(value)} ({_preview(value)})",
                          f"write {path} as {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "true or false"}


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _preview(value, width: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _quoted(keys) -> str:
    return ", ".join(repr(k) for k in keys)
