"""The ChatGLM2-6B template: golden token streams and labels written out by hand from the layout of the
official recipe (ChatGLM2-6B ``ptuning/main.py`` and the tokenizer's ``build_prompt``), not from the code
under test.

The recipe: ``[gMASK] sop`` + encode("[Round 1]\\n\\n问：{question}\\n\\n答：") + encode(answer) + ``</s>``; the labels
are the answer tokens themselves and the ``</s>`` (no shift). Earlier rounds are "[Round N]\\n\\n问：...\\n\\n答：..."
joined by "\\n\\n", numbered from 1.

The tiny tokenizers encode one character per token: ``string.printable`` from 259 ("\\n" 355, "a" 269), then
"，。！？、：" from 359 (the full-width colon "：" is 364); other characters as their UTF-8 byte tokens
(3 + byte): 问 is E9 97 AE, 答 is E7 AD 94. ChatGLM2's special tokens sit at its tokenizer's ids.
"""

from __future__ import annotations

import string

import pytest

from glmport.data.formats import read_record
from glmport.data.records import Conversation, Message
from glmport.data.templates import get_template
from glmport.errors import ConfigError, DataError, ModelError

X = -100
GMASK, SOP, EOS, PAD = 64790, 64792, 2, 0
NL, COLON = 355, 364
QUESTION_MARK = [3 + 0xE9, 3 + 0x97, 3 + 0xAE]  # 问
ANSWER_MARK = [3 + 0xE7, 3 + 0xAD, 3 + 0x94]  # 答


def chars(text: str) -> list[int]:
    return [259 + string.printable.index(c) for c in text]


def ask(number: int, question: str, first: bool = True) -> list[int]:
    """The tokens of "[Round N]\\n\\n问：{question}\\n\\n答：" (after an earlier round: preceded by "\\n\\n")."""
    return ([] if first else [NL, NL]) + chars(f"[Round {number}]") + [NL, NL] + QUESTION_MARK + [COLON] + \
        chars(question) + [NL, NL] + ANSWER_MARK + [COLON]


def conv(*messages, source="t.jsonl:3") -> Conversation:
    return Conversation([m if isinstance(m, Message) else Message(*m) for m in messages], source)


@pytest.fixture(scope="module")
def template(tok2):
    return get_template("chatglm2", tok2)


def test_the_character_rule_holds(tok2):
    assert tok2.encode("问：答", add_special_tokens=False) == [*QUESTION_MARK, COLON, *ANSWER_MARK]
    assert tok2.encode("[R 1]\n", add_special_tokens=False) == chars("[R 1]\n")


def test_single_round_is_the_ptuning_layout(template):
    sample = template.train_sample(conv(("user", "hi"), ("assistant", "ok")), 256, 512)
    prompt = [GMASK, SOP, *ask(1, "hi")]
    assert sample.input_ids == prompt + chars("ok") + [EOS]
    # no shift: the answer's own tokens and the </s> after it are the labels
    assert sample.labels == [X] * len(prompt) + chars("ok") + [EOS]


def test_rounds_are_numbered_from_1_and_joined_by_a_blank_line(template):
    messages = [("user", "hi"), ("assistant", "ok"), ("user", "go"), ("assistant", "no")]
    sample = template.train_sample(conv(*messages), 256, 512)
    first, second = [GMASK, SOP, *ask(1, "hi")], ask(2, "go", first=False)
    assert sample.input_ids == first + chars("ok") + second + chars("no") + [EOS]
    # every reply is learned; only the last one is followed by </s> (between rounds comes the next question)
    assert sample.labels == [X] * len(first) + chars("ok") + [X] * len(second) + chars("no") + [EOS]


def test_a_system_message_goes_before_the_first_round(template):
    sample = template.train_sample(conv(("system", "be"), ("user", "hi"), ("assistant", "ok")), 256, 512)
    prompt = [GMASK, SOP, *chars("be\n\n"), *ask(1, "hi")]
    assert sample.input_ids == prompt + chars("ok") + [EOS]
    assert sample.labels == [X] * len(prompt) + chars("ok") + [EOS]


