"""The model's tokenizer as a fast (``tokenizers``) tokenizer with the same ids, built from its own files.

Three kinds of vocabulary files:

* a SentencePiece model (ChatGLM2-6B and ChatGLM3-6B ``tokenizer.model``): transformers' own converter
  (``SpmConverter.build_tokenizer_from_spm_proto``) in its legacy mode, which follows the model's normalizer
  settings and gives every stretch of text between special tokens SentencePiece's dummy prefix, as every
  ``encode`` call of the original does;
* tiktoken ranks (GLM-4 ``tokenizer.model``): transformers' ``TikTokenConverter`` with the split pattern
  read from the model's tokenizer;
* glmport's tiny test vocabulary (``tiny_vocab.json``): one token per character, bytes for the rest.

The special tokens are then appended at the ids the model's tokenizer gives them (read from it, never
assumed). Where the two tokenizers still differ on some text, that is found by probing, not guessed:
:func:`differences` encodes each special token's spelling with both and reports what differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmport.errors import ModelError, Problem


@dataclass
class FastTokenizer:
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    vocabulary: str  # what it was built from, for people
    dummy_prefix: bool  # SentencePiece: each stretch of text starts a word
    differences: list[str] = field(default_factory=list)


def _vocab_file(source) -> Path:
    path = getattr(source, "vocab_file", None)
    if not path or not Path(path).is_file():
        raise ModelError("the model's tokenizer names no vocabulary file", [Problem(
            "tokenizer", "its vocab_file attribute is missing or not a file",
            "use the tokenizer files that came with the model (tokenizer.model next to tokenization_chatglm.py)")])
    return Path(path)


def _sentencepiece(path: Path):
    """The parsed model proto, or None when ``path`` is not a SentencePiece model."""
    from transformers.convert_slow_tokenizer import import_protobuf

    model_pb2 = import_protobuf()
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # protobuf's DecodeError, or text that is not a message at all
        return None
    return proto if len(proto.pieces) and proto.trainer_spec.model_type else None


def _from_sentencepiece(proto):
    from transformers.convert_slow_tokenizer import SpmConverter

    if proto.trainer_spec.model_type != 2:  # BPE; ChatGLM2/3 are BPE
        raise ModelError("the SentencePiece model is not a BPE model", [Problem(
            "tokenizer.model", f"model_type {proto.trainer_spec.model_type}", "glmport converts BPE models (ChatGLM2/3)")])
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    # legacy=True: the dummy prefix starts every stretch between special tokens, as each encode call upstream
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True), len(proto.pieces)


def _from_tiktoken(path: Path, source):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pattern = getattr(source, "pat_str", None)
    pattern = getattr(pattern, "pattern", pattern) or getattr(getattr(source, "tokenizer", None), "_pat_str", None)
    if not isinstance(pattern, str):
        raise ModelError("cannot read the split pattern of the GLM-4 tokenizer", [Problem(
            "tokenization_chatglm.py", "its tokenizer has no pat_str",
            "use the tokenization_chatglm.py that came with the model")])
    converter = TikTokenConverter(vocab_file=str(path), pattern=pattern)
    tokenizer = converter.converted()
    tokenizer.post_processor = None  # the family's post-processor is set below
    return tokenizer, tokenizer.get_vocab_size()


def _from_tiny_vocabulary(table: dict):
    from tokenizers import Tokenizer, decoders, models

    pieces, size = list(table["pieces"]), int(table["size"])
    vocab = {piece: index for index, piece in enumerate(pieces)}
    vocab.update({f"<unused_{n}>": index for n, index in enumerate(range(len(pieces), size))})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer, size


def _base(source) -> tuple[Any, int, str, bool]:
    """(tokenizers.Tokenizer without special tokens, its size, description, dummy prefix)."""
    path = _vocab_file(source)
    proto = _sentencepiece(path)
    if proto is not None:
        tokenizer, size = _from_sentencepiece(proto)
        return tokenizer, size, f"SentencePiece model {path.name}", bool(proto.normalizer_spec.add_dummy_prefix)
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        table = json.loads(text)
        # glmport.tiny.remote's format: {"format": "glmport-tiny-vocab", "size": N, "pieces": [...]}
        if isinstance(table, dict) and isinstance(table.get("pieces"), list) and isinstance(table.get("size"), int):
            tokenizer, size = _from_tiny_vocabulary(table)
            return tokenizer, size, f"glmport tiny vocabulary {path.name}", False
    first = text.split("\n", 1)[0].split()
    if len(first) == 2 and first[1].isdigit():
        tokenizer, size = _from_tiktoken(path, source)
        return tokenizer, size, f"tiktoken ranks {path.name}", False
    raise ModelError(f"{path}: not a vocabulary glmport can convert", [Problem(
        str(path), "neither a SentencePiece model, tiktoken ranks nor a glmport tiny vocabulary",
        "convert a ChatGLM2-6B, ChatGLM3-6B or GLM-4-9B-chat folder with its original tokenizer files")])


def special_tokens(source) -> dict[int, str]:
    """id -> spelling of every special token of the model's tokenizer: ChatGLM2/3 keep theirs in the
    SentencePiece wrapper (``tokenizer.special_tokens``), GLM-4 as added tokens."""
    found: dict[int, str] = {}
    for token, index in (getattr(getattr(source, "tokenizer", None), "special_tokens", None) or {}).items():
        found[int(index)] = token
    for index, token in (getattr(source, "added_tokens_decoder", None) or {}).items():
        found.setdefault(int(index), str(token))
    return dict(sorted(found.items()))


def _word_like(token: str) -> bool:
    """ChatGLM2/3 spell two special tokens as plain words (``sop``, ``eop``): matched only as whole words,
    so that "sophisticated" keeps its own pieces."""
    return token.replace("_", "").isalnum()


def _added(token: str, family: str):
    """A special token as the fast tokenizer matches it in text. ChatGLM2's prompt text follows ``sop``
    directly ("[gMASK]sopYou are..."), where a whole-word match cannot see it: its chat template writes
    ``sop `` and the word-like tokens swallow the whitespace after them (``rstrip``)."""
    from tokenizers import AddedToken

    word = _word_like(token)
    return AddedToken(token, special=True, normalized=False, single_word=word, rstrip=word and family == "chatglm2")


def build(source, family: str, chat_template: str | None = None) -> FastTokenizer:
    """A ``PreTrainedTokenizerFast`` equivalent to ``source`` (the model's own tokenizer, loaded)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer, size, described, dummy_prefix = _base(source)
    specials = special_tokens(source)
    expected = list(range(size, size + len(specials)))
    if list(specials) != expected:
        raise ModelError("the model's special tokens do not follow its vocabulary", [Problem(
            "tokenizer", f"ids {list(specials)} after a vocabulary of {size}",
            "report this model folder: glmport expects the special tokens right after the vocabulary")])
    tokenizer.add_special_tokens([_added(token, family) for token in specials.values()])
    for index, token in specials.items():
        if tokenizer.token_to_id(token) != index:
            raise ModelError(f"the special token {token} did not get its id {index}", [Problem(
                "tokenizer", f"the vocabulary already has a piece spelled {token!r}",
                "report this model folder")])

    def spelled(index):
        return None if index is None else (specials.get(index) or tokenizer.id_to_token(index))

    eos, pad = spelled(source.eos_token_id), spelled(source.pad_token_id)
    unk = spelled(getattr(source, "unk_token_id", None))
    gmask, sop = ("[gMASK]", "sop") if family in ("chatglm2", "chatglm3") else ("[gMASK]", "<sop>")
    prefix = [(t, tokenizer.token_to_id(t)) for t in (gmask, sop)]
    if any(index is None for _, index in prefix) or eos is None:
        raise ModelError(f"the tokenizer lacks {gmask}, {sop} or an end-of-text token", [Problem(
            "tokenizer", f"special tokens: {', '.join(specials.values())}", "convert the model with its own tokenizer")])
    # as the original's build_inputs_with_special_tokens: [gMASK] sop A (B eos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{gmask}:0 {sop}:0 $A:0", pair=f"{gmask}:0 {sop}:0 $A:0 $B:1 {eos}:1",
        special_tokens=[*prefix, (eos, tokenizer.token_to_id(eos))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos, pad_token=pad, unk_token=unk,
        additional_special_tokens=[t for t in specials.values() if t not in (eos, pad, unk)],
        padding_side="left", clean_up_tokenization_spaces=False, chat_template=chat_template,
    )
    return FastTokenizer(fast, described, dummy_prefix)


# ------------------------------------------------------------------------------------------- checking

# Text of the kinds people send: Chinese, English, code, numbers, odd whitespace, characters outside the
# vocabulary (byte fallback). None spells a special token: those are what :func:`differences` reports.
SAMPLE_TEXTS = (
    "你好，请问今天北京的天气怎么样？", "Hello, world! How are you today?", "类型#裙*版型#宽松*风格#性感",
    "  leading spaces", "trailing spaces   ", "two  spaces and\ttabs\t\there", "\n\nnewlines\n at both ends\n",
    "def f(x):\n    return x ** 2  # square\n", "数字 1234567890 和 3.14159，以及 2024-06-13",
    "emoji 😀🎉 and rare 𠀀 characters", "全角：（括号）【书名号】“引号”", "mixed 中英文 text with español ñ ü",
    "<UNK> and BRAND placeholders", "a", " ", "",
)


def mismatches(fast, source, texts) -> list[tuple[str, list[int], list[int]]]:
    """(text, ids of the model's tokenizer, ids of the fast one) for every text they encode differently."""
    out = []
    for text in texts:
        want = list(source.encode(text, add_special_tokens=False))
        got = list(fast.encode(text, add_special_tokens=False))
        if want != got:
            out.append((text, want, got))
    return out


def differences(fast, source) -> list[str]:
    """What the fast tokenizer reads differently, found by encoding each of its special tokens' spellings
    (alone, inside a word, between spaces) with both tokenizers."""
    anywhere, as_words, other = [], [], []
    for token in (str(t) for t in fast.added_tokens_decoder.values()):
        differing = [p for p in (token, f"x{token}y", f"a {token} b") if mismatches(fast, source, [p])]
        if not differing:
            continue
        if differing[0] != token:
            other.append(f"text containing {token!r} ({', '.join(repr(p) for p in differing)}) tokenizes differently")
        else:
            (as_words if _word_like(token) else anywhere).append(token)
    found = []
    if anywhere:
        found.append(f"text that spells a special token ({', '.join(anywhere)}) gets that token's id; the model's "
                     "own tokenizer reads it as plain text")
    if as_words:
        found.append(f"the special tokens spelled as words ({', '.join(as_words)}) are read as special tokens "
                     "where they stand alone in text; the model's own tokenizer reads them as plain text")
    return found + other
