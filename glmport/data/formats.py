"""Readers for the record formats users bring, each turning one JSON object into a list of messages.

A reader raises :class:`RecordError` naming the field at fault (``conversations[2].content``); the
loader adds the file and line. Formats are told apart by their keys, never by the file name; two pairs
share their key (ChatGLM3 ``conversations`` and ShareGPT's, GLM-4 ``messages`` and OpenAI's), and there
the messages tell (:func:`candidate_formats`).

A tool call given as data (ChatGLM3's ``tool`` role, ShareGPT's ``function_call``, OpenAI's ``tool_calls``)
becomes a :class:`glmport.toolcalls.ToolCallMessage` (the tool's name and its arguments), followed by the
result as an observation; tools added without a system message become a
:class:`glmport.toolcalls.ToolsDeclaration`. The template then writes them the way its family does, through
:func:`glmport.toolcalls.family_message`, the same rendering ``glmport chat`` and ``glmport serve`` use.
"""

from __future__ import annotations

import copy
import dataclasses
import json

from glmport.data.records import ROLES, Message, learned_by_default
from glmport.toolcalls import call_message, declare_tools, observation_message

# Keys that identify a format, in the order detection tries them (a record holding the keys of two
# formats is read as the first).
SIGNATURES = {
    "conversations": ("conversations",),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "openai": ("messages",),
    "alpaca": ("instruction", "output"),
    "advertisegen": ("content", "summary"),
    "context-target": ("context", "target"),
}
FORMATS = tuple(SIGNATURES)
# What tells apart the formats that share a key, for the messages that list the signatures.
_NOTES = {"conversations": " of role/content (ChatGLM3)", "sharegpt": " of from/value (ShareGPT)",
          "messages": " (GLM-4)", "openai": " with tool_calls or the tool role (OpenAI)"}
# LLaMA-Factory's ShareGPT speakers (its `from` tags, and the role names it also accepts), as glmport roles.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "observation", "user": "user", "assistant": "assistant", "tool": "observation"}
OPENAI_ROLES = ("system", "user", "assistant", "tool")
_ONE_WAY = ('write every message of a record the same way: {"role", "content"} (ChatGLM3) '
            'or {"from", "value"} (ShareGPT)')


class RecordError(Exception):
    """One record is not valid in its format; ``what`` starts with the field at fault."""

    def __init__(self, what: str, fix: str = ""):
        super().__init__(what)
        self.what = what
        self.fix = fix


def candidate_formats(record: dict) -> tuple[str, ...]:
    """Every format that reads ``record``, the one it is detected as first.

    A format reads a record that has its keys. Where two formats share the key, the messages decide:
    ShareGPT's have ``from``, ChatGLM3's ``role``; OpenAI's have ``tool_calls``, the ``tool`` role, text
    parts or record-level ``tools``, GLM-4's the ``observation`` role, ``tools`` or ``metadata`` on a
    message. A record with the marks of neither is read the same by both; one with the marks of both
    goes to the format whose reader names the message that does not fit.
    """
    found = [name for name, keys in SIGNATURES.items() if all(key in record for key in keys)]
    for base, peer, marks in (("conversations", "sharegpt", _conversations_marks), ("messages", "openai", _messages_marks)):
        if base in found:
            own, theirs = marks(record)
            pair = ((peer, base) if own else (peer,)) if theirs else ((base,) if own else (base, peer))
            index = found.index(base)
            found[index:index + 2] = pair
    return tuple(found)


def detect_format(record: dict) -> str | None:
    candidates = candidate_formats(record)
    return candidates[0] if candidates else None


def _items(value) -> list[dict]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _conversations_marks(record: dict) -> tuple[bool, bool]:
    """(has ChatGLM3 messages, has ShareGPT messages)."""
    items = _items(record["conversations"])
    return any("role" in item for item in items), any("from" in item for item in items)


