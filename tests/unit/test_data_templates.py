"""Golden token streams and labels for the ChatGLM3 and GLM-4 templates, written out by hand.

The tiny tokenizers encode one character per token: ``<unk> <s> </s>`` (0-2), 256 byte tokens (3-258),
then ``string.printable`` in order, so "0" is 259, "a" 269, "A" 295, "!" 321 and "\\n" 355. Special
tokens sit at the upstream ids. Expected lists below follow the layout rules of the reference
(docs: chatglm-upstream.md 1.4-1.6 and 2), not the code under test.
"""

from __future__ import annotations

import string

import pytest

from glmport.data.formats import read_record
from glmport.data.records import Conversation, Message
from glmport.data.templates import detect_template, get_template, sanity_rows
from glmport.errors import ConfigError, DataError, ModelError
from glmport.tiny.tokenizer import GLM4, build_fast_tokenizer

X = -100  # no loss
NL = 355
F = 274  # "f", a tool name
# Two-character texts used below, as ids
HI, OK, GO, NO, BE = [276, 277], [283, 279], [275, 283], [282, 283], [270, 273]

# ChatGLM3 specials
GMASK3, SOP, SYSTEM3, USER3, ASSISTANT3, OBSERVATION3, EOS3 = 64790, 64792, 64794, 64795, 64796, 64797, 2
# GLM-4 specials
GMASK4, SOP4, SYSTEM4, USER4, ASSISTANT4, OBSERVATION4, EOT4 = 151331, 151333, 151335, 151336, 151337, 151338, 151329


def chars(text: str) -> list[int]:
    """Ids of printable text under the tiny tokenizers' one-character-per-token rule."""
    return [259 + string.printable.index(c) for c in text]


def conv(*pairs, source="t.jsonl:1") -> Conversation:
    return Conversation([m if isinstance(m, Message) else Message(*m) for m in pairs], source)


def test_the_character_rule_holds(tok3, tok4):
    for tok in (tok3, tok4):
        assert tok.encode("0aA!\n hi", add_special_tokens=False) == [259, 269, 295, 321, NL, 353, *HI]


def test_chatglm3_single_turn(tok3):
    sample = get_template("chatglm3", tok3).train_sample(conv(("user", "hi"), ("assistant", "ok")), 256, 512)
    assert sample.input_ids == [GMASK3, SOP, USER3, NL, *HI, ASSISTANT3, NL, *OK, EOS3]
    # One-token shift: the assistant role token is no target, the eos after the reply is.
    assert sample.labels == [X, X, X, X, X, X, X, NL, *OK, EOS3]
    assert (sample.trimmed_tokens, sample.trimmed_messages) == (0, 0)


MULTI_TURN = [("system", "be"), ("user", "hi"), ("assistant", "ok"), ("user", "go"), ("assistant", "no")]


def test_chatglm3_multi_turn_with_system(tok3):
    sample = get_template("auto", tok3).train_sample(conv(*MULTI_TURN), 256, 512)
    assert sample.input_ids == [
        GMASK3, SOP, SYSTEM3, NL, *BE, USER3, NL, *HI, ASSISTANT3, NL, *OK, USER3, NL, *GO, ASSISTANT3, NL, *NO, EOS3]
    # The <|user|> after the first reply is a target: the model learns to stop there.
    assert sample.labels == [
        X, X, X, X, X, X, X, X, X, X, X, NL, *OK, USER3, X, X, X, X, NL, *NO, EOS3]


def test_chatglm3_loss_flags(tok3):
    messages = [("user", "hi"), Message("assistant", "ok", loss=False), ("user", "go"), ("assistant", "no")]
    sample = get_template("chatglm3", tok3).train_sample(conv(*messages), 256, 512)
    assert sample.input_ids == [GMASK3, SOP, USER3, NL, *HI, ASSISTANT3, NL, *OK, USER3, NL, *GO, ASSISTANT3, NL, *NO, EOS3]
    assert sample.labels == [X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, NL, *NO, EOS3]


def test_chatglm3_observation_learned_only_when_asked(tok3):
    template = get_template("chatglm3", tok3)
    default = [("user", "hi"), ("assistant", "ok"), ("observation", "be"), ("assistant", "no")]
    asked = [("user", "hi"), ("assistant", "ok"), Message("observation", "be", loss=True), ("assistant", "no")]
    ids = [GMASK3, SOP, USER3, NL, *HI, ASSISTANT3, NL, *OK, OBSERVATION3, NL, *BE, ASSISTANT3, NL, *NO, EOS3]
    assert template.train_sample(conv(*default), 256, 512).input_ids == ids
    assert template.train_sample(conv(*default), 256, 512).labels == [
        X, X, X, X, X, X, X, NL, *OK, OBSERVATION3, X, X, X, X, NL, *NO, EOS3]
    assert template.train_sample(conv(*asked), 256, 512).labels == [
        X, X, X, X, X, X, X, NL, *OK, OBSERVATION3, NL, *BE, ASSISTANT3, NL, *NO, EOS3]


