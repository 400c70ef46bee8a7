"""Tokenizers made on the spot, with the special tokens at the ids the real ChatGLM3 / GLM-4 tokenizers use.

Nothing is downloaded: the vocabulary is the 256 byte tokens (so any text encodes, through byte fallback),
the characters of a seed text, and filler up to the first special id. Encoding is character by character,
which is all a tiny test model needs, while the special tokens sit exactly where the upstream templates
put them ([gMASK] 64790, <|user|> 64795, ...), so token streams can be compared id for id with upstream.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SpecialLayout:
    """Where a model family's tokenizer keeps its special tokens."""

    family: str
    specials: dict[str, int]
    first_special: int
    padded_vocab_size: int
    unk: str
    bos: str | None
    eos: str
    pad: str


CHATGLM3 = SpecialLayout(
    family="chatglm3",
    specials={
        "[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793,
        "<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796, "<|observation|>": 64797,
    },
    first_special=64789,
    padded_vocab_size=65024,
    unk="<unk>", bos="<s>", eos="</s>", pad="<unk>",
)

GLM4 = SpecialLayout(
    family="glm4",
    specials={
        "<|endoftext|>": 151329, "[MASK]": 151330, "[gMASK]": 151331, "[sMASK]": 151332, "<sop>": 151333,
        "<eop>": 151334, "<|system|>": 151335, "<|user|>": 151336, "<|assistant|>": 151337,
        "<|observation|>": 151338, "<|begin_of_image|>": 151339, "<|end_of_image|>": 151340,
        "<|begin_of_video|>": 151341, "<|end_of_video|>": 151342,
    },
    first_special=151329,
    padded_vocab_size=151552,
    unk="<unk>", bos=None, eos="<|endoftext|>", pad="<|endoftext|>",
)

CHATGLM2 = SpecialLayout(
    family="chatglm2",  # ChatGLM2-6B: ChatGLM3's SentencePiece ids, but no role tokens ("[Round N]" prompts)
    specials={"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793},
    first_special=64789,
    padded_vocab_size=65024,
    unk="<unk>", bos="<s>", eos="</s>", pad="<unk>",
)

LAYOUTS = {"chatglm3": CHATGLM3, "glm4": GLM4, "chatglm2": CHATGLM2}

CHATGLM = SpecialLayout(
    family="chatglm",  # ChatGLM-6B (v1): vocabulary of 130528, <sop>/<eop> as bos/eos, no role tokens
    specials={"[MASK]": 130000, "[gMASK]": 130001, "<sop>": 130004, "<eop>": 130005},
    first_special=130000,
    padded_vocab_size=130528,
    unk="<unk>", bos="<sop>", eos="<eop>", pad="<unk>",
)

LAYOUTS["chatglm"] = CHATGLM  # ChatGLM-6B trains too: tiny-remote folders only (no native class computes it)
RECOGNISED_LAYOUTS = {**LAYOUTS, "chatglm2": CHATGLM2, "chatglm": CHATGLM}

# Characters every tiny vocabulary has, besides those of the seed text.
BASE_CHARACTERS = string.printable + "，。！？、：；“”‘’（）《》【】—…·￥"


def base_vocabulary(layout: SpecialLayout, seed_text: str = "") -> dict[str, int]:
    """token -> id: ``<unk> <s> </s>``, 256 byte tokens, characters, filler, then the special tokens."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for token in ("<unk>", "<s>", "</s>"):
        add(token)
    for byte in range(256):
        add(f"<0x{byte:02X}>")
    for char in BASE_CHARACTERS + "".join(sorted(set(seed_text))):
        if char not in layout.specials:
            add(char)
    if len(vocab) > layout.first_special:
        raise ValueError(f"seed text has too many distinct characters ({len(vocab)}) for a {layout.family} vocabulary")
    filler = 0
    while len(vocab) < layout.first_special:
        vocab[f"<unused_{filler}>"] = len(vocab)
        filler += 1
    for token, token_id in layout.specials.items():
        vocab[token] = token_id
    return vocab


def build_tokenizer_object(layout: SpecialLayout, seed_text: str = ""):
    """A ``tokenizers.Tokenizer``: character level with byte fallback, specials at the layout's ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = base_vocabulary(layout, seed_text)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>", *layout.specials]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def build_fast_tokenizer(layout: SpecialLayout, seed_text: str = ""):
    """A ``PreTrainedTokenizerFast`` over :func:`build_tokenizer_object`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer_object(layout, seed_text),
        unk_token=layout.unk,
        bos_token=layout.bos,
        eos_token=layout.eos,
        pad_token=layout.pad,
        additional_special_tokens=list(layout.specials),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def save_fast_tokenizer(target: Path, layout: SpecialLayout, seed_text: str = "") -> None:
    build_fast_tokenizer(layout, seed_text).save_pretrained(str(target))
