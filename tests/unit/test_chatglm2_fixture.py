"""glmport's from-scratch ChatGLM2-6B fixture: the tokenizer of its own, the model code rendered from the
ChatGLM3 sources with ChatGLM2's differences.

Like the other fixtures it must compute the native tiny model's function and fail on transformers 5 where
the upstream ChatGLM2 files fail (measured with the real files: the Jul-2023 tokenizer cannot even be built,
every ``encode`` fails in ``_pad``), so that the compat patches have something real to fix. The numerics
and the generation hooks shared with ChatGLM3 run for ChatGLM2 in test_tiny_remote.py too.
"""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
from test_tiny_remote import (
    SEED_TEXT,
    TEXTS,
    _with_generation_fixes,
    _with_tokenizer_fixes,
    batch,
    fixture_modules,
    make_config,
    native,
    remote_model,
)

from glmport.tiny.build import remote_state_dict
from glmport.tiny.remote import FIXTURE_REVISIONS, rendered_sources, write_remote_tokenizer
from glmport.tiny.tokenizer import CHATGLM2, build_fast_tokenizer

OLD, NEW = FIXTURE_REVISIONS["chatglm2"]
SPECIALS = {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793}


def test_revisions_and_what_they_imitate():
    from glmport.tiny.remote import imitated_revision

    assert (OLD, NEW) == ("chatglm2-2023-07", "chatglm2-2023-10")
    assert (imitated_revision(OLD), imitated_revision(NEW)) == ("chatglm2-6b-2023-07", "chatglm2-6b-2023-10")


def _init_calls(text: str) -> list[str]:
    """The calls in ChatGLMTokenizer.__init__, in order, as source text."""
    tree = ast.parse(text)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ChatGLMTokenizer")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return [ast.unparse(node.value.func) for node in init.body
            if isinstance(node, (ast.Expr, ast.Assign)) and isinstance(node.value, ast.Call)]


def test_the_revisions_differ_in_the_upstream_constructs():
    old, new = (rendered_sources("chatglm2", rev) for rev in (OLD, NEW))
    # tokenizer: Jul 2023 initializes the base class before it has a vocabulary; Oct 2023 after
    assert _init_calls(old["tokenization_chatglm.py"])[0] == "super().__init__"
    assert _init_calls(new["tokenization_chatglm.py"])[-1] == "super().__init__"
    # generation: Jul 2023 cuts to the last token with or without a cache, and knows no use_cache
    old_prepare = inspect.signature(fixture_modules("chatglm2", OLD).modeling.ChatGLMForConditionalGeneration
                                    .prepare_inputs_for_generation)
    new_prepare = inspect.signature(fixture_modules("chatglm2", NEW).modeling.ChatGLMForConditionalGeneration
                                    .prepare_inputs_for_generation)
    assert "use_cache" not in old_prepare.parameters and "use_cache" in new_prepare.parameters
    # configuration: classifier_dropout came with the classifier (Sep 2023)
    old_config, new_config = (fixture_modules("chatglm2", rev).config.ChatGLMConfig for rev in (OLD, NEW))
    assert "classifier_dropout" not in inspect.signature(old_config).parameters
    assert "classifier_dropout" in inspect.signature(new_config).parameters
    assert new["configuration_chatglm.py"] == rendered_sources("chatglm3", "chatglm3-2023-12")["configuration_chatglm.py"]
    # both: ChatGLM3's 2023 constructs (old checkpointing hook) and rotary angles in the model's dtype
    for text in (old["modeling_chatglm.py"], new["modeling_chatglm.py"]):
        assert "def _set_gradient_checkpointing(self, module, value=False)" in text
        assert "torch.arange(seq_len, dtype=dtype" in text and "def build_stream_inputs" in text


def test_rotary_angles_in_half_precision_round_the_larger_positions():
    """What compat-rotary-fp32 fixes: in bf16 the angles lose precision, and position 257 is computed as 256."""
    modeling = fixture_modules("chatglm2", NEW).modeling
    table = modeling.RotaryEmbedding(8, dtype=torch.bfloat16)(300).float()
    exact = modeling.RotaryEmbedding(8, dtype=torch.float32)(300).to(torch.bfloat16).float()
    assert torch.equal(table[257], table[256]) and not torch.equal(exact[257], exact[256])
    assert (table - exact).abs().max() > 0.5  # far positions: wrong angles, not rounding noise
    chatglm3 = fixture_modules("chatglm3", "chatglm3-2023-12").modeling  # ChatGLM3 went back to fp32 angles
    assert torch.equal(chatglm3.RotaryEmbedding(8, dtype=torch.bfloat16)(300).float(), exact)


