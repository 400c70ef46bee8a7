"""Chat templates: conversations to the token ids and labels ChatGLM3 and GLM-4 are trained on.

The layouts reproduce the official fine-tuning recipes id for id (ChatGLM3 ``finetune_hf.py``,
GLM-4 ``finetune_demo/finetune.py``), including the one-token right shift of the loss mask. Only generic
tokenizer calls are used (``convert_tokens_to_ids`` for the special tokens, ``encode(text,
add_special_tokens=False)`` for text), so the same code serves the remote-code tokenizers, the native
fast ones and glmport's tiny test tokenizers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from glmport.data.records import Conversation, Message, learned_by_default
from glmport.data.spans import IGNORE_INDEX, Rendered, Span, shifted_labels
from glmport.data.truncation import fit_to_budget
from glmport.errors import ConfigError, DataError, ModelError, Problem

TEMPLATES = ("chatglm3", "glm4")
# Where [gMASK] sits tells the families apart (ChatGLM3: after the 64789 SentencePiece pieces;
# GLM-4: after the 151329 tiktoken ranks).
GMASK_IDS = {64790: "chatglm3", 151331: "glm4"}


@dataclass
class TrainSample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX (-100) where there is no loss
    trimmed_tokens: int = 0
    trimmed_messages: int = 0


@dataclass
class EvalSample:
    prompt_ids: list[int]
    output_ids: list[int]
    source: str = ""


class Template:
    """What both families share: the sample layout around the per-message rendering."""

    name = ""
    stop_token_ids: list[int]
    pad_token_id: int

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.role_ids = {role: self._special(f"<|{role}|>") for role in ("system", "user", "assistant", "observation")}
        self._metadata_lines: dict[str, list[int]] = {}
        self.prefix: list[int] = []
        self.suffix: list[int] = []  # closes a training sample; also ends an eval target

    def render_message(self, message: Message) -> tuple[list[int], list[int], list[int]]:
        """(ids, head, content) of one message; the family's layout."""
        raise NotImplementedError

    def render(self, conv: Conversation) -> Rendered:
        spans = []
        for message in conv.messages:
            ids, head, content = self.render_message(message)
            learn = learned_by_default(message)
            spans.append(Span(message.role, ids, head, content, learn=learn, learn_role=learn))
        learned = [i for i, span in enumerate(spans) if span.learn and span.ids]
        if not learned:
            raise DataError(f"{conv.source}: nothing to learn", [Problem(
                conv.source, "no message carries loss (every assistant message has \"loss\": false)",
                "set loss true (or remove the key) on at least one assistant message")])
        return Rendered(list(self.prefix), spans, list(self.suffix), answer=learned[-1])

    def untruncated_sample(self, conv: Conversation) -> TrainSample:
        ids, mask = self.render(conv).flatten()
        return TrainSample(ids, shifted_labels(ids, mask))

    def train_sample(self, conv: Conversation, max_input_length: int, max_output_length: int) -> TrainSample:
        rendered = self.render(conv)
        full_length = len(rendered)
        budget = max_input_length + max_output_length + 1  # as upstream
        dropped = fit_to_budget(rendered, budget, max_input_length, conv.source)
        ids, mask = rendered.flatten()
        return TrainSample(ids, shifted_labels(ids, mask), full_length - len(ids), dropped)

    def eval_samples(self, conv: Conversation, max_input_length: int, max_output_length: int) -> list[EvalSample]:
        """One sample per reply to generate: the prompt up to and including its ``<|assistant|>`` token,
        and the reply's tokens after the role token followed by the stop token."""
        rendered = self.render(conv)
        samples = []
        for index in self._eval_targets(rendered):
            context = [token for span in rendered.spans[:index] for token in span.ids]
            # Keep the most recent context (upstream keeps the oldest, losing the question itself).
            room = max(max_input_length - len(rendered.prefix), 0)
            context = context[len(context) - room:] if len(context) > room else context
            prompt = rendered.prefix + context + [self.role_ids["assistant"]]
            output = (rendered.spans[index].ids[1:] + self.suffix)[:max_output_length]
            samples.append(EvalSample(prompt, output, conv.source))
        return samples

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The ids that ask for the next assistant reply after ``messages`` (inference)."""
        ids = list(self.prefix)
        for message in messages:
            ids += self.render_message(message)[0]
        return ids + [self.role_ids["assistant"]]

    def _eval_targets(self, rendered: Rendered) -> list[int]:
        # Replies marked "loss": false are examples of what not to learn: no point scoring against them.
        return [i for i, span in enumerate(rendered.spans) if span.role == "assistant" and span.learn and span.ids]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _head(self, role: str, metadata: str) -> list[int]:
        """``<|role|>`` + encode(metadata + "\\n"); cached, as nearly every message has the same one."""
        if metadata not in self._metadata_lines:
            self._metadata_lines[metadata] = self._encode(metadata + "\n")
        return [self.role_ids[role], *self._metadata_lines[metadata]]

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        unknown = self.tokenizer.unk_token_id
        if token_id is None or (unknown is not None and token_id == unknown):
            raise ModelError(f"the tokenizer has no {token} token", [Problem(
                "tokenizer", f"the {self.name} template needs {token}, which this tokenizer does not know",
                "use the tokenizer of a ChatGLM3 / GLM-4 model, or the template that matches it (--template)")])
        return token_id


class ChatGLM3Template(Template):
    """``[gMASK] sop`` + per message ``<|role|>`` + encode(metadata + "\\n") + encode(content) + ``</s>``."""

    name = "chatglm3"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.prefix = [self._special("[gMASK]"), self._special("sop")]
        eos = tokenizer.eos_token_id
        self.suffix = [eos]
        self.stop_token_ids = [eos, self.role_ids["user"], self.role_ids["observation"]]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def render_message(self, message):
        text = message.content
        if message.tools is not None:
            # As ChatGLM3's build_chat_input: the tools follow the system text as indented JSON.
            text += "\n" + json.dumps(message.tools, indent=4, ensure_ascii=False)
        # Two encode calls, as upstream: with SentencePiece the content gets its own dummy prefix.
        head = self._head(message.role, message.metadata)
        content = self._encode(text)
        return head + content, head, content


class GLM4Template(Template):
    """``[gMASK] <sop>`` + per message ``<|role|>`` + encode(metadata + "\\n" + content) + ``<|user|>``."""

    name = "glm4"

    def __init__(self, tokenizer, combine: bool = False):
        super().__init__(tokenizer)
        self.combine = combine
        self.prefix = [self._special("[gMASK]"), self._special("<sop>")]
        end_of_text = self._special("<|endoftext|>")
        self.suffix = [self.role_ids["user"]]  # GLM-4's "EOS for chat"
        self.stop_token_ids = [end_of_text, self.role_ids["user"], self.role_ids["observation"]]
        self.pad_token_id = end_of_text

    def render_message(self, message):
        head = self._head(message.role, message.metadata)
        if message.tools is not None:
            ids = self._tools_system_message(message)
        elif not message.content:
            return [], head, []  # GLM-4's template emits nothing for an empty message
        else:
            # One encode call: GLM-4 tokenizes the rendered "metadata\ncontent" as one string.
            ids = [self.role_ids[message.role], *self._encode(message.metadata + "\n" + message.content)]
        content = ids[len(head):] if ids[: len(head)] == head else self._encode(message.content)
        return ids, head, content

    def _tools_system_message(self, message: Message) -> list[int]:
        """The model's own tool prompt when the tokenizer has a chat template (as upstream), else the
        tools as JSON after the system text."""
        if getattr(self.tokenizer, "chat_template", None) or _overrides_chat_template(self.tokenizer):
            rendered = {"role": "system", "content": message.content, "tools": message.tools}
            ids = self.tokenizer.apply_chat_template([rendered], tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)  # some revisions return a batch
            return ids[len(self.prefix):] if ids[: len(self.prefix)] == self.prefix else ids
        text = (message.content + "\n" if message.content else "") + json.dumps(message.tools, indent=4, ensure_ascii=False)
        return [self.role_ids["system"], *self._encode(message.metadata + "\n" + text)]

    def render(self, conv: Conversation) -> Rendered:
        rendered = super().render(conv)
        if not self.combine:
            return rendered
        # combine (upstream's default): only what follows the LAST <|assistant|> token is learned;
        # earlier replies are context. Its role token is not learned, so after the shift the reply's
        # leading "\n" is not a target either (unlike combine=False), exactly as upstream.
        last = max(i for i, span in enumerate(rendered.spans) if span.role == "assistant")
        if conv.messages[last].loss is False:
            raise DataError(f"{conv.source}: combine mode trains the last reply, which has \"loss\": false", [Problem(
                conv.source, f"message {last}: combine mode learns only the last assistant message",
                "remove \"loss\": false from the last reply, or train with combine: false")])
        for index, span in enumerate(rendered.spans):
            span.learn = index >= last
            span.learn_role = index > last
        rendered.answer = last
        return rendered

    def _eval_targets(self, rendered: Rendered) -> list[int]:
        # combine: only the last reply is a target; its prompt stops before it (upstream's prompt
        # contained the reference answer, which made its combine-mode metrics meaningless).
        return [rendered.answer] if self.combine else super()._eval_targets(rendered)


def _overrides_chat_template(tokenizer) -> bool:
    """The Jul-2024 GLM-4 tokenizer renders chats in Python (no chat_template in its config)."""
    from transformers import PreTrainedTokenizerBase

    method = getattr(type(tokenizer), "apply_chat_template", None)
    return method is not None and method is not PreTrainedTokenizerBase.apply_chat_template


def detect_template(tokenizer) -> str:
    """``chatglm3`` or ``glm4``, from where the tokenizer keeps [gMASK]."""
    gmask = tokenizer.convert_tokens_to_ids("[gMASK]")
    if gmask in GMASK_IDS:
        return GMASK_IDS[gmask]
    raise ModelError("cannot tell the chat template from the tokenizer", [Problem(
        "tokenizer", f"[gMASK] is at id {gmask}, not at 64790 (ChatGLM3) or 151331 (GLM-4)",
        "use a ChatGLM3 / GLM-4 tokenizer, or name the template (--template chatglm3|glm4)")])


def get_template(name: str, tokenizer, *, combine: bool = False) -> Template:
    """The template called ``name`` ("auto" detects it from the tokenizer)."""
    if name == "auto":
        name = detect_template(tokenizer)
    if name == "glm4":
        return GLM4Template(tokenizer, combine=combine)
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}", [Problem("template", f"{name!r} is not a template",
                                                                  f"use auto, {' or '.join(TEMPLATES)}")])
    if combine:
        raise ConfigError("combine is a GLM-4 option", [Problem(
            "combine", "the ChatGLM3 recipe has no combine mode (it always learns every reply)",
            "set combine: false, or use a GLM-4 model")])
    return ChatGLM3Template(tokenizer)


def sanity_rows(tokenizer, sample: TrainSample) -> list[tuple[str, int, int]]:
    """(token text, id, label) per position, like the upstream scripts' sanity print."""
    rows = []
    for token_id, label in zip(sample.input_ids, sample.labels):
        text = tokenizer.decode([token_id])
        if not text or "\ufffd" in text:  # a byte piece of a longer character: show the piece's name
            text = tokenizer.convert_ids_to_tokens(token_id)
        rows.append((text, token_id, label))
    return rows


__all__ = [
    "IGNORE_INDEX", "TEMPLATES", "ChatGLM3Template", "EvalSample", "GLM4Template", "Template", "TrainSample",
    "detect_template", "get_template", "sanity_rows",
]
