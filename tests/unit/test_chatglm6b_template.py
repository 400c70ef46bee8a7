"""ChatGLM-6B token layouts, golden against the two upstream recipes (restated here, not copied):

* ``ptuning/main.py`` (THUDM/ChatGLM-6B): prompt = the bare question, or ``[Round i]\\n问：q\\n答：a\\n`` rounds and
  ``[Round n]\\n问：q\\n答：``; ``ids = build_inputs_with_special_tokens(encode(prompt), encode(answer))``;
  labels -100 up to ``<sop>``, the ids themselves from ``<sop>`` on;
* the ChatGLM-6B tuning tutorial (mymusise/ChatGLM-Tuning): ``encode(context)`` (with its specials) +
  ``encode(target)`` + eos; labels -100 for all but the last context token (``<sop>``).

The tokenizer is the fixture's remote ChatGLM-6B tokenizer, loaded with the compat patch set, so the special
ids and ``build_inputs_with_special_tokens`` are the tokenizer's own.
"""

from __future__ import annotations

import pytest

from glmport.data.formats import detect_format, read_record
from glmport.data.records import Conversation, Message
from glmport.data.templates import ChatGLM6BTemplate, detect_family, get_template
from glmport.errors import DataError

SEED = "问答你好训练世界"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from glmport.modeling import inspect_model_dir
    from glmport.patching.session import capture_process_state, patch_session, restore_process_state
    from glmport.plugins import PluginManager
    from glmport.tiny import build_tiny_model

    folder = build_tiny_model("tiny-remote", tmp_path_factory.mktemp("chatglm6b") / "m", family="chatglm",
                              num_layers=1, seed_text=SEED)
    manager = PluginManager(autoload=False)
    flags = capture_process_state()
    session = patch_session(inspect_model_dir(folder), manager.backends.get("cpu"), "infer",
                            registry=manager.patch_sets)
    try:
        yield session.remote_classes[2].from_pretrained(str(folder))
    finally:
        session.undo()
        restore_process_state(flags)


@pytest.fixture(scope="module")
def template(tokenizer):
    return get_template("auto", tokenizer, config={"model_type": "chatglm", "vocab_size": 130528,
                                                   "position_encoding_2d": True})


def ptuning_sample(tokenizer, prompt: str, answer: str):
    ids = tokenizer.build_inputs_with_special_tokens(tokenizer.encode(prompt, add_special_tokens=False),
                                                     tokenizer.encode(answer, add_special_tokens=False))
    context = ids.index(tokenizer.bos_token_id)
    return ids, [-100] * context + ids[context:]


def tutorial_sample(tokenizer, context: str, target: str):
    prompt = tokenizer.encode(context)  # with [gMASK] <sop>
    ids = prompt + tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids, [-100] * (len(prompt) - 1) + ids[len(prompt) - 1:]


def conversation(*turns, source="data.jsonl:1"):
    roles = {"s": "system", "u": "user", "a": "assistant"}
    return Conversation([Message(roles[role], text) for role, text in turns], source)


def sample(template, conv, max_in=512, max_out=512):
    out = template.train_sample(conv, max_in, max_out)
    return out.input_ids, out.labels


# ------------------------------------------------------------------------------------------ golden


def test_the_template_is_chosen_from_the_tokenizer(tokenizer, template):
    assert isinstance(template, ChatGLM6BTemplate) and template.name == "chatglm"
    assert template.detection.family == "chatglm" and "<sop> 130004" in template.detection.describe()
    assert (template.gmask, template.sop, template.eop) == (130001, 130004, 130005)
    assert template.stop_token_ids == [tokenizer.eos_token_id] == [130005]
    assert template.pad_token_id == tokenizer.pad_token_id
    assert not template.reply_metadata and template.tool_format is None
    assert detect_family(tokenizer).template == "chatglm"


def test_a_single_question_is_the_tutorial_layout_id_for_id(tokenizer, template):
    a, b, c = (tokenizer.convert_tokens_to_ids(ch) for ch in "abc")
    ids, labels = sample(template, conversation(("u", "ab"), ("a", "c")))
    assert ids == [a, b, 130001, 130004, c, 130005]
    assert labels == [-100, -100, -100, 130004, c, 130005]
    record = {"context": "Instruction: 训练\nAnswer: ", "target": "你好 world"}
    assert detect_format(record) == "context-target"
    conv = Conversation(read_record("context-target", record), "data.jsonl:1", record)
    assert sample(template, conv) == tutorial_sample(tokenizer, record["context"], record["target"])
    assert sample(template, conv) == ptuning_sample(tokenizer, record["context"], record["target"])