def _messages_marks(record: dict) -> tuple[bool, bool]:
    """(has GLM-4 marks, has OpenAI marks)."""
    items = _items(record["messages"])
    glm4 = any(item.get("role") == "observation" or item.get("tools") is not None or "metadata" in item
               for item in items)
    openai = record.get("tools") is not None or any(
        item.get("role") == "tool" or item.get("tool_calls") is not None or item.get("tool_call_id") is not None
        or isinstance(item.get("content"), list) for item in items)
    return glm4, openai


def describe_signatures() -> str:
    return "; ".join(f"{name}: {', '.join(keys)}{_NOTES.get(name, '')}" for name, keys in SIGNATURES.items())


def read_record(fmt: str, record) -> list[Message]:
    """The messages of one record in format ``fmt``, checked for types, roles and a learnable reply."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {json_type(record)}",
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
        located.append((declare_tools(tools), "tools"))
    for index, item in enumerate(items):
        field = f"conversations[{index}]"
        _typed(item, dict, field)
        if "role" not in item and "from" in item:
            raise RecordError(f"{field}: a ShareGPT message (from/value) among ChatGLM3 messages (role/content)", _ONE_WAY)
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
    call = _call(name, parameters, f"{field}.parameters", loss)
    # The result is the tool's, not the model's: never a target.
    observation = dataclasses.replace(observation_message(item["observation"]), loss=False)
    return [(call, field), (observation, field)]


def _call(name: str, arguments: dict, field: str, loss: bool | None = None) -> Message:
    """The call as data (:func:`glmport.toolcalls.call_message`); ``field`` names the arguments."""
    for key in arguments:
        if not key.isidentifier():  # the call's content is ChatGLM3's tool_call(name=value), whatever the family
            raise RecordError(f"{field}: parameter name {key!r} is not a Python identifier",
                              "tool parameters are rendered as tool_call(name=value); rename the parameter")
    return call_message(name, arguments, loss)


def _read_messages(record: dict) -> Located:
    items = _typed(record["messages"], list, "messages")
    located: Located = []
    for index, item in enumerate(items):
        field = f"messages[{index}]"
        _typed(item, dict, field)
        if item.get("tool_calls") is not None:
            raise RecordError(f"{field}.tool_calls: OpenAI-style tool calls in a GLM-4 record",
                              "read the file as the openai format (--format openai), or write the call as GLM-4 "
                              "does: an assistant message, then the result with the observation role")
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
            raise RecordError(f"{field}: expected [question, answer] (two strings), got {json_preview(pair)}",
                              "write each earlier turn as [\"question\", \"answer\"]")
        located += [(Message("user", pair[0]), f"{field}[0]"), (Message("assistant", pair[1]), f"{field}[1]")]
    instruction = _field(record, "instruction", str, "")
    extra = _optional(record, "input", str, "") or ""
    prompt = instruction + ("\n" + extra if extra else "")
    located += [(Message("user", prompt), "instruction"), (Message("assistant", _field(record, "output", str, "")), "output")]
    return located


def _read_sharegpt(record: dict) -> Located:
    """LLaMA-Factory's ShareGPT layout: ``from``/``value`` messages, optional ``system`` and ``tools``."""
    items = _typed(record["conversations"], list, "conversations")
    located: Located = []
    system = _optional(record, "system", str, "")
    if system:
        located.append((Message("system", system), "system"))
    for index, item in enumerate(items):
        field = f"conversations[{index}]"
        _typed(item, dict, field)
        if "from" not in item and "role" in item:
            raise RecordError(f"{field}: a ChatGLM3 message (role/content) among ShareGPT messages (from/value)", _ONE_WAY)
        speaker = _field(item, "from", str, field)
        if speaker not in SHAREGPT_ROLES:
            raise RecordError(f"{field}.from: unknown speaker {speaker!r}", f"use one of {', '.join(SHAREGPT_ROLES)}")
        value = _field(item, "value", str, field)
        if speaker == "function_call":
            located += [(call, field) for call in _sharegpt_calls(value, f"{field}.value")]
        else:
            located.append((Message(SHAREGPT_ROLES[speaker], value), field))
    return _with_tools(located, _sharegpt_tools(record))