def test_chatglm3_tools_and_tool_role(tok3):
    record = {
        "tools": [{"name": "f"}],
        "conversations": [
            {"role": "user", "content": "hi"},
            {"role": "tool", "name": "f", "parameters": {"x": 1}, "observation": {"y": 2}},
            {"role": "assistant", "content": "ok"},
        ],
    }
    messages = read_record("conversations", record)
    sample = get_template("chatglm3", tok3).train_sample(Conversation(messages, "t:1"), 1024, 1024)
    system_text = ("Answer the following questions as best as you can. You have access to the following tools:\n"
                   '[\n    {\n        "name": "f"\n    }\n]')
    call = chars("```python\ntool_call(x=1)\n```")
    observation = chars('{"y": 2}')
    assert sample.input_ids == [
        GMASK3, SOP,
        SYSTEM3, NL, *chars(system_text),
        USER3, NL, *HI,
        ASSISTANT3, F, NL, *call,  # metadata = the tool's name
        OBSERVATION3, NL, *observation,
        ASSISTANT3, NL, *OK,
        EOS3,
    ]
    assert sample.labels == [
        X, X,
        X, X, *[X] * len(system_text),
        X, X, X, X,
        X, F, NL, *call,
        OBSERVATION3, X, *[X] * len(observation),
        X, NL, *OK,
        EOS3,
    ]


def test_glm4_single_turn(tok4):
    sample = get_template("auto", tok4).train_sample(conv(("user", "hi"), ("assistant", "ok")), 256, 512)
    assert sample.input_ids == [GMASK4, SOP4, USER4, NL, *HI, ASSISTANT4, NL, *OK, USER4]
    assert sample.labels == [X, X, X, X, X, X, X, NL, *OK, USER4]


GLM4_TOOLS = {"messages": [
    {"role": "system", "content": "", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "string"}, "b": None}}}},
    ]},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": '{"name": "f"}'},
    {"role": "observation", "content": "1"},
    {"role": "assistant", "content": "ok"},
]}


def test_glm4_tools_on_system_and_observation(tok4):
    sample = get_template("glm4", tok4).train_sample(Conversation(read_record("messages", GLM4_TOOLS), "t:1"), 1024, 1024)
    # No chat template on the tiny tokenizer: the tools follow as indented JSON, the null property gone.
    tools_json = ('[\n    {\n        "type": "function",\n        "function": {\n            "name": "f",\n'
                  '            "parameters": {\n                "properties": {\n                    "a": {\n'
                  '                        "type": "string"\n                    }\n                }\n'
                  '            }\n        }\n    }\n]')
    call = chars('{"name": "f"}')
    assert sample.input_ids == [
        GMASK4, SOP4,
        SYSTEM4, NL, *chars(tools_json),
        USER4, NL, *HI,
        ASSISTANT4, NL, *call,
        OBSERVATION4, NL, 260,
        ASSISTANT4, NL, *OK,
        USER4,
    ]
    assert sample.labels == [
        X, X,
        X, X, *[X] * len(tools_json),
        X, X, X, X,
        X, NL, *call,
        OBSERVATION4, X, X,
        X, NL, *OK,
        USER4,
    ]


def test_glm4_tools_through_the_chat_template():
    tok = build_fast_tokenizer(GLM4)
    tok.chat_template = ("[gMASK]<sop>{% for m in messages %}{% if m.tools is defined %}<|system|>\nTOOLS:"
                         "{{ m.tools|length }}{% endif %}{% if m.content %}<|{{ m.role }}|>\n{{ m.content }}"
                         "{% endif %}{% endfor %}")
    sample = get_template("glm4", tok).train_sample(Conversation(read_record("messages", GLM4_TOOLS), "t:1"), 1024, 1024)
    # The rendered system message, with the template's [gMASK]<sop> stripped.
    assert sample.input_ids[:12] == [GMASK4, SOP4, SYSTEM4, NL, *chars("TOOLS:1"), USER4]


def test_glm4_empty_message_emits_nothing(tok4):
    sample = get_template("glm4", tok4).train_sample(conv(("system", ""), ("user", "hi"), ("assistant", "ok")), 256, 512)
    assert sample.input_ids == [GMASK4, SOP4, USER4, NL, *HI, ASSISTANT4, NL, *OK, USER4]


TWO_TURNS = [("user", "hi"), ("assistant", "ok"), ("user", "go"), ("assistant", "no")]
TWO_TURNS_IDS = [GMASK4, SOP4, USER4, NL, *HI, ASSISTANT4, NL, *OK, USER4, NL, *GO, ASSISTANT4, NL, *NO, USER4]


def test_glm4_combine_false_learns_every_reply(tok4):
    sample = get_template("glm4", tok4, combine=False).train_sample(conv(*TWO_TURNS), 256, 512)
    assert sample.input_ids == TWO_TURNS_IDS
    assert sample.labels == [X, X, X, X, X, X, X, NL, *OK, USER4, X, X, X, X, NL, *NO, USER4]


