"""Tool calls in the GLM families' own formats: reading the model's calls, writing calls, tools and results back.

The two formats (the tool format of a family is its template's ``tool_format``; families without one, such as
ChatGLM-6B and ChatGLM2-6B, have no tool calls):

* **chatglm3** (ChatGLM3-6B, its PROMPT docs and ``process_response`` in the remote code): the tools are JSON
  after the system text; a call is an assistant turn whose metadata line is the tool's name and whose content
  is a fenced ``tool_call(name=value, ...)`` block::

      <|assistant|>get_weather
      ```python
      tool_call(city='Paris')
      ```<|observation|>
      {"weather": "sunny"}

* **glm4** (GLM-4-9B-chat, its chat template and OpenAI API demo): the tools are declared on the system message
  (the template writes its tool prompt), and a call is the tool's name on the metadata line followed by the
  arguments as a JSON object::

      <|assistant|>get_weather
      {"city": "Paris"}<|observation|>
      {"weather": "sunny"}

Either way the model stops at ``<|observation|>`` and the tool's result follows as an ``observation`` message.

This module is the one rendering of tools, calls and results for each family: ``glmport chat``, ``glmport
serve`` and training all go through it. The data readers (:mod:`glmport.data.formats`) keep a call given as
data (OpenAI ``tool_calls``, ShareGPT ``function_call``, ChatGLM3's ``tool`` role) as a
:class:`ToolCallMessage` holding its arguments, and the templates write it with :func:`family_message`, so
a model is trained on exactly the prompt it is later served with. Both argument syntaxes are still read
for both families (models fine-tuned by older glmport versions wrote ``tool_call(...)`` blocks for GLM-4).

The public functions, for ``glmport chat`` and for anything that serves a model (an OpenAI-style server):

* :func:`parse_tool_call` - the model's reply text to a :class:`ToolCall` (or None for a plain reply);
* :func:`format_tool_call` - a call (name, arguments) as the assistant message the family writes;
* :func:`family_tools` / :func:`tools_message` - OpenAI-style tool schemas as the family declares them;
* :func:`observation_message` - a tool's result as the message that follows a call;
* :func:`family_message` - a message of any data format as the family renders it (the templates' entry);
* :func:`read_tools_file` - a ``--tools`` file, checked.

Arguments are read with :mod:`ast` and :mod:`json` only: nothing the model writes is ever executed (upstream's
demos ``eval`` it).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmport.data.records import TOOLS_PREAMBLE, Message
from glmport.errors import DataError, Problem

TOOL_FORMATS = ("chatglm3", "glm4")
ASSISTANT_MARK = "<|assistant|>"  # a reply decoded with its special tokens may hold several assistant turns


@dataclass
class ToolCall:
    """One call the model made. ``arguments`` is None when ``content`` holds no readable arguments: then
    ``error`` says why (ChatGLM3's ``interpreter`` writes code, not arguments; a malformed call)."""

    name: str
    arguments: dict[str, Any] | None
    content: str  # the call as the model wrote it, after the name line
    error: str | None = None

    def message(self) -> Message:
        """The call as it stays in the conversation: exactly what the model wrote."""
        return Message("assistant", self.content, metadata=self.name)

    def to_openai(self, call_id: str = "call_0") -> dict:
        """The call as an OpenAI ``tool_calls`` entry (arguments as JSON text)."""
        arguments = json.dumps(self.arguments if self.arguments is not None else {}, ensure_ascii=False)
        return {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": arguments}}

    def describe(self) -> str:
        """``get_weather {"city": "Paris"}``: one line for a person."""
        if self.arguments is not None:
            return f"{self.name} {json.dumps(self.arguments, ensure_ascii=False)}"
        return f"{self.name} {self.content.strip()}"


def split_metadata(text: str) -> tuple[str, str]:
    """A GLM reply turn is ``metadata \\n content``: (metadata, content), metadata stripped. A plain answer
    has an empty metadata line; a tool call names the tool there."""
    if "\n" not in text:
        return "", text
    metadata, content = text.split("\n", 1)
    return metadata.strip(), content


def parse_tool_call(family: str, text: str) -> ToolCall | None:
    """The tool call in a reply of ``family``'s format, or None when the reply is a plain answer.

    ``text`` is what the model wrote after the prompt's ``<|assistant|>`` token, without the stop token; when
    it holds further ``<|assistant|>`` turns (decoded with special tokens), the last one is the call, as in
    upstream's ``process_response``. A family without a tool format never makes calls."""
    if family not in TOOL_FORMATS:
        return None
    metadata, content = split_metadata(text.rsplit(ASSISTANT_MARK, 1)[-1])
    if not metadata:
        return None
    arguments, error = read_arguments(content)
    return ToolCall(metadata, arguments, content, error)


def read_arguments(content: str) -> tuple[dict[str, Any] | None, str | None]:
    """The arguments of a call's content: a fenced ``tool_call(k=v, ...)`` block (ChatGLM3) or a JSON object
    (GLM-4); (None, why) when it is neither."""
    body = _unfenced(content.strip())
    if body.startswith("tool_call"):
        return _python_arguments(body)
    if body.startswith("{"):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as exc:
            try:  # a Python dict literal (single quotes), as older demos wrote it
                value = ast.literal_eval(body)
            except (ValueError, SyntaxError):
                return None, f"the arguments are not valid JSON ({exc.msg}, column {exc.colno})"
        if not isinstance(value, dict):
            return None, "the arguments are not a JSON object"
        return value, None
    return None, "neither a tool_call(...) block nor a JSON object of arguments"


def _unfenced(text: str) -> str:
    """The inside of a ```fenced``` block (its language tag dropped), or the text as it is."""
    if not text.startswith("```"):
        return text
    lines = text.split("\n")
    if len(lines) >= 2 and lines[-1].strip() == "```":
        return "\n".join(lines[1:-1]).strip()
    return "\n".join(lines[1:]).strip().removesuffix("```").strip()


def _python_arguments(body: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError as exc:
        return None, f"the tool_call(...) block is not valid Python ({exc.msg})"
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "tool_call"):
        return None, "the block is not one tool_call(...) expression"
    if tree.args or any(keyword.arg is None for keyword in tree.keywords):
        return None, "tool_call(...) takes its arguments by name only"
    arguments = {}
    for keyword in tree.keywords:
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            return None, f"the value of {keyword.arg} is not a literal"
    return arguments, None


# --- writing: calls, tools, results -------------------------------------------------------------------------

def python_tool_call(arguments: dict[str, Any]) -> str:
    """``arguments`` as ChatGLM3's fenced block: ```python\\ntool_call(city='Paris')\\n```."""
    for key in arguments:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"argument name {key!r} is not a Python identifier: ChatGLM3 writes calls as "
                             "tool_call(name=value)")
    keywords = [ast.keyword(arg=key, value=_literal(value)) for key, value in arguments.items()]
    call = ast.Call(func=ast.Name(id="tool_call", ctx=ast.Load()), args=[], keywords=keywords)
    return "```python\n" + ast.unparse(call) + "\n```"


def _literal(value) -> ast.expr:
    if isinstance(value, list):
        return ast.List(elts=[_literal(v) for v in value], ctx=ast.Load())
    if isinstance(value, dict):
        return ast.Dict(keys=[ast.Constant(k) for k in value], values=[_literal(v) for v in value.values()])
    return ast.Constant(value)


def format_tool_call(family: str, name: str, arguments: dict[str, Any] | str) -> Message:
    """The assistant message with which ``family`` calls ``name`` (e.g. an OpenAI ``tool_calls`` entry of a
    conversation's history, put back into the model's format). ``arguments``: an object, or JSON text of one
    (OpenAI sends them as text); anything else is a ``ValueError`` saying what is wrong."""
    _require_tools(family)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"the arguments are not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments are not a JSON object (got {type(arguments).__name__})")
    content = python_tool_call(arguments) if family == "chatglm3" else json.dumps(arguments, ensure_ascii=False)
    return Message("assistant", content, metadata=name)