def _sharegpt_calls(value: str, field: str) -> list[Message]:
    """A ``function_call`` value: ``{"name", "arguments"}`` as JSON text, or a JSON array of them."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{field}: the function call is not valid JSON ({exc.msg}, column {exc.colno})",
                          'write it as JSON text: {"name": "...", "arguments": {...}} (or an array of such calls)') from None
    if isinstance(parsed, list):
        return [_call_message(call, f"{field}[{index}]") for index, call in enumerate(parsed)]
    return [_call_message(parsed, field)]


def _sharegpt_tools(record: dict) -> list | None:
    tools = record.get("tools")
    if tools is None or tools == "":  # LLaMA-Factory files write "" for no tools
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise RecordError(f"tools: not valid JSON ({exc.msg}, column {exc.colno})",
                              "write tools as a JSON array of function definitions, or that array as a string") from None
    return _check_tools(tools, "tools")


def _read_openai(record: dict) -> Located:
    """OpenAI chat messages: ``tool_calls`` on assistant messages, results with the ``tool`` role,
    ``tools`` at the top level, content as a string or a list of text parts."""
    items = _typed(record["messages"], list, "messages")
    tools = _openai_tools(record["tools"], "tools") if record.get("tools") is not None else None
    located: Located = []
    call_ids: list[str | None] = []  # every tool call so far, for the results to answer
    for index, item in enumerate(items):
        field = f"messages[{index}]"
        _typed(item, dict, field)
        role = _field(item, "role", str, field)
        _refuse_glm4_marks(item, role, field)
        if role not in OPENAI_ROLES:
            raise RecordError(f"{field}.role: unknown role {role!r}", f"use one of {', '.join(OPENAI_ROLES)}")
        if role == "assistant":
            located += _openai_assistant(item, field, call_ids)
        elif role == "tool":
            _check_answers_a_call(item, field, call_ids)
            located.append((Message("observation", _openai_content(item, field)), field))
        else:
            located.append((Message(role, _openai_content(item, field)), field))
    return _with_tools(located, tools)


def _refuse_glm4_marks(item: dict, role: str, field: str) -> None:
    if role == "observation":
        raise RecordError(f"{field}.role: 'observation' is GLM-4's role for a tool result, in an OpenAI-style record",
                          'write the result as {"role": "tool", "content": ...} after the assistant message with '
                          "tool_calls, or write the whole record in the GLM-4 form")
    if item.get("tools") is not None:
        raise RecordError(f"{field}.tools: GLM-4 puts tools on the system message; this record is OpenAI-style "
                          "(tool_calls, the tool role)", 'move them to the record\'s top-level "tools"')
    if "metadata" in item:
        raise RecordError(f"{field}.metadata: GLM-4's key in an OpenAI-style record",
                          "give a tool call as tool_calls on the assistant message")


def _openai_assistant(item: dict, field: str, call_ids: list) -> Located:
    """The reply's text (if any), then one assistant message per tool call, in order."""
    loss = _optional(item, "loss", bool, field)
    content = _openai_content(item, field, nullable=True)
    calls = _optional(item, "tool_calls", list, field) or []
    if not calls:
        if content is None:
            raise RecordError(f"{field}.content: null, and the assistant message has no tool_calls",
                              "write the reply as a string, or give the tool_calls it makes")
        return [(Message("assistant", content, loss=loss), field)]
    located: Located = [(Message("assistant", content, loss=loss), field)] if content and content.strip() else []
    for index, call in enumerate(calls):
        where = f"{field}.tool_calls[{index}]"
        _typed(call, dict, where)
        kind = _optional(call, "type", str, where)
        if kind is not None and kind != "function":
            raise RecordError(f"{where}.type: {kind!r} calls are not supported",
                              'only "function" tool calls can be trained: remove the call, or make it a function call')
        function = _field(call, "function", dict, where)
        message = _call_message(function, f"{where}.function")
        located.append((dataclasses.replace(message, loss=loss), where))
        call_ids.append(_optional(call, "id", str, where))
    return located


