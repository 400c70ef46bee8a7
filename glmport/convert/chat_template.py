"""Chat templates (Jinja, for ``tokenizer_config.json``) that reproduce glmport's prompt layouts id for id.

A native folder is served by tools that know nothing of glmport (vLLM, TGI, ``apply_chat_template``): they
render the template to text and tokenize that text in one call, special tokens included. The layouts in
:mod:`glmport.data.templates` are built from several encode calls, and with SentencePiece (ChatGLM2 and
ChatGLM3) every call starts with a dummy-prefix ``▁``. The converted tokenizer starts every stretch of text
between two special tokens with it (SentencePiece's own rule, applied per stretch), so a ChatGLM3 message
header (``<|role|>`` + metadata + ``\\n``) comes out right by itself; the content, a second call upstream, is
written after one space, which tokenizes as that second ``▁``. A newline, where the two calls meet, is a
byte that no piece contains, so nothing merges across it. ChatGLM2's prompt has no special tokens between
its parts; a part with a dummy prefix of its own is written after a space the same way.

Messages are dicts with ``role`` (system, user, assistant, observation), ``content``, optionally
``metadata`` (ChatGLM3 / GLM-4: the tool a call names) and ``tools`` (on a system message). ChatGLM3 also
takes the ``tools`` argument of ``apply_chat_template``: a system message with ChatGLM3's tool preamble,
as glmport reads a ``conversations`` record with tools.

GLM-4 folders keep the model's own template. The July 2024 GLM-4 tokenizer has none: it renders chats in
Python. :func:`glm4_from_python` learns that rendering from the tokenizer itself (it renders probe
conversations and cuts them at the probes' text), so the texts of GLM-4's tool prompt are read from the
user's model, never stored here.
"""

from __future__ import annotations

import json

from glmport.data.records import TOOLS_PREAMBLE, Message
from glmport.errors import ModelError, Problem

ROLES = ("system", "user", "assistant", "observation")


