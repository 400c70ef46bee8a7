"""Truncation: history goes first, then prompt text, the answer last; a sample never loses all its labels.

Tiny ChatGLM3 tokenizer: one token per character ("a" 269 ... "z" 294, "\\n" 355). A message is
<|role|> "\\n" + its characters; a sample is [gMASK] sop + messages + </s>; the budget is
max_input_length + max_output_length + 1.
"""

from __future__ import annotations

import pytest

from glmport.data.records import Conversation, Message
from glmport.data.templates import get_template
from glmport.errors import DataError
from glmport.tiny.tokenizer import CHATGLM3, build_fast_tokenizer

X = -100
NL = 355
GMASK, SOP, SYSTEM, USER, ASSISTANT, EOS = 64790, 64792, 64794, 64795, 64796, 2


def ids(text: str) -> list[int]:
    return [269 + ord(c) - ord("a") for c in text]


@pytest.fixture(scope="module")
def template():
    return get_template("chatglm3", build_fast_tokenizer(CHATGLM3))


def conv(*pairs, source="t.jsonl:5") -> Conversation:
    return Conversation([Message(role, content) for role, content in pairs], source)


HISTORY = [("user", "aa"), ("assistant", "bb"), ("user", "cc"), ("assistant", "dd"), ("user", "ee"), ("assistant", "ff")]


def test_fits_untouched(template):
    sample = template.train_sample(conv(*HISTORY), 20, 6)  # 27 tokens, budget 27
    assert len(sample.input_ids) == 27 and (sample.trimmed_tokens, sample.trimmed_messages) == (0, 0)


def test_oldest_turn_dropped_first(template):
    sample = template.train_sample(conv(*HISTORY), 12, 7)  # 27 tokens, budget 20
    assert sample.input_ids == [GMASK, SOP, USER, NL, *ids("cc"), ASSISTANT, NL, *ids("dd"),
                                USER, NL, *ids("ee"), ASSISTANT, NL, *ids("ff"), EOS]
    assert sample.labels == [X, X, X, X, X, X, X, NL, *ids("dd"), USER, X, X, X, X, NL, *ids("ff"), EOS]
    assert (sample.trimmed_tokens, sample.trimmed_messages) == (8, 2)


def test_as_many_turns_as_needed_go(template):
    sample = template.train_sample(conv(*HISTORY), 10, 6)  # budget 17
    assert sample.input_ids == [GMASK, SOP, USER, NL, *ids("ee"), ASSISTANT, NL, *ids("ff"), EOS]
    assert (sample.trimmed_tokens, sample.trimmed_messages) == (16, 4)


def test_long_prompt_trimmed_from_its_start_system_kept(template):
    sample = template.train_sample(conv(("system", "st"), ("user", "abcdefghij"), ("assistant", "xy")), 12, 4)
    assert sample.input_ids == [GMASK, SOP, SYSTEM, NL, *ids("st"), USER, NL, *ids("ghij"), ASSISTANT, NL, *ids("xy"), EOS]
    assert sample.labels == [X] * 13 + [NL, *ids("xy"), EOS]
    assert (sample.trimmed_tokens, sample.trimmed_messages) == (6, 0)


def test_answer_cut_last_keeping_the_stop_target(template):
    sample = template.train_sample(conv(("user", "q"), ("assistant", "abcdefghij")), 5, 6)  # 18 tokens, budget 12
    assert sample.input_ids == [GMASK, SOP, USER, NL, *ids("q"), ASSISTANT, NL, *ids("abcd"), EOS]
    assert sample.labels == [X] * 6 + [NL, *ids("abcd"), EOS]
    assert (sample.trimmed_tokens, sample.trimmed_messages) == (6, 0)


def test_long_answer_is_cut_rather_than_stripping_a_prompt_within_its_share(template):
    # The prompt (13 tokens) is within max_input_length: the overlong answer is cut, the history stays.
    messages = [("user", "aa"), ("assistant", "bb"), ("user", "q"), ("assistant", "abcdefghij")]
    sample = template.train_sample(conv(*messages), 13, 5)  # 26 tokens, budget 19
    assert sample.input_ids == [GMASK, SOP, USER, NL, *ids("aa"), ASSISTANT, NL, *ids("bb"),
                                USER, NL, *ids("q"), ASSISTANT, NL, *ids("abc"), EOS]
    assert (sample.trimmed_tokens, sample.trimmed_messages) == (7, 0)


def test_messages_after_the_answer_go_first_but_leave_the_stop_target(template):
    sample = template.train_sample(conv(("user", "q"), ("assistant", "ab"), ("user", "tail")), 5, 4)  # 16 tokens, budget 10
    assert sample.input_ids == [GMASK, SOP, USER, NL, *ids("q"), ASSISTANT, NL, *ids("ab"), USER]
    assert sample.labels == [X] * 6 + [NL, *ids("ab"), USER]
    assert (sample.trimmed_tokens, sample.trimmed_messages) == (6, 1)


def test_never_without_labels(template):
    long = conv(("system", "abcdefgh"), ("user", "abcdefghijkl"), ("assistant", "abcdefghijkl"),
                ("user", "abcdefghijklmnop"), ("assistant", "abcdefghijklmnopqrst"))
    for max_input in range(1, 40):
        for max_output in range(1, 40):
            budget = max_input + max_output + 1
            try:
                sample = template.train_sample(long, max_input, max_output)
            except DataError:
                # Only below the fixed overhead: [gMASK] sop, the role tokens and "\n" of system, last user
                # and answer, one answer token and </s>.
                assert budget < 2 + 2 + 2 + 2 + 1 + 1, (max_input, max_output)
                continue
            assert len(sample.input_ids) <= budget
            assert sample.input_ids[-1] == EOS and sample.labels[-1] == EOS
            assert any(label not in (X, EOS) for label in sample.labels)


def test_impossible_budget_names_the_source(template):
    # Smallest sample: [gMASK] sop <|user|> \n <|assistant|> \n one token </s> = 8 > 7.
    with pytest.raises(DataError) as caught:
        template.train_sample(conv(("user", "question"), ("assistant", "answer"), source="data/t.jsonl:5"), 3, 3)
    assert str(caught.value).startswith("data/t.jsonl:5: the sample cannot fit the token budget")
    [problem] = caught.value.problems
    assert problem.where == "data/t.jsonl:5"
    assert "needs 8 tokens; the budget is max_input_length + max_output_length + 1 = 7" in problem.what
