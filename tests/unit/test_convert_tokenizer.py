"""glmport convert's fast tokenizer: the same ids as the model's own tokenizer, on real text.

SentencePiece (ChatGLM2/3) and tiktoken (GLM-4) models trained here on the real data sets stand in for the
real vocabulary files (convertkit); sentencepiece and tiktoken themselves are the reference. glmport's tiny
test tokenizers are checked through their remote code. Real tokenizer.model files: test_convert_upstream.py.
"""

from __future__ import annotations

import pytest
from convertkit import (
    CHATGLM2_SPECIALS,
    SHARED_DATA,
    SentencePieceSource,
    TiktokenSource,
    glm4_pattern,
    real_texts,
    train_sentencepiece,
    train_tiktoken_ranks,
)

from glmport.convert.tokenizer import SAMPLE_TEXTS, build, differences, mismatches

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data sets not found at {SHARED_DATA}")


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    texts = real_texts()
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), texts[: len(texts) // 2])  # half: unseen text too


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    texts = real_texts()
    return train_tiktoken_ranks(tmp_path_factory.mktemp("tiktoken"), texts[: len(texts) // 2], glm4_pattern())


@needs_data
def test_sentencepiece_conversion_gives_sentencepiece_ids_on_every_real_text(sentencepiece_model):
    source = SentencePieceSource(sentencepiece_model)
    built = build(source, "chatglm3")
    assert built.dummy_prefix and built.vocabulary == "SentencePiece model tokenizer.model"
    texts = real_texts() + SAMPLE_TEXTS
    assert mismatches(built.tokenizer, source, texts) == []
    assert len(texts) > 10000
    # special tokens right after the pieces, at the ids the model's tokenizer gives them
    for name, index in source.tokenizer.special_tokens.items():
        assert built.tokenizer.convert_tokens_to_ids(name) == index
    assert built.tokenizer("你好")["input_ids"][:2] == [source.tokenizer.special_tokens["[gMASK]"],
                                                        source.tokenizer.special_tokens["sop"]]
    assert built.tokenizer.eos_token_id == 2 and built.tokenizer.pad_token_id == 0


@needs_data
def test_tiktoken_conversion_gives_tiktoken_ids_on_every_real_text(tiktoken_file):
    source = TiktokenSource(tiktoken_file, glm4_pattern())
    built = build(source, "glm4")
    assert not built.dummy_prefix
    texts = real_texts() + SAMPLE_TEXTS + ("<|user|>inside<|assistant|>text",)
    assert mismatches(built.tokenizer, source, texts) == []
    assert built.tokenizer("hi")["input_ids"][:2] == [source.specials["[gMASK]"], source.specials["<sop>"]]
    assert built.tokenizer.eos_token == "<|endoftext|>"
    assert differences(built.tokenizer, source) == []  # GLM-4's own tokenizer reads special tokens in text too


@needs_data
def test_the_differences_are_found_by_probing_and_ordinary_words_are_not_among_them(sentencepiece_model):
    """ChatGLM3's tokenizer reads special-token spellings in text as text; a fast tokenizer must recognise
    them for chat templates. What differs is reported, not assumed; 'sop' and 'eop' only as whole words."""
    source = SentencePieceSource(sentencepiece_model)
    fast = build(source, "chatglm3").tokenizer
    found = differences(fast, source)
    assert len(found) == 2
    assert "<|user|>" in found[0] and "[gMASK]" in found[0] and "sop" not in found[0]
    assert "sop, eop" in found[1]
    words = ["sophisticated", "isopropyl", "Aesop", "eopsin", "sop流程", "desopy sopx"]
    assert mismatches(fast, source, words) == []
    assert source.tokenizer.special_tokens["sop"] in fast.encode("a sop b", add_special_tokens=False)


@needs_data
def test_chatglm2_word_tokens_take_the_whitespace_after_them(sentencepiece_model):
    """ChatGLM2's chat template writes 'sop ' before its prompt text (see glmport.convert.chat_template)."""
    source = SentencePieceSource(sentencepiece_model, CHATGLM2_SPECIALS)
    fast = build(source, "chatglm2").tokenizer
    sop = source.tokenizer.special_tokens["sop"]
    assert fast.encode("[gMASK]sop You are", add_special_tokens=False) == \
        [source.tokenizer.special_tokens["[gMASK]"], sop] + source.encode("You are")
    assert mismatches(fast, source, ["sophisticated", "isopropyl"]) == []


@pytest.mark.parametrize("family", ["chatglm3", "glm4", "chatglm2"])
def test_tiny_fixture_tokenizers_convert_exactly(family, tmp_path, tiny_source_tokenizer):
    """glmport's own test tokenizers (character vocabulary, byte fallback) through their remote code."""
    source = tiny_source_tokenizer(family)
    built = build(source, family)
    assert built.vocabulary == "glmport tiny vocabulary tiny_vocab.json"
    texts = SAMPLE_TEXTS + (real_texts()[:3000] if SHARED_DATA.is_dir() else ())
    assert mismatches(built.tokenizer, source, texts) == []
    # the saved tokenizer loads as a plain fast tokenizer with the same ids
    built.tokenizer.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert mismatches(loaded, source, SAMPLE_TEXTS) == []


@pytest.fixture(scope="module")
def tiny_source_tokenizer(tmp_path_factory):
    """The remote tokenizer of a tiny-remote folder, loaded with the compat patches (undone afterwards)."""
    from glmport.modeling import inspect_model_dir
    from glmport.patching.session import patch_session
    from glmport.plugins import PluginManager
    from glmport.tiny import build_tiny_model
    from glmport.tiny.remote import FIXTURE_REVISIONS

    manager = PluginManager(autoload=False)
    sessions, loaded = [], {}

    def load(family):
        if family not in FIXTURE_REVISIONS:
            pytest.skip(f"no {family} tiny fixture in this checkout")
        if family not in loaded:
            folder = build_tiny_model("tiny-remote", tmp_path_factory.mktemp(family), family=family)
            session = patch_session(inspect_model_dir(folder), manager.backends.get("cpu"), "infer",
                                    registry=manager.patch_sets)
            sessions.append(session)
            loaded[family] = session.remote_classes[2].from_pretrained(str(folder))
        return loaded[family]

    yield load
    for session in sessions:
        session.undo()


def test_a_vocabulary_glmport_cannot_read_is_refused(tmp_path):
    from glmport.errors import ModelError

    (tmp_path / "tokenizer.model").write_text("not a vocabulary\n")
    source = type("Source", (), {"vocab_file": str(tmp_path / "tokenizer.model")})()
    with pytest.raises(ModelError, match="not a vocabulary glmport can convert"):
        build(source, "chatglm3")
