"""The real data sets of ../shared/data: each loads in its format and every record trains with labels."""

from __future__ import annotations

import pytest

from glmport.data.loader import load_conversations
from glmport.data.spans import IGNORE_INDEX
from glmport.data.templates import get_template
from glmport.tiny.tokenizer import CHATGLM3, GLM4, build_fast_tokenizer

DATA_SETS = [
    ("advertisegen/dev.jsonl", "advertisegen", 1070),
    ("context-target/mixed_train_dataset.jsonl", "context-target", 902),
    ("context-target/mixed_dev_dataset.jsonl", "context-target", 122),
    ("huanhuan/huanhuan.json", "alpaca", 3631),
]


@pytest.fixture(scope="module")
def chatglm3():
    return get_template("chatglm3", build_fast_tokenizer(CHATGLM3))


@pytest.fixture(scope="module")
def glm4():
    return get_template("glm4", build_fast_tokenizer(GLM4), combine=True)


@pytest.mark.parametrize(("name", "fmt", "count"), DATA_SETS)
def test_loads_and_every_record_trains(shared_data, chatglm3, glm4, name, fmt, count):
    result = load_conversations(shared_data / name)
    assert (result.format, len(result.conversations), result.skipped) == (fmt, count, [])
    # Every record through ChatGLM3, every fourth through GLM-4 too (the tokenizer call dominates the time).
    runs = [(chatglm3, result.conversations), (glm4, result.conversations[::4])]
    for template, conversations in runs:
        for conv in conversations:
            # Upstream's default lengths. Chinese costs 3 byte tokens a character with the tiny tokenizers,
            # so the longer records get trimmed: they must keep labels besides the closing stop token.
            sample = template.train_sample(conv, 256, 512)
            assert len(sample.input_ids) <= 769
            assert any(label != IGNORE_INDEX for label in sample.labels[:-1]), conv.source


def test_huanhuan_sources_give_index_and_line(shared_data):
    result = load_conversations(shared_data / "huanhuan/huanhuan.json")
    path = shared_data / "huanhuan/huanhuan.json"
    assert result.conversations[0].source == f"{path}[0] (line 2)"
    assert result.conversations[1].source == f"{path}[1] (line 7)"  # five lines per pretty-printed record


def test_advertisegen_placeholders_survive_as_text(shared_data):
    tokenizer = build_fast_tokenizer(CHATGLM3)
    template = get_template("auto", tokenizer)
    result = load_conversations(shared_data / "advertisegen/dev.jsonl")
    marked = [c for c in result.conversations if "<UNK>" in c.messages[1].content and "BRAND" in c.messages[1].content]
    assert marked, "the data set has summaries with <UNK> and BRAND"
    for conv in marked:
        sample = template.train_sample(conv, 256, 512)
        assert tokenizer.unk_token_id not in sample.input_ids
        text = tokenizer.decode(sample.input_ids, skip_special_tokens=True)
        assert text.count("<UNK>") == conv.messages[1].content.count("<UNK>")
        assert text.count("BRAND") == conv.messages[1].content.count("BRAND")