def test_rounds_are_ptuning_history_layout(tokenizer, template):
    conv = conversation(("u", "问一"), ("a", "答一"), ("u", "问二"), ("a", "答二"), ("u", "问三"), ("a", "答三"))
    prompt = "[Round 0]\n问：问一\n答：答一\n[Round 1]\n问：问二\n答：答二\n[Round 2]\n问：问三\n答："
    assert sample(template, conv) == ptuning_sample(tokenizer, prompt, "答三")
    # only the last reply is learned: the earlier ones are history, as upstream
    ids, labels = sample(template, conv)
    assert [token for token in labels if token != -100] == ids[ids.index(130004):]


def test_system_text_opens_the_prompt_and_loss_false_moves_the_answer(tokenizer, template):
    conv = conversation(("s", "你好"), ("u", "q1"), ("a", "a1"), ("u", "q2"), ("a", "a2"))
    assert sample(template, conv) == ptuning_sample(tokenizer, "你好\n[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答：",
                                                    "a2")
    conv.messages[-1].loss = False  # not learned: the answer is a1, what follows it is dropped
    assert sample(template, conv) == ptuning_sample(tokenizer, "你好\nq1", "a1")
    conv.messages[2].loss = False
    with pytest.raises(DataError, match="nothing to learn"):
        template.train_sample(conv, 64, 64)


def test_truncation_drops_rounds_then_trims_the_prompt_then_cuts_the_answer(tokenizer, template):
    # each round "[Round i]\n问：xxxxx\n答：yyyyy\n" is 26 tokens, the last "[Round n]\n问：qq\n答：" 17, the
    # answer 2 + 4 + 1: with max_input_length 44 the prompt may take 46 of the 53, so one round stays
    history = [("u", "x" * 5), ("a", "y" * 5)] * 3
    out = template.train_sample(conversation(*history, ("u", "qq"), ("a", "z" * 4)), 44, 8)
    expected = ptuning_sample(tokenizer, "[Round 0]\n问：xxxxx\n答：yyyyy\n[Round 1]\n问：qq\n答：", "z" * 4)
    assert (out.input_ids, out.labels) == expected and out.trimmed_messages == 4
    assert out.trimmed_tokens == 2 * 26
    # no round left to drop: the question is trimmed from its start, then the answer cut, <eop> kept
    tight = template.train_sample(conversation(("u", "q" * 50), ("a", "z" * 50)), 8, 8)
    assert len(tight.input_ids) == 8 + 8 + 1 and tight.input_ids[-1] == 130005
    assert tight.input_ids[:8] == tokenizer.encode("q" * 8, add_special_tokens=False)
    assert tight.labels.count(-100) == 9 and tight.labels[-1] == 130005  # 8 question tokens and [gMASK]


def test_eval_samples_and_inference_prompts(tokenizer, template):
    conv = conversation(("u", "q1"), ("a", "a1"), ("u", "q2"), ("a", "a2"))
    first, second = template.eval_samples(conv, 512, 512)
    assert first.prompt_ids == tokenizer.encode("q1") and first.output_ids == tokenizer.encode("a1", add_special_tokens=False) + [130005]
    assert second.prompt_ids == tokenizer.encode("[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答：")
    assert template.prompt_ids(conv.messages[:3]) == second.prompt_ids
    short = template.eval_samples(conv, 8, 2)[1]  # the history goes first
    assert short.prompt_ids == tokenizer.encode("q2") and len(short.output_ids) == 2
    long = template.eval_samples(conversation(("u", "q" * 20), ("a", "a")), 8, 8)[0]  # then the question's start
    assert long.prompt_ids == tokenizer.encode("q" * 6)
    with pytest.raises(DataError, match="must end with a user message"):
        template.prompt_ids(conv.messages)


@pytest.mark.parametrize("messages, what", [
    ([Message("system", "t", tools=[{"name": "f"}]), Message("user", "q"), Message("assistant", "a")], "declares tools"),
    ([Message("user", "q"), Message("assistant", "tool_call()", metadata="f"), Message("observation", "1"),
      Message("assistant", "a")], "is a tool call"),
    ([Message("user", "q"), Message("user", "q"), Message("assistant", "a")], "follows a user message"),
    ([Message("assistant", "a"), Message("user", "q"), Message("assistant", "a")], "answers no question"),
    ([Message("user", "q"), Message("system", "s"), Message("assistant", "a")], "can only open the conversation"),
])
def test_what_chatglm6b_cannot_express_is_refused_naming_the_record(template, messages, what):
    with pytest.raises(DataError) as refused:
        template.train_sample(Conversation(messages, "data.jsonl:7"), 64, 64)
    text = str(refused.value)
    assert "data.jsonl:7" in text and what in text and "ChatGLM-6B prompt format" in text
