"""compat-tokenizer-pad against both ``_pad`` signatures the remote tokenizers have had: the pre-4.45 one
(``max_length, padding_strategy, pad_to_multiple_of, return_attention_mask``) of every revision in the
manifest, and the late-2024 GLM-4 one that takes ``padding_side`` third, before ``padding_strategy``. The
tokenizer classes here are stand-ins with only that method; they record what reaches it."""

from __future__ import annotations

import types

import pytest
from patchkit import backend, capture_state
from transformers.utils import PaddingStrategy

from glmport.patching.session import apply_patches


def _pre_445(self, encoded_inputs, max_length=None, padding_strategy=PaddingStrategy.DO_NOT_PAD,
             pad_to_multiple_of=None, return_attention_mask=None):
    self.seen = {"max_length": max_length, "padding_strategy": padding_strategy,
                 "pad_to_multiple_of": pad_to_multiple_of, "return_attention_mask": return_attention_mask}
    return encoded_inputs


def _late_2024(self, encoded_inputs, max_length=None, padding_side="left",
               padding_strategy=PaddingStrategy.DO_NOT_PAD, pad_to_multiple_of=None, return_attention_mask=None):
    self.seen = {"max_length": max_length, "padding_side": padding_side, "padding_strategy": padding_strategy,
                 "pad_to_multiple_of": pad_to_multiple_of, "return_attention_mask": return_attention_mask}
    return encoded_inputs


def _patch(family: str):
    from glmport.patches import builtin_patch_sets

    return next(p for s in builtin_patch_sets() for p in s.patches
                if p.id == "compat-tokenizer-pad" and p.family == family)


@pytest.mark.parametrize("family, class_name", [("chatglm3", "ChatGLMTokenizer"), ("glm4", "ChatGLM4Tokenizer")])
@pytest.mark.parametrize("pad", [_pre_445, _late_2024], ids=["pre-4.45-signature", "late-2024-signature"])
def test_arguments_arrive_by_name(family, class_name, pad):
    tokenizer_class = type(class_name, (), {"_pad": pad})
    module = types.ModuleType(f"stand_in_{family}_tokenizer")
    setattr(module, class_name, tokenizer_class)
    recorder = apply_patches([_patch(family)], {"tokenization": module}, backend("cpu"), "infer",
                             state=capture_state(), family=family, revisions={})
    try:
        tokenizer = tokenizer_class()
        # the keywords transformers 5's pad() passes
        tokenizer._pad({"input_ids": [5, 6]}, max_length=8, padding_strategy=PaddingStrategy.MAX_LENGTH,
                       pad_to_multiple_of=4, padding_side="left", return_attention_mask=True)
        expected = {"max_length": 8, "padding_strategy": PaddingStrategy.MAX_LENGTH, "pad_to_multiple_of": 4,
                    "return_attention_mask": True}
        if pad is _late_2024:
            expected["padding_side"] = "left"
        assert tokenizer.seen == expected

        tokenizer._pad({"input_ids": [5]}, max_length=None, padding_strategy=None)  # no strategy: do not pad
        assert tokenizer.seen["padding_strategy"] == PaddingStrategy.DO_NOT_PAD
        with pytest.raises(ValueError, match="pads on the left only"):
            tokenizer._pad({"input_ids": [5]}, padding_side="right")
    finally:
        recorder.undo()
    assert tokenizer_class.__dict__["_pad"] is pad