def test_generation_without_a_cache_sees_one_token_in_the_old_revision():
    """What compat-generation-use-cache fixes: the Jul-2023 code cuts the input although no cache holds it."""
    ids = batch(3)
    for revision, length in ((OLD, 1), (NEW, ids.shape[1])):
        model = remote_model("chatglm2", revision)
        prepared = model.prepare_inputs_for_generation(ids, past_key_values=None, is_first_forward=False)
        assert prepared["input_ids"].shape[1] == length, revision


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatglm2-tokenizer")
    write_remote_tokenizer(folder, CHATGLM2, SEED_TEXT)
    return folder


def test_the_jul_2023_tokenizer_cannot_be_built_on_transformers_5(tokenizer_folder):
    cls = fixture_modules("chatglm2", OLD).tokenization.ChatGLMTokenizer
    with pytest.raises(TypeError, match="'property' object cannot be interpreted as an integer"):
        cls.from_pretrained(str(tokenizer_folder))  # as the real file fails (get_vocab before the wrapper exists)


def test_the_oct_2023_tokenizer_builds_and_fails_in_pad(tokenizer_folder):
    tokenizer = fixture_modules("chatglm2", NEW).tokenization.ChatGLMTokenizer.from_pretrained(str(tokenizer_folder))
    assert "padding_side" not in inspect.signature(type(tokenizer)._pad).parameters
    with pytest.raises(TypeError, match="_pad\\(\\) got an unexpected keyword argument 'padding_side'"):
        tokenizer("hello")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    cls = fixture_modules("chatglm2", NEW).tokenization.ChatGLMTokenizer
    return _with_tokenizer_fixes(cls).from_pretrained(str(tokenizer_folder))


def test_special_tokens_as_the_chatglm2_tokenizer_has_them(tokenizer):
    for token, token_id in SPECIALS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id == tokenizer.get_command(token)
        assert tokenizer.convert_ids_to_tokens(token_id) == ""  # upstream reads its special tokens back as ""
    assert tokenizer.convert_tokens_to_ids("<|user|>") == 0  # no role tokens: an unknown piece
    with pytest.raises(AssertionError, match="<\\|user\\|> is not a special token for GLMTokenizer"):
        tokenizer.get_command("<|user|>")
    assert (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (None, 0, 2)
    assert (tokenizer.unk_token, tokenizer.pad_token, tokenizer.eos_token) == ("<unk>", "<unk>", "</s>")
    assert tokenizer.vocab_size == 64794


def test_text_encodes_like_the_native_tiny_tokenizer(tokenizer):
    reference = build_fast_tokenizer(CHATGLM2, SEED_TEXT)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("hi") == [64790, 64792, *reference.encode("hi", add_special_tokens=False)]
    assert tokenizer.build_inputs_with_special_tokens([7], [8]) == [64790, 64792, 7, 8, 2]


def test_build_prompt_numbers_rounds_from_1(tokenizer):
    assert tokenizer.build_prompt("q") == "[Round 1]\n\n问：q\n\n答："
    assert tokenizer.build_prompt("q3", [("q1", "a1"), ("q2", "a2")]) == (
        "[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答：a2\n\n[Round 3]\n\n问：q3\n\n答：")


def test_left_padding_with_position_ids(tokenizer):
    encoded = tokenizer(["hi", "hello"], padding=True)
    assert encoded["attention_mask"][0] == [0, 0, 0, 1, 1, 1, 1]
    assert encoded["position_ids"][0] == [0, 0, 0, 0, 1, 2, 3]
    assert encoded["input_ids"][0][:3] == [0, 0, 0]


def test_chat_takes_question_answer_history_and_generates_greedily(tokenizer):
    modules = fixture_modules("chatglm2", NEW)
    config = make_config("chatglm2", NEW)
    model = _with_generation_fixes(modules.modeling.ChatGLMForConditionalGeneration)(config, empty_init=False)
    del config.max_length  # the compat patch lends it for __init__ only; generate() rejects it on the config
    model.load_state_dict(remote_state_dict(native("chatglm2")), strict=True)
    model.eval()
    history = [("hi", "ok")]
    prompt = tokenizer([tokenizer.build_prompt("go", history)], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = prompt
        for _ in range(3):
            step = model(input_ids=greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, step], dim=-1)
    expected = tokenizer.decode(greedy[0, prompt.shape[1]:].tolist()).strip()
    reply, new_history = model.chat(tokenizer, "go", history=history, max_length=None, max_new_tokens=3,
                                    do_sample=False, eos_token_id=[-1])  # never stop early: compare 3 tokens
    assert reply == expected and new_history == [("hi", "ok"), ("go", expected)] and history == [("hi", "ok")]