def _equal_as_message(self, other) -> bool:
    """The messages below equal the plain :class:`Message` with the same fields: what they add is how a
    family renders them, not what they say (a call's ``content`` is its arguments in ChatGLM3's form)."""
    if not isinstance(other, Message):
        return NotImplemented
    return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(Message))


@dataclass(eq=False)
class ToolCallMessage(Message):
    """An assistant message calling ``metadata`` with ``arguments``, as data: each family writes it its own way
    (:func:`family_message`). ``content`` holds ChatGLM3's block, for whatever reads messages without a family
    (conversion to ChatGLM3 records, statistics)."""

    arguments: dict[str, Any] = field(default_factory=dict)
    __eq__ = _equal_as_message


@dataclass(eq=False)
class ToolsDeclaration(Message):
    """A system message glmport adds only to declare tools (the data or request had no system message): its
    ``content`` is ChatGLM3's tool preamble, which GLM-4 leaves out (its chat template writes its own tool
    prompt)."""

    __eq__ = _equal_as_message


def call_message(name: str, arguments: dict[str, Any], loss: bool | None = None) -> ToolCallMessage:
    """A call given as data; ``ValueError`` when an argument name cannot be written as ChatGLM3's block."""
    return ToolCallMessage("assistant", python_tool_call(arguments), metadata=name, loss=loss, arguments=arguments)