def literal(text: str) -> str:
    """A Jinja string literal of ``text`` (control characters escaped; Jinja decodes them back)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


_ROLE_CHECK = (
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'observation'] -%}"
    "{{- raise_exception('role ' + message['role'] + ' is not one of system, user, assistant, observation') -}}"
    "{%- endif -%}"
)
_METADATA = "(message['metadata'] if message['metadata'] is defined and message['metadata'] else '')"


def chatglm3(*, dummy_prefix: bool) -> str:
    """``[gMASK]sop``, then per message ``<|role|>`` + metadata + ``\\n`` + content (a system message's tools
    follow its text as indented JSON), then ``<|assistant|>`` for a generation prompt."""
    gap = literal(" " if dummy_prefix else "")
    return "".join((
        "{{- '[gMASK]sop' -}}",
        "{%- set ns = namespace(tools_written=false) -%}",
        "{%- for message in messages -%}{%- if message['tools'] is defined and message['tools'] is not none -%}"
        "{%- set ns.tools_written = true -%}{%- endif -%}{%- endfor -%}",
        "{%- if tools is defined and tools and not ns.tools_written -%}",
        "{{- '<|system|>\\n' + ", gap, " + ", literal(TOOLS_PREAMBLE + "\n"), " + (tools | tojson(indent=4)) -}}",
        "{%- endif -%}",
        "{%- for message in messages -%}", _ROLE_CHECK,
        "{%- set content = message['content'] if message['content'] is not none else '' -%}",
        "{%- if message['tools'] is defined and message['tools'] is not none -%}",
        "{%- set content = content + '\\n' + (message['tools'] | tojson(indent=4)) -%}{%- endif -%}",
        "{{- '<|' + message['role'] + '|>' + ", _METADATA, " + '\\n' -}}",
        "{%- if content -%}{{- ", gap, " + content -}}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}",
    ))


def chatglm2(*, dummy_prefix: bool) -> str:
    """``[gMASK]sop``, an optional system text + ``\\n\\n``, then rounds ``[Round N]\\n\\n问：{q}\\n\\n答：{a}``
    joined by ``\\n\\n`` (glmport's ChatGLM2 layout: the system text, the first round and each answer are
    encode calls of their own, a later round continues without a dummy prefix). No tools, tool calls or
    observations."""
    gap = literal(" " if dummy_prefix else "")
    question = literal("\n\n问：")
    answer = literal("\n\n答：")
    return "".join((
        "{{- '[gMASK]sop ' -}}",  # the space ends the word sop; the tokenizer drops it (see .tokenizer._added)
        "{%- set ns = namespace(round=0, written=false) -%}",
        "{%- for message in messages -%}",
        "{%- set content = message['content'] if message['content'] is not none else '' -%}",
        "{%- if message['role'] == 'system' and loop.first -%}",
        "{%- if content -%}{{- content + '\\n\\n' -}}{%- set ns.written = true -%}{%- endif -%}",
        "{%- elif message['role'] == 'user' -%}{%- set ns.round = ns.round + 1 -%}",
        # a later round continues the text without a dummy prefix of its own (glmport's ChatGLM2 layout)
        "{{- ((", gap, " if ns.written else '') if ns.round == 1 else '\\n\\n') + '[Round ' ~ ns.round ~ ']' + ",
        question, " + content + ", answer, " -}}{%- set ns.written = true -%}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{%- if content -%}{{- (", gap, " if ns.written else '') + content -}}{%- set ns.written = true -%}{%- endif -%}",
        "{%- else -%}{{- raise_exception('ChatGLM2-6B prompts are [Round N] questions and answers: no '",
        " + message['role'] + ' message here') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ))


def known_differences(family: str, dummy_prefix: bool) -> list[str]:
    """Where a chat template cannot give the ids of glmport's template module, and why.

    ChatGLM2's ``sop`` is followed by text, where a whole-word match cannot see it: the template writes
    ``sop `` and the tokenizer drops the whitespace after the word (:func:`glmport.convert.tokenizer._added`),
    a system text's leading whitespace with it. (Where ChatGLM2's parts meet, a newline or a dummy prefix
    separates them, so the rest comes out exact.)"""
    if family != "chatglm2":
        return []
    return ["a system message that begins with whitespace: the chat template loses that whitespace"]


# ---------------------------------------------------------------------------------------- GLM-4, Python

_PROBES = [{"type": "function", "function": {
    "name": f"glmport_probe_{letter}", "description": f"probe {letter}",
    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}}
    for letter in ("a", "b")]
_OTHER_TOOL_TYPES = ("python", "simple_browser", "cogview")  # the built-in tools GLM-4's renderer knows


def _render(tokenizer, messages: list[dict]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return text[0] if isinstance(text, list) else text


def _cannot_learn(what: str) -> ModelError:
    return ModelError("cannot learn the chat layout of this GLM-4 tokenizer", [Problem(
        "tokenization_chatglm.py", f"its Python apply_chat_template {what}",
        "add the model's chat_template to tokenizer_config.json (later GLM-4 downloads have one) and convert again")])


def glm4_from_python(tokenizer) -> str:
    """The Jinja equivalent of a GLM-4 tokenizer that renders chats in Python (glm-4-9b-chat, July 2024).

    The renderer writes ``[gMASK]<sop>``, then for a message with tools a system turn (an introduction,
    then one block per tool), then ``<|role|>metadata\\ncontent`` for every message with content. The fixed
    texts are cut out of probe renderings; :func:`glmport.convert.native.verify_chat_template` then checks the
    result against the renderer on sample conversations."""
    def block(name: str, function: dict) -> str:
        return f"{name}\0{json.dumps(function, ensure_ascii=False, indent=4)}"

    from glmport.data.templates import _overrides_chat_template

    if not _overrides_chat_template(tokenizer):
        raise ModelError("the GLM-4 tokenizer has no chat template", [Problem(
            "tokenizer_config.json", "no chat_template, and the tokenizer does not render chats itself",
            "use the tokenizer_config.json of the model download (it holds the chat_template)")])
    one = _render(tokenizer, [{"role": "system", "content": "", "tools": _PROBES[:1]}])
    two = _render(tokenizer, [{"role": "system", "content": "", "tools": _PROBES}])
    if not two.startswith(one):
        raise _cannot_learn("does not write one block per tool")
    second = two[len(one):]
    name, function = _PROBES[1]["function"]["name"], _PROBES[1]["function"]
    dumped = json.dumps(function, ensure_ascii=False, indent=4)
    if second.count(dumped) != 1 or second.replace(dumped, "").count(name) != 1:
        raise _cannot_learn("writes a tool block without the tool's name and JSON")
    before, after = second.split(dumped)
    lead, between = before.split(name)
    first_block = lead + _PROBES[0]["function"]["name"] + between + json.dumps(_PROBES[0]["function"],
                                                                                ensure_ascii=False, indent=4) + after
    prefix = _render(tokenizer, [])
    if not one.endswith(first_block) or not one.startswith(prefix):
        raise _cannot_learn("writes the first tool differently from the others")
    intro = one[len(prefix): len(one) - len(first_block)]
    branches = [
        "{%- if tool['type'] == 'function' -%}{{- ", literal(lead), " + tool['function']['name'] + ",
        literal(between), " + (tool['function'] | tojson(indent=4)) + ", literal(after), " -}}",
    ]
    for kind in _OTHER_TOOL_TYPES:
        try:
            rendered = _render(tokenizer, [{"role": "system", "content": "", "tools": [_PROBES[0], {"type": kind}]}])
        except Exception:  # a revision without this built-in tool
            continue
        if rendered.startswith(one):
            branches += ["{%- elif tool['type'] == ", literal(kind), " -%}{{- ", literal(rendered[len(one):]), " -}}"]
    branches.append("{%- else -%}{{- raise_exception('unknown tool type ' + tool['type']) -}}{%- endif -%}")
    probe = _render(tokenizer, [{"role": "user", "content": "glmport", "metadata": "probe"}])
    if probe != prefix + "<|user|>probe\nglmport":
        raise _cannot_learn("writes messages differently from <|role|>metadata\\ncontent")
    return "".join((
        "{{- ", literal(prefix), " -}}",
        "{%- for message in messages -%}", _ROLE_CHECK,
        "{%- if message['tools'] is defined and message['tools'] -%}{{- ", literal(intro), " -}}",
        "{%- for tool in message['tools'] -%}", *branches, "{%- endfor -%}{%- endif -%}",
        "{%- if message['content'] -%}{{- '<|' + message['role'] + '|>' + ", _METADATA,
        " + '\\n' + message['content'] -}}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}",
    ))


def expected_ids(template, messages: list[Message]) -> tuple[list[int], bool]:
    """What glmport's template module makes of ``messages`` (a :class:`glmport.data.templates.Template`), and
    whether a chat template renders it with ``add_generation_prompt``: a conversation that ends with a reply
    is the dialogue of a training sample (without the sample's closing token), any other asks for a reply."""
    from glmport.data.records import Conversation

    if messages[-1].role != "assistant":
        return template.prompt_ids(messages), True
    rendered = template.render(Conversation(messages, "the conversation"))
    ids = rendered.flatten()[0]
    return ids[: len(ids) - len(rendered.suffix)], False


def as_dicts(messages: list[Message]) -> list[dict]:
    """glmport messages as the dicts a chat template reads."""
    out = []
    for message in messages:
        item: dict = {"role": message.role, "content": message.content}
        if message.metadata:
            item["metadata"] = message.metadata
        if message.tools is not None:
            item["tools"] = message.tools
        out.append(item)
    return out


# ---------------------------------------------------------------------------- sample conversations

_WEATHER = {"name": "get_weather", "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                           "required": ["city"]}}
_CALL = "```python\ntool_call(city='北京')\n```"


def sample_conversations(family: str) -> list[tuple[str, list[Message]]]:
    """(name, messages) that exercise a family's layout: system, several turns, tools. Used to verify a
    converted chat template against glmport's template module."""
    m = Message
    plain = [
        ("one question", [m("user", "你好，请介绍一下你自己。")]),
        ("system and turns", [m("system", "You are a helpful assistant."), m("user", "What is 2 + 2?"),
                              m("assistant", "2 + 2 = 4."), m("user", "  And  3 + 3 ?\n")]),
        ("spaces and newlines", [m("user", "line one\n\n  indented\tline\n"), m("assistant", "  ok"),
                                 m("user", "再来一次 ...")]),
    ]
    if family == "chatglm2":
        return plain + [("system only then a question", [m("system", "你是一个助手"), m("user", "1+1=?")])]
    if family == "glm4":
        tools = [{"type": "function", "function": _WEATHER}]
        calls = [m("system", "", tools=tools), m("user", "北京天气怎么样？"),
                 m("assistant", json.dumps({"city": "北京"}, ensure_ascii=False), metadata="get_weather"),
                 m("observation", json.dumps({"temperature": 21}, ensure_ascii=False))]
    else:
        calls = [m("system", TOOLS_PREAMBLE, tools=[_WEATHER]), m("user", "北京天气怎么样？"),
                 m("assistant", _CALL, metadata="get_weather"),
                 m("observation", json.dumps({"temperature": 21}, ensure_ascii=False))]
    return plain + [("tool call and result", calls),
                    ("answer after a tool", [*calls, m("assistant", "北京现在 21 度。"), m("user", "谢谢")])]