def test_loss_flags(template):
    skipped_first = [("user", "hi"), Message("assistant", "ok", loss=False), ("user", "go"), ("assistant", "no")]
    sample = template.train_sample(conv(*skipped_first), 256, 512)
    prompt = [GMASK, SOP, *ask(1, "hi"), *chars("ok"), *ask(2, "go", first=False)]
    assert sample.input_ids == prompt + chars("no") + [EOS]
    assert sample.labels == [X] * len(prompt) + chars("no") + [EOS]

    # the last learned reply ends the sample: what follows it teaches nothing
    skipped_last = [("user", "hi"), ("assistant", "ok"), ("user", "go"), Message("assistant", "no", loss=False)]
    sample = template.train_sample(conv(*skipped_last), 256, 512)
    assert sample.input_ids == [GMASK, SOP, *ask(1, "hi"), *chars("ok"), EOS]
    assert sample.labels == [X] * (2 + len(ask(1, "hi"))) + chars("ok") + [EOS]

    with pytest.raises(DataError, match=r"t\.jsonl:3: nothing to learn"):
        template.train_sample(conv(("user", "hi"), Message("assistant", "ok", loss=False)), 256, 512)


def test_content_and_summary_records(template):
    messages = read_record("advertisegen", {"content": "a#b", "summary": "cd"})
    sample = template.train_sample(Conversation(messages, "dev.jsonl:1"), 256, 512)
    assert sample.input_ids == [GMASK, SOP, *ask(1, "a#b"), *chars("cd"), EOS]


@pytest.mark.parametrize("messages, says", [
    ([Message("system", "", tools=[{"name": "f"}]), ("user", "hi"), ("assistant", "ok")],
     "message 0 (system) declares tools"),
    ([("user", "hi"), Message("assistant", "tool_call(x=1)", metadata="f"), ("observation", "1"), ("assistant", "ok")],
     "message 1 (assistant) is a tool call"),
    ([("user", "hi"), ("observation", "1"), ("assistant", "ok")], "message 1 (observation) is a tool's result"),
    ([("user", "hi"), ("system", "be"), ("assistant", "ok")], "message 1 (system): a system message can only open"),
    ([("user", "hi"), ("user", "go"), ("assistant", "ok")], "message 1 (user) follows a user message"),
    ([("assistant", "ok")], "message 0 (assistant) opens the conversation"),
], ids=["tools", "tool-call", "observation", "late-system", "two-questions", "answer-first"])
def test_what_chatglm2_cannot_express_is_refused_naming_the_record(template, messages, says):
    with pytest.raises(DataError) as refused:
        template.train_sample(conv(*messages, source="data/train.jsonl:7"), 256, 512)
    assert str(refused.value).startswith("data/train.jsonl:7: the ChatGLM2-6B prompt format cannot express")
    problem = refused.value.problems[0]
    assert problem.where == "data/train.jsonl:7" and says in problem.what and problem.fix


def test_tool_records_from_a_file_are_refused(template):
    record = {"tools": [{"name": "f"}], "conversations": [
        {"role": "user", "content": "hi"},
        {"role": "tool", "name": "f", "parameters": {"x": 1}, "observation": {"y": 2}},
        {"role": "assistant", "content": "ok"}]}
    with pytest.raises(DataError, match="ChatGLM2-6B has no tool, tool-call or observation turns"):
        template.train_sample(Conversation(read_record("conversations", record), "t.jsonl:1"), 256, 512)


def test_truncation_trims_the_question_and_keeps_the_round_header_and_the_answer_mark(template):
    # 2 + 31 prompt tokens + "ok" </s>; the budget is 24 + 4 + 1 = 29: the question loses its first 7 characters
    sample = template.train_sample(conv(("user", "abcdefghij"), ("assistant", "ok")), 24, 4)
    assert sample.input_ids == [GMASK, SOP, *ask(1, "hij"), *chars("ok"), EOS]
    assert sample.trimmed_tokens == 7 and sample.labels[-3:] == [*chars("ok"), EOS]


def test_a_long_answer_is_cut_and_keeps_its_stop_label(template):
    # a prompt of 2 + 23 tokens fits max_input_length 25; the budget 25 + 2 + 1 leaves the answer 2 tokens
    sample = template.train_sample(conv(("user", "hi"), ("assistant", "abcdefgh")), 25, 2)
    assert sample.input_ids == [GMASK, SOP, *ask(1, "hi"), *chars("ab"), EOS]
    assert sample.labels[-3:] == [*chars("ab"), EOS] and sample.trimmed_tokens == 6


def test_history_goes_before_the_question_of_the_answer(template):
    messages = [("user", "aaaa"), ("assistant", "bb"), ("user", "cc"), ("assistant", "dd")]
    sample = template.train_sample(conv(*messages), 25, 4)
    assert sample.trimmed_messages == 2  # the first round went whole
    assert sample.input_ids == [GMASK, SOP, *ask(2, "cc", first=False), *chars("dd"), EOS]


