"""The one in-memory shape every data format is read into: a conversation of role-tagged messages.

Readers (``formats.py``) turn each format's records into :class:`Conversation`; templates
(``templates.py``) turn conversations into token ids. Nothing here knows about tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "observation")

# ChatGLM3's tool preamble (README / Nov-2023 demo). A conversations record with `tools` becomes a system
# message with this content and the tools attached; the ChatGLM3 template renders it as
# preamble + "\n" + tools as JSON, which is exactly the text the demo inserted.
TOOLS_PREAMBLE = "Answer the following questions as best as you can. You have access to the following tools:"


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant" | "observation"
    content: str
    metadata: str = ""  # the tool name of a ChatGLM3 tool call, else ""
    loss: bool | None = None  # None: the template's default for the role
    tools: list | None = None  # tools declared on a system message


@dataclass
class Conversation:
    messages: list[Message]
    source: str  # "data/train.jsonl:7" or "data/train.json[12] (line 40)"
    record: dict | None = None  # the record as read, for conversions that keep a format's own fields

    def count(self, role: str) -> int:
        return sum(1 for m in self.messages if m.role == role)


def learned_by_default(message: Message) -> bool:
    """Whether the model learns ``message``: its ``loss`` flag, or else its role's default.

    Assistant messages are learned unless marked ``"loss": false``; system and user never. Observations
    are not learned unless marked ``"loss": true``: they are what a tool returned, for the model to read,
    not to write. That is the ChatGLM3 README and its Nov-2023 demo; the current ChatGLM3 script learns
    them only as a side effect of `role not in (system, user)` (while rejecting the tool data that
    produces them), and GLM-4 learns assistant messages only.
    """
    if message.role == "assistant":
        return message.loss is not False
    if message.role == "observation":
        return message.loss is True
    return False


def to_conversations_record(conv: Conversation) -> dict:
    """The ChatGLM3 ``conversations`` form of ``conv``; reading it back gives the same messages.

    Besides the README keys (role, content, loss, record-level tools) this writes two keys the glmport
    reader accepts so that nothing is lost: ``metadata`` on a message and ``tools`` on a system message
    whose text is not the ChatGLM3 tool preamble (GLM-4 data).
    """
    record: dict = {}
    messages = list(conv.messages)
    first = messages[0] if messages else None
    if first is not None and first.role == "system" and first.tools is not None and first.content == TOOLS_PREAMBLE:
        record["tools"] = first.tools
        messages = messages[1:]
    record["conversations"] = [message_record(m) for m in messages]
    # Keep the README's key order: conversations first, then tools.
    return {key: record[key] for key in ("conversations", "tools") if key in record}


def message_record(message: Message) -> dict:
    """One message as a record: role and content, then metadata, tools and loss where it has them."""
    out: dict = {"role": message.role, "content": message.content}
    if message.metadata:
        out["metadata"] = message.metadata
    if message.tools is not None:
        out["tools"] = message.tools
    if message.loss is not None:
        out["loss"] = message.loss
    return out