def test_glm4_combine_true_learns_only_after_the_last_assistant_token(tok4):
    sample = get_template("glm4", tok4, combine=True).train_sample(conv(*TWO_TURNS), 256, 512)
    assert sample.input_ids == TWO_TURNS_IDS
    # Upstream: the mask starts after the last <|assistant|>, so after the shift its "\n" is no target.
    assert sample.labels == [X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, *NO, USER4]


def test_combine_refuses_an_unlearned_last_reply(tok4):
    messages = [("user", "hi"), ("assistant", "ok"), ("user", "go"), Message("assistant", "no", loss=False)]
    with pytest.raises(DataError, match="combine mode trains the last reply"):
        get_template("glm4", tok4, combine=True).train_sample(conv(*messages, source="d.jsonl:4"), 256, 512)


def test_nothing_to_learn_names_the_source(tok3):
    messages = [("user", "hi"), Message("assistant", "ok", loss=False)]
    with pytest.raises(DataError, match=r"d\.jsonl:9: nothing to learn"):
        get_template("chatglm3", tok3).train_sample(conv(*messages, source="d.jsonl:9"), 256, 512)


def test_stop_and_pad_ids(tok3, tok4):
    chatglm3, glm4 = get_template("auto", tok3), get_template("auto", tok4)
    assert (chatglm3.stop_token_ids, chatglm3.pad_token_id) == ([EOS3, USER3, OBSERVATION3], 0)
    assert (glm4.stop_token_ids, glm4.pad_token_id) == ([EOT4, USER4, OBSERVATION4], EOT4)


def test_detection_and_mismatches(tok3, tok4):
    # the tokenizer's own special tokens decide (tests/unit/test_family_detection.py has the whole story)
    assert (detect_template(tok3), detect_template(tok4)) == ("chatglm3", "glm4")
    assert get_template("auto", tok3).detection.family == "chatglm3"

    class Plain:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 0

    with pytest.raises(ModelError, match=r"cannot tell which model family the tokenizer belongs to"):
        detect_template(Plain())
    with pytest.raises(ModelError, match=r"glmport\.template \(--template\) glm4 contradicts the tokenizer"):
        get_template("glm4", tok3)
    with pytest.raises(ConfigError, match="combine is a GLM-4 option"):
        get_template("chatglm3", tok3, combine=True)
    with pytest.raises(ConfigError, match="unknown template 'glm5'"):
        get_template("glm5", tok3)


def test_eval_samples_per_reply(tok3):
    samples = get_template("chatglm3", tok3).eval_samples(conv(*MULTI_TURN), 256, 512)
    assert [(s.prompt_ids, s.output_ids, s.source) for s in samples] == [
        ([GMASK3, SOP, SYSTEM3, NL, *BE, USER3, NL, *HI, ASSISTANT3], [NL, *OK, EOS3], "t.jsonl:1"),
        ([GMASK3, SOP, SYSTEM3, NL, *BE, USER3, NL, *HI, ASSISTANT3, NL, *OK, USER3, NL, *GO, ASSISTANT3],
         [NL, *NO, EOS3], "t.jsonl:1"),
    ]


def test_eval_prompt_keeps_the_prefix_and_the_latest_context(tok3):
    [sample] = get_template("chatglm3", tok3).eval_samples(conv(("user", "abcdef"), ("assistant", "hi")), 6, 2)
    assert sample.prompt_ids == [GMASK3, SOP, *chars("cdef"), ASSISTANT3]  # not the head of the history
    assert sample.output_ids == [NL, HI[0]]  # cut to max_output_length


def test_eval_skips_replies_not_to_learn(tok3):
    messages = [("user", "hi"), Message("assistant", "ok", loss=False), ("user", "go"), ("assistant", "no")]
    [sample] = get_template("chatglm3", tok3).eval_samples(conv(*messages), 256, 512)
    assert sample.output_ids == [NL, *NO, EOS3]


def test_glm4_eval_ends_with_user_token_and_combine_does_not_leak_the_answer(tok4):
    plain = get_template("glm4", tok4).eval_samples(conv(*TWO_TURNS), 256, 512)
    assert [s.output_ids for s in plain] == [[NL, *OK, USER4], [NL, *NO, USER4]]
    [last] = get_template("glm4", tok4, combine=True).eval_samples(conv(*TWO_TURNS), 256, 512)
    assert last.prompt_ids == [GMASK4, SOP4, USER4, NL, *HI, ASSISTANT4, NL, *OK, USER4, NL, *GO, ASSISTANT4]
    assert last.output_ids == [NL, *NO, USER4]


def test_sanity_rows(tok3):
    sample = get_template("chatglm3", tok3).train_sample(conv(("user", "é"), ("assistant", "ok")), 256, 512)
    assert sanity_rows(tok3, sample) == [
        ("[gMASK]", GMASK3, X), ("sop", SOP, X), ("<|user|>", USER3, X), ("\n", NL, X),
        ("<0xC3>", 198, X), ("<0xA9>", 172, X),  # "é" as its two UTF-8 byte tokens
        ("<|assistant|>", ASSISTANT3, X), ("\n", NL, NL), ("o", 283, 283), ("k", 279, 279), ("</s>", EOS3, EOS3),
    ]