def _check_answers_a_call(item: dict, field: str, call_ids: list) -> None:
    if not call_ids:
        raise RecordError(f"{field}: a tool result before any tool call",
                          "put the assistant message with the tool_calls before the result, or remove the result")
    answered = _optional(item, "tool_call_id", str, field)
    if answered is not None and answered not in call_ids:
        known = ", ".join(repr(i) for i in call_ids if i is not None) or "none"
        raise RecordError(f"{field}.tool_call_id: {answered!r} answers no earlier tool call (ids so far: {known})",
                          "use the id of the tool call this result answers, or leave tool_call_id out")


def _openai_content(item: dict, field: str, nullable: bool = False) -> str | None:
    """A string, or a list of ``{"type": "text", "text": ...}`` parts joined with newlines (as vLLM joins
    them for a text-only chat template)."""
    if item.get("content") is None:
        if nullable:
            return None
        if "content" not in item:
            raise RecordError(f"{field}: no 'content' key", 'add "content" (a string)')
        raise RecordError(f"{field}.content: null", "write the text as a string")
    content = item["content"]
    if not isinstance(content, list):
        return _typed(content, str, f"{field}.content")
    texts = []
    for index, part in enumerate(content):
        where = f"{field}.content[{index}]"
        _typed(part, dict, where)
        kind = _field(part, "type", str, where)
        if kind != "text":
            raise RecordError(f"{where}.type: {kind!r} parts are not supported (only text)",
                              f"glmport trains on text: remove the {kind} part, or give what it holds as text")
        texts.append(_field(part, "text", str, where))
    return "\n".join(texts)


def _openai_tools(tools, field: str) -> list:
    _typed(tools, list, field)
    for index, tool in enumerate(tools):
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)):
            raise RecordError(f"{field}[{index}]: expected {{\"type\": \"function\", \"function\": {{...}}}}, "
                              f"got {json_preview(tool)}",
                              'write each tool as {"type": "function", "function": {"name": ..., "parameters": {...}}}')
    return _check_tools(tools, field)


def _call_message(call, field: str) -> Message:
    """One tool call ``{"name", "arguments"}`` as ChatGLM3's ``tool`` role gives it (see the module doc)."""
    _typed(call, dict, field)
    name = _field(call, "name", str, field)
    if not name:
        raise RecordError(f"{field}.name: empty tool name", "give the name of the tool that was called")
    if "arguments" not in call:
        raise RecordError(f"{field}: no 'arguments' key", 'add "arguments": the call\'s parameters as an object ({} for none)')
    arguments, path = call["arguments"], f"{field}.arguments"
    if isinstance(arguments, str):  # OpenAI writes the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}: not valid JSON ({exc.msg}, column {exc.colno})",
                              'write the arguments as a JSON object, or as one in a string: "{\\"city\\": \\"Paris\\"}"') from None
    _typed(arguments, dict, path)
    return _call(name, arguments, path)


def _with_tools(located: Located, tools: list | None) -> Located:
    """Declare ``tools`` on the system message, or on a :class:`glmport.toolcalls.ToolsDeclaration` when there
    is none or it is empty (as ``glmport serve`` declares a request's tools: :func:`glmport.toolcalls.declare_tools`)."""
    if tools is None:
        return located
    for index, (message, field) in enumerate(located):
        if message.role == "system":
            declared = dataclasses.replace(message, tools=tools) if message.content else declare_tools(tools)
            located[index] = (declared, field)
            return located
    return [(declare_tools(tools), "tools"), *located]


def _pair_reader(prompt_key: str, answer_key: str):
    def read(record: dict) -> Located:
        return [
            (Message("user", _field(record, prompt_key, str, "")), prompt_key),
            (Message("assistant", _field(record, answer_key, str, "")), answer_key),
        ]

    return read


READERS = {
    "conversations": _read_conversations,
    "sharegpt": _read_sharegpt,
    "messages": _read_messages,
    "openai": _read_openai,
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
        raise RecordError(f"{path}: expected {_KIND_NAMES[kind]}, got {json_type(value)} ({json_preview(value)})",
                          f"write {path} as {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "true or false"}


def json_type(value) -> str:
    """How a JSON value's type reads in an error message (shared with glmport serve)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def json_preview(value, width: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _quoted(keys) -> str:
    return ", ".join(repr(k) for k in keys)
