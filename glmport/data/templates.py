"""Chat templates: conversations to the token ids and labels ChatGLM-6B, ChatGLM2, ChatGLM3 and GLM-4 are trained on.

The layouts reproduce the official fine-tuning recipes id for id (ChatGLM2 ``ptuning/main.py``, ChatGLM3
``finetune_hf.py``, GLM-4 ``finetune_demo/finetune.py``), including the one-token right shift of the loss
mask where the recipe has it (ChatGLM3, GLM-4; ChatGLM2 labels the answer itself, ChatGLM-6B ``ptuning/main.py``
labels ``<sop>`` and the answer). Only generic
tokenizer calls are used (``convert_tokens_to_ids`` for the special tokens, ``encode(text,
add_special_tokens=False)`` for text), so the same code serves the remote-code tokenizers, the native
fast ones and glmport's tiny test tokenizers.

Which template a tokenizer gets is decided from evidence, never from fixed ids (:func:`detect_family`): the
special tokens the tokenizer has, its chat template, and the model's config.json; an override must agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from glmport.data.records import Conversation, Message, learned_by_default
from glmport.data.spans import IGNORE_INDEX, Rendered, Span, shifted_labels
from glmport.data.truncation import fit_to_budget
from glmport.errors import ConfigError, DataError, ModelError, Problem
from glmport.modeling import (
    FAMILY_TITLES,
    SUPPORTED_FAMILIES,
    config_evidence,
    family_names,
    unsupported_family,
)
from glmport.toolcalls import family_message

TEMPLATES = SUPPORTED_FAMILIES  # one template per supported family, of the same name


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
    """What the families share: the sample layout around the per-message rendering."""

    name = ""
    roles = ("system", "user", "assistant", "observation")  # the role tokens the layout writes: <|role|>
    detection: Detection | None = None  # why this template (set by get_template)
    # How a generated reply reads (glmport infer / chat / eval): ChatGLM3 and GLM-4 begin each assistant turn
    # with a metadata line (empty, or the name of the tool it calls) and have a tool format of their own
    # (glmport.toolcalls); a family without them answers in plain text and makes no tool calls.
    reply_metadata = False
    tool_format: str | None = None
    stop_token_ids: list[int]
    pad_token_id: int

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.role_ids = {role: self._special(f"<|{role}|>") for role in self.roles}
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

    def labelled(self, rendered: Rendered) -> tuple[list[int], list[int]]:
        """(input ids, labels): the learned tokens under the one-token shift (see :func:`shifted_labels`)."""
        ids, mask = rendered.flatten()
        return ids, shifted_labels(ids, mask)

    def untruncated_sample(self, conv: Conversation) -> TrainSample:
        return TrainSample(*self.labelled(self.render(conv)))

    def train_sample(self, conv: Conversation, max_input_length: int, max_output_length: int) -> TrainSample:
        rendered = self.render(conv)
        full_length = len(rendered)
        budget = max_input_length + max_output_length + 1  # as upstream
        dropped = fit_to_budget(rendered, budget, max_input_length, conv.source)
        ids, labels = self.labelled(rendered)
        return TrainSample(ids, labels, full_length - len(ids), dropped)

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
    reply_metadata = True
    tool_format = "chatglm3"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.prefix = [self._special("[gMASK]"), self._special("sop")]
        eos = tokenizer.eos_token_id
        self.suffix = [eos]
        self.stop_token_ids = [eos, self.role_ids["user"], self.role_ids["observation"]]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def render_message(self, message):
        # Tool calls and tools given as data, in ChatGLM3's own form (the one chat and serve write).
        message = family_message(self.tool_format, message)
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
    reply_metadata = True
    tool_format = "glm4"

    def __init__(self, tokenizer, combine: bool = False):
        super().__init__(tokenizer)
        self.combine = combine
        self.prefix = [self._special("[gMASK]"), self._special("<sop>")]
        end_of_text = self._special("<|endoftext|>")
        self.suffix = [self.role_ids["user"]]  # GLM-4's "EOS for chat"
        self.stop_token_ids = [end_of_text, self.role_ids["user"], self.role_ids["observation"]]
        self.pad_token_id = end_of_text

    def render_message(self, message):
        # Tool calls and tools given as data, in GLM-4's own form (the one chat and serve write).
        message = family_message(self.tool_format, message)
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


class ChatGLM2Template(Template):
    """``[gMASK] sop`` + ``[Round N]\n\n问：{question}\n\n答：`` + answer per round, rounds joined by ``\n\n``,
    ``</s>`` after the last reply.

    ChatGLM2-6B has no role tokens: its prompt is the text of the tokenizer's ``build_prompt`` (rounds count
    from 1). The official recipe (``ptuning/main.py``) encodes the prompt and the answer in two calls and
    labels the answer tokens themselves plus the ``</s>`` after them: no shift. A single round is exactly
    that, id for id, and so is the prompt ``model.chat`` builds for it. Several rounds are encoded round by
    round, as ChatGLM2's own ``stream_chat`` continues a cached conversation (``build_stream_inputs``: the
    next round "\n\n[Round N]..." encoded alone, without the word-start piece SentencePiece puts first): each
    reply is learned (unless ``"loss": false``) and only the last one is followed by ``</s>`` (LLaMA-Factory
    trains ChatGLM2 conversations the same way). Inference (:meth:`prompt_ids`) builds its prompts alike.
    ``model.chat`` instead encodes the whole history as one string, whose tokens can differ where a reply
    meets its round (the reply's word-start piece).

    What ChatGLM2 cannot express is refused, naming the record: tools, tool calls and observations. A system
    message has no role either; like FastChat's ``chatglm2`` conversation template, its text goes before
    ``[Round 1]``, followed by ``\n\n`` (LLaMA-Factory puts it there without the separator).
    """

    name = "chatglm2"
    roles = ()

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.prefix = [self._special("[gMASK]"), self._special("sop")]
        eos = tokenizer.eos_token_id
        self.suffix = [eos]
        self.stop_token_ids = [eos]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # SentencePiece starts an encoded string with a word-start piece ("\n" -> "▁", "\n"); a round that
        # continues the conversation drops it, as ChatGLM2's build_stream_inputs does
        newline = self._encode("\n")
        self._word_start = newline[0] if len(newline) > 1 else None

    def _continuing(self, ids: list[int]) -> list[int]:
        return ids[1:] if self._word_start is not None and ids[:1] == [self._word_start] else ids

    def render_message(self, message: Message) -> tuple[list[int], list[int], list[int]]:
        raise NotImplementedError("ChatGLM2 renders rounds, not messages: use render() or prompt_ids()")

    def _spans(self, messages: list[Message], source: str) -> list[Span]:
        """One span per message: the system text, each round's question text, each answer."""
        spans: list[Span] = []
        round_number = 0
        for index, message in enumerate(messages):
            where = f"message {index} ({message.role})"
            if message.tools is not None or message.metadata or message.role == "observation":
                what = ("declares tools" if message.tools is not None else
                        "is a tool call" if message.metadata else "is a tool's result")
                raise _chatglm2_cannot(source, f"{where} {what}; ChatGLM2-6B has no tool, tool-call or observation "
                                               "turns", "remove the tool turns, or train a ChatGLM3 / GLM-4 model")
            expected = "user" if not spans or spans[-1].role in ("system", "assistant") else "assistant"
            if message.role == "system":
                if index != 0:
                    raise _chatglm2_cannot(source, f"{where}: a system message can only open the conversation",
                                           "move the system text into the first message")
                ids = self._encode(message.content + "\n\n") if message.content else []
                spans.append(Span("system", ids, [], ids, learn=False, learn_role=False))
            elif message.role != expected:
                place = f"follows a {spans[-1].role} message" if spans else "opens the conversation"
                raise _chatglm2_cannot(source, f"{where} {place}; ChatGLM2-6B prompts are [Round N] question/answer "
                                               "pairs",
                                       f"make message {index} a{'n' if expected == 'assistant' else ''} {expected} "
                                       "message (merge consecutive messages of one role)")
            elif message.role == "user":
                round_number += 1
                head_text = ("\n\n" if round_number > 1 else "") + f"[Round {round_number}]\n\n问："
                ids = self._encode(head_text + message.content + "\n\n答：")
                head = self._encode(head_text)
                if round_number > 1:
                    ids, head = self._continuing(ids), self._continuing(head)
                # the question is what truncation may trim; the round header and "答：" stay
                content = ids[len(head):] if ids[: len(head)] == head else self._encode(message.content + "\n\n答：")
                spans.append(Span("user", ids, head, content, learn=False, learn_role=False))
            else:
                ids = self._encode(message.content)
                learn = learned_by_default(message)
                spans.append(Span("assistant", ids, [], ids, learn=learn, learn_role=learn))
        return spans

    def render(self, conv: Conversation) -> Rendered:
        spans = self._spans(conv.messages, conv.source)
        learned = [i for i, span in enumerate(spans) if span.learn and span.ids]
        if not learned:
            raise DataError(f"{conv.source}: nothing to learn", [Problem(
                conv.source, "no assistant message carries loss (none, or every one has \"loss\": false)",
                "give the conversation an answer to learn (an assistant message after a user message)")])
        # What follows the last learned reply teaches nothing: the sample ends with that reply and </s>.
        return Rendered(list(self.prefix), spans[: learned[-1] + 1], list(self.suffix), answer=learned[-1])

    def labelled(self, rendered: Rendered) -> tuple[list[int], list[int]]:
        """No shift: the answer tokens are their own labels, and so is the </s> after the last answer."""
        ids, mask = rendered.flatten()
        mask = mask[: len(mask) - len(rendered.suffix)] + [True] * len(rendered.suffix)
        return ids, [token if learned else IGNORE_INDEX for token, learned in zip(ids, mask)]

    def eval_samples(self, conv: Conversation, max_input_length: int, max_output_length: int) -> list[EvalSample]:
        """One sample per reply to generate: the prompt up to its ``答：``, and the reply followed by ``</s>``."""
        rendered = self.render(conv)
        samples = []
        for index in self._eval_targets(rendered):
            context = [token for span in rendered.spans[:index] for token in span.ids]
            room = max(max_input_length - len(rendered.prefix), 0)
            context = context[len(context) - room:] if len(context) > room else context  # the latest context
            output = (rendered.spans[index].ids + self.suffix)[:max_output_length]
            samples.append(EvalSample(rendered.prefix + context, output, conv.source))
        return samples

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The ids that ask for the next reply: the rounds so far, the last one ending with ``答：``."""
        spans = self._spans(messages, "the prompt")
        if not spans or spans[-1].role != "user":
            raise DataError("the prompt must end with a user message", [Problem(
                "the prompt", "ChatGLM2-6B answers the question of the last [Round N]", "end with a user message")])
        return list(self.prefix) + [token for span in spans for token in span.ids]


def _chatglm2_cannot(source: str, what: str, fix: str) -> DataError:
    return DataError(f"{source}: the ChatGLM2-6B prompt format cannot express this conversation",
                     [Problem(source, what, fix)])


class ChatGLM6BTemplate(Template):
    """ChatGLM-6B (THUDM/chatglm-6b): a text prompt, then the tokenizer's ``build_inputs_with_special_tokens``:
    ``prompt [gMASK] <sop> answer <eop>``.

    The prompt is ``model.chat``'s and ``ptuning/main.py``'s: the bare question, or, after earlier rounds,
    ``[Round 0]\\n问：{q}\\n答：{a}\\n`` ... ``[Round n]\\n问：{q}\\n答：`` (rounds count from 0), encoded in one call
    as upstream does (truncation re-renders it with fewer rounds instead of cutting tokens out of it). The
    labels are the recipe's: -100 on the prompt and ``[gMASK]``, the ids themselves from ``<sop>`` on, which
    the model shifts (``[gMASK]`` learns ``<sop>``, the last answer token learns ``<eop>``).

    One sample per conversation, as upstream: the last reply that carries loss is the answer, the rounds
    before it are history (never learned), what follows it is dropped. A record of the ChatGLM-6B tuning
    tutorial (mymusise/ChatGLM-Tuning, ``{"context", "target"}``) is one question and one answer, so its
    layout is the tutorial's own: ``encode(context) [gMASK] <sop> encode(target) <eop>``, labels from
    ``<sop>`` on. A system message has no role in ChatGLM-6B; like ptuning's ``source_prefix`` (and FastChat's
    ``chatglm`` template, with its ``\\n``) its text opens the prompt. Tools, tool calls and tool results cannot
    be expressed and are refused, naming the record. The special ids are the tokenizer's, and its own
    ``build_inputs_with_special_tokens`` must give this layout (the April 2023 tokenizers before "Always add
    gmask" do not: they are refused).
    """

    name = "chatglm"
    roles = ()

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.gmask, self.sop, self.eop = (self._special(token) for token in ("[gMASK]", "<sop>", "<eop>"))
        # the remote tokenizer's own layout must be this one (a generic tokenizer, e.g. `glmport data check`'s
        # estimate, has no layout of its own to compare with)
        probe = list(tokenizer.build_inputs_with_special_tokens([7], [8])) if _overrides(
            tokenizer, "build_inputs_with_special_tokens") else [7, self.gmask, self.sop, 8, self.eop]
        if probe != [7, self.gmask, self.sop, 8, self.eop]:
            raise ModelError("the tokenizer's special-token layout is not ChatGLM-6B's", [Problem(
                "tokenizer", f"build_inputs_with_special_tokens([7], [8]) gives {probe}, not [7, [gMASK] "
                             f"{self.gmask}, <sop> {self.sop}, 8, <eop> {self.eop}]",
                "use the tokenization_chatglm.py of THUDM/chatglm-6b from 2023-04-14 or later (older ones add "
                "[gMASK] only when the text has no mask token)")])
        self.suffix = [self.eop]
        self.stop_token_ids = [self.eop]
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eop

    def render_message(self, message: Message) -> tuple[list[int], list[int], list[int]]:
        raise NotImplementedError("ChatGLM-6B renders a prompt text, not messages: use render() or prompt_ids()")

    def _render(self, system: str, history: list[tuple[str, str]], question: str, answer: str) -> Rendered:
        prompt = self._encode(chatglm6b_prompt(system, history, question))
        head = [self.gmask, self.sop]
        content = self._encode(answer)
        spans = [Span("user", prompt, [], prompt, learn=False, learn_role=False),
                 # [gMASK] is not a label, <sop> and the answer are (see labelled)
                 Span("assistant", head + content, head, content, learn=True, learn_role=False)]
        return Rendered([], spans, list(self.suffix), answer=1)

    def _answer(self, conv: Conversation):
        system, rounds, _ = chatglm6b_dialogue(conv.messages, conv.source)
        learned = [i for i, (_, answer) in enumerate(rounds) if learned_by_default(answer)]
        if not learned:
            raise DataError(f"{conv.source}: nothing to learn", [Problem(
                conv.source, "no assistant message carries loss (none, or every one has \"loss\": false)",
                "give the conversation an answer to learn (an assistant message after a user message)")])
        rounds = rounds[: learned[-1] + 1]
        history = [(q, a.content) for q, a in rounds[:-1]]
        return system, history, rounds[-1][0], rounds[-1][1].content

    def render(self, conv: Conversation) -> Rendered:
        return self._render(*self._answer(conv))

    def labelled(self, rendered: Rendered) -> tuple[list[int], list[int]]:
        """Labels are the ids from ``<sop>`` on (the model shifts them), ``<eop>`` included."""
        ids, mask = rendered.flatten()
        mask = mask[: len(mask) - len(rendered.suffix)] + [True] * len(rendered.suffix)
        return ids, [token if learned else IGNORE_INDEX for token, learned in zip(ids, mask)]

    def train_sample(self, conv: Conversation, max_input_length: int, max_output_length: int) -> TrainSample:
        system, history, question, answer = self._answer(conv)
        rendered = self._render(system, history, question, answer)
        full_length = len(rendered)
        budget = max_input_length + max_output_length + 1  # as the other templates
        # Earlier rounds go first, oldest first, while the prompt is over its share (the policy of
        # glmport.data.truncation; re-rendered, since the prompt is one encoded text); then fit_to_budget
        # trims the prompt from its start and, last, cuts the answer.
        shortest_answer = len(rendered.spans[1].head) + 1 + len(rendered.suffix)  # [gMASK] <sop>, a token, <eop>
        goal = min(max(budget - rendered.answer_length(), max_input_length), budget - shortest_answer)
        dropped = 0
        while history and rendered.prompt_length() > goal:
            history = history[1:]
            dropped += 2
            rendered = self._render(system, history, question, answer)
        dropped += fit_to_budget(rendered, budget, max_input_length, conv.source)
        ids, labels = self.labelled(rendered)
        return TrainSample(ids, labels, full_length - len(ids), dropped)

    def eval_samples(self, conv: Conversation, max_input_length: int, max_output_length: int) -> list[EvalSample]:
        """One sample per learned reply: its prompt up to ``<sop>`` (the latest rounds that fit), and the reply
        followed by ``<eop>``."""
        system, rounds, _ = chatglm6b_dialogue(conv.messages, conv.source)
        samples = []
        for index, (question, answer) in enumerate(rounds):
            if not learned_by_default(answer):
                continue
            history = [(q, a.content) for q, a in rounds[:index]]
            prompt = self._prompt(system, history, question, max_input_length)
            output = (self._encode(answer.content) + self.suffix)[:max_output_length]
            samples.append(EvalSample(prompt, output, conv.source))
        return samples

    def _prompt(self, system: str, history: list[tuple[str, str]], question: str, limit: int | None = None) -> list[int]:
        ids = self._encode(chatglm6b_prompt(system, history, question))
        room = None if limit is None else max(limit - 2, 0)
        while room is not None and len(ids) > room and history:
            history = history[1:]
            ids = self._encode(chatglm6b_prompt(system, history, question))
        if room is not None and len(ids) > room:
            ids = ids[len(ids) - room:]  # the most recent text, nearest the question
        return ids + [self.gmask, self.sop]

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The ids that ask for the next reply: the prompt of the rounds so far and the last question."""
        system, rounds, question = chatglm6b_dialogue(messages, "the prompt")
        if question is None:
            raise DataError("the prompt must end with a user message", [Problem(
                "the prompt", "ChatGLM-6B answers the last question", "end with a user message")])
        return self._prompt(system, [(q, a.content) for q, a in rounds], question)


def chatglm6b_dialogue(messages: list[Message], source: str) -> tuple[str, list[tuple[str, Message]], str | None]:
    """ChatGLM-6B's view of a conversation: (system text, [(question, answer message)], the open question or None).
    What it cannot express (tools, tool calls and results, two questions or two answers in a row) is refused."""
    system, rounds, question = "", [], None
    for index, message in enumerate(messages):
        where = f"message {index} ({message.role})"
        if message.tools is not None or message.metadata or message.role == "observation":
            what = ("declares tools" if message.tools is not None else
                    "is a tool call" if message.metadata else "is a tool's result")
            raise _chatglm6b_cannot(source, f"{where} {what}; ChatGLM-6B has no tool, tool-call or observation "
                                            "turns", "remove the tool turns, or train a ChatGLM3 / GLM-4 model")
        if message.role == "system":
            if index != 0:
                raise _chatglm6b_cannot(source, f"{where}: a system message can only open the conversation",
                                        "move the system text into the first message")
            system = message.content
        elif message.role == "user":
            if question is not None:
                raise _chatglm6b_cannot(source, f"{where} follows a user message; ChatGLM-6B prompts are "
                                                "question/answer rounds", "merge consecutive user messages")
            question = message.content
        else:
            if question is None:
                raise _chatglm6b_cannot(source, f"{where} answers no question; ChatGLM-6B prompts are "
                                                "question/answer rounds",
                                        "put a user message before it, or merge consecutive replies")
            rounds.append((question, message))
            question = None
    return system, rounds, question


def chatglm6b_prompt(system: str, history: list[tuple[str, str]], question: str) -> str:
    """``model.chat``'s prompt (``ptuning/main.py``'s with a history column), behind the system text."""
    if history:
        done = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
        prompt = done + f"[Round {len(history)}]\n问：{question}\n答："
    else:
        prompt = question
    return (system + "\n" if system else "") + prompt


def _chatglm6b_cannot(source: str, what: str, fix: str) -> DataError:
    return DataError(f"{source}: the ChatGLM-6B prompt format cannot express this conversation",
                     [Problem(source, what, fix)])


def _overrides(tokenizer, method: str) -> bool:
    """Whether the tokenizer's class defines ``method`` itself (remote code) rather than inheriting transformers'."""
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    own = getattr(type(tokenizer), method, None)
    return own is not None and all(own is not getattr(base, method, None)
                                   for base in (PreTrainedTokenizerBase, PreTrainedTokenizerFast))


def _overrides_chat_template(tokenizer) -> bool:
    """The Jul-2024 GLM-4 tokenizer renders chats in Python (no chat_template in its config)."""
    from transformers import PreTrainedTokenizerBase

    method = getattr(type(tokenizer), "apply_chat_template", None)
    return method is not None and method is not PreTrainedTokenizerBase.apply_chat_template


# --- which family: the evidence --------------------------------------------------------------------------------

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
# what the generations' tokenizers have (ids read from the tokenizer, never assumed):
#   ChatGLM-6B   [gMASK] <sop>                                   (no role tokens, no <|endoftext|>)
#   ChatGLM2-6B  [gMASK] sop                                     (no role tokens)
#   ChatGLM3-6B  [gMASK] sop   <|system|> <|user|> ...
#   GLM-4        [gMASK] <sop> <|system|> <|user|> ... <|endoftext|>
PROBED = ("[gMASK]", "sop", "<sop>", "<|endoftext|>")
# marks in a chat template: the prefix it writes, or the 问/答 rounds of the generations before role tokens
CHAT_TEMPLATE_MARKS = (("[gMASK]<sop>", {"glm4"}, "writes [gMASK]<sop>"),
                       ("[gMASK]sop", {"chatglm3"}, "writes [gMASK]sop"),
                       ("问：", {"chatglm", "chatglm2"}, "writes [Round N] 问/答 prompts"))


# a token no tokenizer has: what a tokenizer answers for it is what it answers for every unknown token
_NO_SUCH_TOKEN = "<glmport: no such token>"


def known_token_id(tokenizer, token: str) -> int | None:
    """The id ``tokenizer`` gives ``token`` as one whole token, or None when it does not have it (unknown
    tokens come back as the unk id, as None, or raise, depending on the tokenizer; ChatGLM2's tokenizer on
    transformers 5 reports no unk id at all, so the id of a token that cannot exist is asked too). A token
    that maps back to something else, e.g. GLM-4's byte tokens, is not it either; ChatGLM2's tokenizer maps
    its special tokens back to "", which says nothing."""
    try:
        token_id = tokenizer.convert_tokens_to_ids(token)
    except Exception:  # GLM-4's remote tokenizer: KeyError for a text that is not a rank
        return None
    if not isinstance(token_id, int) or token_id in (getattr(tokenizer, "unk_token_id", None),
                                                     _unknown_token_id(tokenizer)):
        return None
    try:
        back = tokenizer.convert_ids_to_tokens(token_id)
    except Exception:
        return token_id
    return token_id if back in (token, None, "") else None


def _unknown_token_id(tokenizer) -> int | None:
    try:
        token_id = tokenizer.convert_tokens_to_ids(_NO_SUCH_TOKEN)
    except Exception:
        return None
    return token_id if isinstance(token_id, int) else None


@dataclass(frozen=True)
class TokenizerEvidence:
    family: str | None  # None: no layout of a known generation
    facts: str  # "tokenizer has [gMASK] 64790, sop 64792, ...; no <sop>, <|endoftext|>"
    chat_families: frozenset[str] | None  # what its chat template's marks allow; None: no mark (or no template)
    chat_facts: str  # "no chat_template", "chat_template writes [gMASK]<sop>", ...


def tokenizer_evidence(tokenizer) -> TokenizerEvidence:
    ids = {token: known_token_id(tokenizer, token) for token in (*PROBED, *ROLE_TOKENS)}
    roles = [ids[t] for t in ROLE_TOKENS]
    family = None
    if ids["[gMASK]"] is not None:
        if all(i is not None for i in roles):
            if ids["<sop>"] is not None and ids["<|endoftext|>"] is not None and ids["sop"] is None:
                family = "glm4"
            elif ids["sop"] is not None and ids["<sop>"] is None:
                family = "chatglm3"
        elif all(i is None for i in roles):
            if ids["sop"] is not None and ids["<sop>"] is None:
                family = "chatglm2"
            elif ids["<sop>"] is not None and ids["sop"] is None and ids["<|endoftext|>"] is None:
                family = "chatglm"
    has = [f"{t} {ids[t]}" for t in PROBED if ids[t] is not None]
    lacks = [t for t in PROBED if ids[t] is None]
    if all(i is not None for i in roles):
        has.append("/".join(ROLE_TOKENS) + " " + "/".join(str(i) for i in roles))
    elif all(i is None for i in roles):
        lacks.insert(0, "role tokens (<|user|>...)")
    else:
        has += [f"{t} {i}" for t, i in zip(ROLE_TOKENS, roles) if i is not None]
        lacks += [t for t, i in zip(ROLE_TOKENS, roles) if i is None]
    facts = f"tokenizer has {', '.join(has)}" + (f"; no {', '.join(lacks)}" if lacks else "") if has else \
        f"tokenizer has no {', '.join(lacks)}"
    chat_families, chat_facts = _chat_template_evidence(tokenizer)
    return TokenizerEvidence(family, facts, chat_families, chat_facts)


def _chat_template_evidence(tokenizer) -> tuple[frozenset[str] | None, str]:
    text = getattr(tokenizer, "chat_template", None)
    if isinstance(text, dict):  # named templates
        text = "\n".join(str(t) for t in text.values())
    if not isinstance(text, str) or not text:
        return None, "no chat_template"
    for mark, families, says in CHAT_TEMPLATE_MARKS:
        if mark in text:
            return frozenset(families), f"chat_template {says}"
    return None, "a chat_template without a family's marks"


@dataclass(frozen=True)
class Detection:
    """The family of a tokenizer (and model), the template it gets, and the evidence, for the run's log."""

    family: str
    template: str
    chosen_by: str  # "detected", or the key of the template override that agreed with the evidence
    evidence: tuple[str, ...]

    def describe(self) -> str:
        how = "" if self.chosen_by == "detected" else f" ({self.chosen_by}, agrees with the evidence)"
        return f"template {self.template}{how}: " + "; ".join(self.evidence)

    def as_dict(self) -> dict:
        return {"family": self.family, "template": self.template, "chosen_by": self.chosen_by,
                "evidence": list(self.evidence)}


def _disagree(message: str, one: tuple[str, str], other: tuple[str, str], fix: str) -> ModelError:
    return ModelError(message, [Problem(one[0], one[1]), Problem(other[0], other[1], fix)])


def detect_family(tokenizer, config: dict | None = None, *, template: str = "auto", model_family: str = "auto",
                  template_key: str = "glmport.template (--template)",
                  family_key: str = "glmport.model_family") -> Detection:
    """Decide the family from the evidence, refusing when it disagrees.

    The evidence: the tokenizer's special tokens (:func:`tokenizer_evidence`), its chat template, and
    ``config`` (the model's config.json, :func:`glmport.modeling.config_evidence`). The overrides
    (``template``, ``model_family``) must agree with it; an explicit template that agrees wins, and one
    decides on its own only for a tokenizer of no known layout (its tokens are checked when it is built).
    ChatGLM2-6B and ChatGLM3-6B share [gMASK] and sop at the same ids; only ChatGLM3's tokenizer has role
    tokens. ChatGLM-6B has <sop> like GLM-4, but no role tokens and no <|endoftext|>.
    """
    tok = tokenizer_evidence(tokenizer)
    cfg = config_evidence(config) if config is not None else None
    evidence = (tok.facts, tok.chat_facts) + ((cfg.facts,) if cfg else ())
    tokens = ("tokenizer", f"{tok.facts} ({tok.family})")
    if tok.family and tok.chat_families and tok.family not in tok.chat_families:
        raise _disagree("the tokenizer's special tokens and its chat_template are of different generations", tokens,
                        ("tokenizer", f"{tok.chat_facts} ({family_names(tok.chat_families)})"),
                        "use the tokenizer files that came with the model (tokenizer_config.json holds the template)")
    if tok.family and cfg and cfg.families and tok.family not in cfg.families:
        raise _disagree("the model's config.json and its tokenizer are of different generations",
                        ("config.json", f"{cfg.facts} ({family_names(cfg.families)})"), tokens,
                        "put the tokenizer files of the same model download next to its config.json")
    if model_family not in ("auto", None) and template not in ("auto", None) and template != model_family:
        raise _disagree(f"{template_key} {template} contradicts {family_key} {model_family}",
                        (template_key, template), (family_key, model_family), "remove one of them, or make them equal")
    for key, value in ((family_key, model_family), (template_key, template)):
        if value in ("auto", None):
            continue
        if tok.family and value != tok.family:
            if tok.family not in SUPPORTED_FAMILIES:
                error = unsupported_family(tok.family, "tokenizer", tok.facts)
                error.problems.insert(0, Problem(key, f"{value} was asked for"))
                raise error
            raise _disagree(f"{key} {value} contradicts the tokenizer", (key, f"{value} was asked for"), tokens,
                            f"remove {key} (glmport detects the family), or use a {FAMILY_TITLES[value]} tokenizer")
        if cfg and cfg.families and value not in cfg.families:
            raise _disagree(f"{key} {value} contradicts config.json", (key, f"{value} was asked for"),
                            ("config.json", f"{cfg.facts} ({family_names(cfg.families)})"),
                            f"remove {key} (glmport detects the family), or use a {FAMILY_TITLES[value]} model")
    only = next(iter(cfg.families)) if cfg and cfg.families and len(cfg.families) == 1 else None
    family = tok.family or next((v for v in (model_family, template) if v not in ("auto", None)), None) or only
    if family is None:
        raise ModelError("cannot tell which model family the tokenizer belongs to", [Problem(
            "tokenizer", "; ".join(evidence) + " (no ChatGLM2 / ChatGLM3 / GLM-4 layout)",
            "use the tokenizer of a ChatGLM2 / ChatGLM3 / GLM-4 model, or name the template (glmport.template / "
            f"--template {'|'.join(TEMPLATES)}) when this tokenizer has that family's special tokens")])
    if family not in SUPPORTED_FAMILIES:
        raise unsupported_family(family, "tokenizer" if tok.family else "config.json",
                                 tok.facts if tok.family else cfg.facts)
    chosen_by = template_key if template not in ("auto", None) else "detected"
    return Detection(family, family, chosen_by, evidence)


def detect_template(tokenizer, config: dict | None = None) -> str:
    """``chatglm2``, ``chatglm3`` or ``glm4``: :func:`detect_family` without overrides."""
    return detect_family(tokenizer, config).template


def get_template(name: str, tokenizer, *, combine: bool = False, config: dict | None = None,
                 model_family: str = "auto", detection: Detection | None = None) -> Template:
    """The template called ``name`` ("auto": the detected one) for ``tokenizer``; ``name`` must agree with
    the tokenizer (see :func:`detect_family`; pass ``detection`` when the caller has run it already)."""
    if name not in ("auto", *TEMPLATES):
        raise ConfigError(f"unknown template {name!r}", [Problem("template", f"{name!r} is not a template",
                                                                  f"use auto, {' or '.join(TEMPLATES)}")])
    detection = detection or detect_family(tokenizer, config, template=name, model_family=model_family)
    name = detection.template
    if name == "glm4":
        template = GLM4Template(tokenizer, combine=combine)
    elif combine:
        raise ConfigError("combine is a GLM-4 option", [Problem(
            "combine", f"the {FAMILY_TITLES[name]} recipe has no combine mode (it always learns every reply)",
            "set combine: false, or use a GLM-4 model")])
    elif name == "chatglm2":
        template = ChatGLM2Template(tokenizer)
    elif name == "chatglm":
        template = ChatGLM6BTemplate(tokenizer)
    else:
        template = ChatGLM3Template(tokenizer)
    template.detection = detection
    return template


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
    "IGNORE_INDEX", "TEMPLATES", "ChatGLM2Template", "ChatGLM3Template", "ChatGLM6BTemplate", "Detection", "EvalSample", "GLM4Template", "Template",
    "TokenizerEvidence", "TrainSample", "detect_family", "detect_template", "get_template", "sanity_rows",
    "tokenizer_evidence",
]
