"""Reading generated ids as replies (glmport.infer.read_reply) and streaming them (ReplyStream), token by token,
with each family's tokenizer: the streamed pieces joined are always the final reply's text."""

from __future__ import annotations

import functools

import pytest
import torch

from glmport.data.templates import get_template
from glmport.infer import InferenceModel, ReplyStream, read_reply
from glmport.tiny.tokenizer import CHATGLM2, CHATGLM3, GLM4, build_fast_tokenizer

LAYOUTS = {"chatglm3": CHATGLM3, "glm4": GLM4, "chatglm2": CHATGLM2}


@functools.cache
def _bundle(family: str) -> InferenceModel:
    """What read_reply needs of a loaded model: its tokenizer and template (no weights)."""
    tokenizer = build_fast_tokenizer(LAYOUTS[family])
    return InferenceModel(None, tokenizer, get_template(family, tokenizer), None, None, f"tiny {family} tokenizer")


@pytest.fixture(params=sorted(LAYOUTS))
def bundle(request) -> InferenceModel:
    return _bundle(request.param)


def _ids(bundle, text: str, stop: bool = True) -> list[int]:
    """``text`` as generated ids; ``<|assistant|>`` starts another turn where the family has role tokens."""
    template = bundle.template
    ids = []
    for index, part in enumerate(text.split("<|assistant|>")):
        if index:
            ids.append(template.role_ids["assistant"])
        ids += bundle.tokenizer.encode(part, add_special_tokens=False)
    return ids + ([template.stop_token_ids[0]] if stop else [])


def _stream(bundle, ids: list[int]) -> list[str]:
    pieces = []
    stream = ReplyStream(bundle, pieces.append)
    stream.put(torch.tensor([[1, 2, 3]]))  # generate() hands over the prompt first
    for token in ids:
        stream.put(torch.tensor([token]))
    stream.end()
    assert not stream.diverged
    return pieces


ANSWERS = [
    "\nIt is sunny in Paris today.",
    "\n  padded answer with trailing space   \n\n",
    "\n北京今天晴，气温二十五度。",  # multi-byte characters: byte tokens that decode to U+FFFD until complete
    "\nfirst line\nsecond line\n\nthird line",
    "\n\ufffd odd bytes stay",
]


@pytest.mark.parametrize("text", ANSWERS)
def test_streamed_pieces_join_to_the_final_text(bundle, text):
    ids = _ids(bundle, text)
    reply = read_reply(bundle, ids)
    assert reply.text == text.strip()
    assert reply.stop == bundle.template.stop_token_ids[0] and reply.finish_reason == "stop"
    pieces = _stream(bundle, ids)
    assert "".join(pieces) == reply.text
    if "\ufffd" not in text:  # an undecodable character is held back to the end: it may yet become one
        assert len(pieces) > 3  # handed over while it was generated, not at the end


def test_a_reply_cut_by_max_new_tokens_has_no_stop(bundle):
    reply = read_reply(bundle, _ids(bundle, "\nan unfinished answ", stop=False))
    assert reply.stop is None and reply.finish_reason == "length" and reply.text == "an unfinished answ"


@pytest.mark.parametrize("family, call", [("chatglm3", "get_weather\n```python\ntool_call(city='Paris')\n```"),
                                          ("glm4", 'get_weather\n{"city": "Paris"}')])
def test_a_tool_call_is_never_streamed_as_text(family, call):
    bundle = _bundle(family)
    ids = _ids(bundle, call)[:-1] + [bundle.template.role_ids["observation"]]
    reply = read_reply(bundle, ids)
    assert reply.text == "" and reply.finish_reason == "tool_call"
    assert reply.tool_call.name == "get_weather" and reply.tool_call.arguments == {"city": "Paris"}
    assert [(m.metadata, m.content) for m in reply.messages] == [("get_weather", call.split("\n", 1)[1])]
    assert _stream(bundle, ids) == []
    # thinking aloud, then the call in a second assistant turn: the words are shown, the call is the outcome
    ids = _ids(bundle, "\nLet me check.<|assistant|>" + call)
    reply = read_reply(bundle, ids)
    assert reply.text == "Let me check." and reply.tool_call.name == "get_weather"
    assert [m.metadata for m in reply.messages] == ["", "get_weather"]
    assert "".join(_stream(bundle, ids)) == "Let me check."


def test_without_metadata_lines_the_whole_reply_is_text():
    bundle = _bundle("chatglm2")  # ChatGLM2 (and ChatGLM-6B) answer in plain text
    assert not bundle.template.reply_metadata and bundle.template.tool_format is None
    reply = read_reply(bundle, _ids(bundle, 'get_weather\n{"city": "Paris"}'))
    assert reply.tool_call is None and reply.text == 'get_weather\n{"city": "Paris"}'