def test_eval_samples_and_inference_prompts_end_with_the_answer_mark(template):
    messages = [("system", "be"), ("user", "hi"), ("assistant", "ok"), ("user", "go"), ("assistant", "no")]
    samples = template.eval_samples(conv(*messages), 256, 512)
    head = [GMASK, SOP, *chars("be\n\n"), *ask(1, "hi")]
    assert [(s.prompt_ids, s.output_ids) for s in samples] == [
        (head, [*chars("ok"), EOS]),
        (head + chars("ok") + ask(2, "go", first=False), [*chars("no"), EOS]),
    ]
    asked = [Message(*m) for m in messages[:4]]
    assert template.prompt_ids(asked) == samples[1].prompt_ids
    with pytest.raises(DataError, match="the prompt must end with a user message"):
        template.prompt_ids([Message("user", "hi"), Message("assistant", "ok")])


def test_stop_and_pad_ids(template):
    assert (template.stop_token_ids, template.pad_token_id, template.prefix) == ([EOS], PAD, [GMASK, SOP])
    assert template.role_ids == {}


def test_combine_is_refused_and_the_chatglm3_template_cannot_take_a_chatglm2_tokenizer(tok2):
    with pytest.raises(ConfigError, match="the ChatGLM2-6B recipe has no combine mode"):
        get_template("chatglm2", tok2, combine=True)
    with pytest.raises(ModelError, match=r"glmport\.template \(--template\) chatglm3 contradicts the tokenizer"):
        get_template("chatglm3", tok2)


def test_a_chatglm3_tokenizer_cannot_take_the_chatglm2_template(tok3):
    with pytest.raises(ModelError, match=r"glmport\.template \(--template\) chatglm2 contradicts the tokenizer"):
        get_template("chatglm2", tok3)


# --- the real data sets of ../shared/data, and a folder that mixes generations -------------------------------


@pytest.mark.parametrize(("name", "count"), [("advertisegen/dev.jsonl", 1070),
                                             ("context-target/mixed_train_dataset.jsonl", 902),
                                             ("huanhuan/huanhuan.json", 3631)])
def test_every_real_record_trains_with_labels(shared_data, template, name, count):
    from glmport.data.loader import load_conversations

    result = load_conversations(shared_data / name)
    assert len(result.conversations) == count and result.skipped == []
    for conv in result.conversations[::3]:  # every third: the tokenizer call dominates the time
        sample = template.train_sample(conv, 256, 512)
        assert sample.input_ids[:2] == [GMASK, SOP] and sample.input_ids[-1] == EOS and len(sample.input_ids) <= 769
        learned = [label for label in sample.labels if label != X]
        assert len(learned) > 1 and learned[-1] == EOS, conv.source  # an answer, then its stop label


def test_a_folder_with_chatglm3_code_and_a_chatglm2_tokenizer_is_refused(tmp_path):
    import json
    import shutil

    from glmport.testing import run_cli
    from glmport.tiny import build_tiny_model

    folder = build_tiny_model("tiny-remote", tmp_path / "mixed", num_layers=1)  # ChatGLM3 code and tokenizer
    chatglm2 = build_tiny_model("tiny-remote", tmp_path / "chatglm2", family="chatglm2", num_layers=1)
    for name in ("tokenization_chatglm.py", "tokenizer_config.json", "tiny_vocab.json"):
        shutil.copyfile(chatglm2 / name, folder / name)
    (tmp_path / "train.jsonl").write_text(json.dumps({"content": "a", "summary": "b"}) + "\n")
    (tmp_path / "config.yaml").write_text(
        "data_config: {train_file: train.jsonl}\nmax_input_length: 16\nmax_output_length: 16\n"
        f"training_args: {{output_dir: {tmp_path / 'out'}, max_steps: 1, report_to: none}}\n"
        f"glmport: {{model_dir: {folder}, dtype: fp32}}\n")
    result = run_cli("train", tmp_path / "config.yaml")
    assert result.exit_code == 2, result
    assert "the model's code and its tokenizer are of different generations" in result.stderr
    assert "remote code (modeling_chatglm.py glmport-fixture-chatglm3-2024-06): chatglm3 code" in result.stderr
    assert "a chatglm2 tokenizer" in result.stderr and "put the tokenizer files of the same model download" in result.stderr