def declare_tools(tools: list[dict], system: str | None = None) -> Message:
    """The system message declaring ``tools``: on ``system``'s text, or on a :class:`ToolsDeclaration`."""
    if system:
        return Message("system", system, tools=tools)
    return ToolsDeclaration("system", TOOLS_PREAMBLE, tools=tools)


def family_message(family: str, message: Message) -> Message:
    """``message`` as ``family`` renders it: a :class:`ToolCallMessage` as the family's call turn (its
    ``loss`` kept), tools declared the family's way (:func:`family_tools`); anything else as it is."""
    if isinstance(message, ToolCallMessage):
        return dataclasses.replace(format_tool_call(family, message.metadata, message.arguments), loss=message.loss)
    if message.tools is None:
        return message
    content = "" if family == "glm4" and isinstance(message, ToolsDeclaration) else message.content
    return Message(message.role, content, metadata=message.metadata, loss=message.loss,
                   tools=family_tools(family, message.tools))


def observation_message(result: Any) -> Message:
    """A tool's result as the message after the call: text as it is, anything else as JSON (as ChatGLM3's
    ``tool`` role data has it)."""
    return Message("observation", result if isinstance(result, str) else json.dumps(result, ensure_ascii=False))


def openai_function(tool: dict) -> dict:
    """The function of a tool given either way: ``{"type": "function", "function": {...}}`` or the bare
    ``{"name", "description", "parameters"}``."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def family_tools(family: str, tools: list[dict]) -> list[dict]:
    """Tools as ``family`` declares them: ChatGLM3 lists the bare functions (name, description, parameters,
    as its README and tool demo do); GLM-4's template reads ``{"type": "function", "function": {...}}``."""
    _require_tools(family)
    functions = [openai_function(tool) for tool in tools]
    if family == "chatglm3":
        return functions
    return [tool if isinstance(tool.get("function"), dict) else {"type": "function", "function": tool}
            for tool in tools]


def tools_message(family: str, tools: list[dict], system: str | None = None) -> Message:
    """The system message that declares ``tools``: ChatGLM3 puts them after its tool preamble (or after your
    own system text), GLM-4 on the system message for its template's tool prompt."""
    return family_message(family, declare_tools(tools, system))


def tool_names(tools: list[dict]) -> list[str]:
    return [str(openai_function(tool).get("name")) for tool in tools]


def _require_tools(family: str) -> None:
    if family not in TOOL_FORMATS:
        raise ValueError(f"the {family} family has no tool format (tool formats: {', '.join(TOOL_FORMATS)})")


def read_tools_file(path: Path) -> list[dict]:
    """A ``--tools`` file: a JSON array of tools, each ``{"type": "function", "function": {"name", ...}}``
    (OpenAI) or ``{"name", "description", "parameters"}`` (ChatGLM3); errors name the file and the entry."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError("tools file not found", [Problem("--tools", f"no such file: {path}",
                                                         "give a JSON file with an array of tools")]) from None
    except json.JSONDecodeError as exc:
        raise DataError("tools file is not valid JSON", [Problem(f"{path}:{exc.lineno}", f"{exc.msg} (column {exc.colno})",
                                                                 "fix the JSON there")]) from None
    if isinstance(value, dict) and isinstance(value.get("tools"), list):
        value = value["tools"]  # {"tools": [...]}, as an OpenAI request body has it
    if not isinstance(value, list) or not value:
        raise DataError("tools file holds no tools", [Problem(str(path), "expected a non-empty JSON array of tools",
                                                              'write [{"type": "function", "function": {"name": ..., '
                                                              '"description": ..., "parameters": {...}}}]')])
    problems = []
    for index, tool in enumerate(value):
        function = openai_function(tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            problems.append(Problem(f"{path}: tool {index}", "no function name",
                                    'give each tool {"type": "function", "function": {"name": ...}} or {"name": ...}'))
        elif "parameters" in function and not isinstance(function["parameters"], dict):
            problems.append(Problem(f"{path}: tool {index} ({function['name']})", "parameters is not an object",
                                    "write parameters as a JSON schema object"))
    if problems:
        raise DataError(f"{path}: {len(problems)} invalid tool(s)", problems)
    return value
