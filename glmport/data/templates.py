"""Chat templates: conversations to the token ids and labels ChatGLM3 and GLM-4 are trained on.

The layouts reproduce the official fine-tuning recipes id for id (ChatGLM3 ``finetune_hf.py``,
GLM-4 ``finetune_demo/finetune.py``), including the one-token right shift of the loss mask. Only generic
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
    """What both families share: the sample layout around the per-message rendering."""

    name = ""
    detection: Detection | None = None  # why this template (set by get_template)
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


def known_token_id(tokenizer, token: str) -> int | None:
    """The id ``tokenizer`` gives ``token`` as one whole token, or None when it does not have it (unknown
    tokens come back as the unk id, as None, or raise, depending on the tokenizer; a token that maps back
    to something else, e.g. GLM-4's byte tokens, is not it either)."""
    try:
        token_id = tokenizer.convert_tokens_to_ids(token)
    except Exception:  # GLM-4's remote tokenizer: KeyError for a text that is not a rank
        return None
    if not isinstance(token_id, int) or token_id == getattr(tokenizer, "unk_token_id", None):
        return None
    try:
        back = tokenizer.convert_ids_to_tokens(token_id)
    except Exception:
        return token_id
    return token_id if back in (token, None) else None


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
    ChatGLM-6B and ChatGLM2-6B are recognised and refused: glmport does not train them yet.
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
            "tokenizer", "; ".join(evidence) + " (no ChatGLM3 / GLM-4 layout)",
            "use the tokenizer of a ChatGLM3 / GLM-4 model, or name the template (glmport.template / --template "
            "chatglm3|glm4) when this tokenizer has that family's special tokens")])
    if family not in SUPPORTED_FAMILIES:
        raise unsupported_family(family, "tokenizer" if tok.family else "config.json",
                                 tok.facts if tok.family else cfg.facts)
    chosen_by = template_key if template not in ("auto", None) else "detected"
    return Detection(family, family, chosen_by, evidence)


def detect_template(tokenizer, config: dict | None = None) -> str:
    """``chatglm3`` or ``glm4``: :func:`detect_family` without overrides."""
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
            "combine", "the ChatGLM3 recipe has no combine mode (it always learns every reply)",
            "set combine: false, or use a GLM-4 model")])
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
    "IGNORE_INDEX", "TEMPLATES", "ChatGLM3Template", "Detection", "EvalSample", "GLM4Template", "Template",
    "TokenizerEvidence", "TrainSample", "detect_family", "detect_template", "get_template", "sanity_rows",
    "tokenizer_evidence",
]
