"""Stand-ins for the ChatGLM and GLM-4 tokenizers, with real vocabulary files, for the convert tests.

The real ChatGLM2/3 tokenizer is SentencePiece plus special tokens numbered after its pieces; the real GLM-4
tokenizer is a tiktoken ``Encoding`` plus added tokens. Their vocabulary files are not in this repository,
so these tests train small ones of the same kind on the real data sets (SentencePiece with ChatGLM3's
trainer settings, read from its tokenizer.model: BPE, byte fallback, digits split, identity normalization,
dummy prefix, whitespace kept) and wrap them in small classes with the public face glmport reads (``encode``,
``convert_tokens_to_ids``, the special ids, ``vocab_file``). The libraries themselves (sentencepiece,
tiktoken) are the reference the converted tokenizers are held to. With ``GLMPORT_UPSTREAM_DIR`` the real
tokenizer files are used too (test_convert_upstream.py).
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CHATGLM3_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                     "<|observation|>"]
CHATGLM2_SPECIALS = CHATGLM3_SPECIALS[:5]
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>"]


@cache
def real_texts() -> tuple[str, ...]:
    """Every text field of the three real data sets (AdvertiseGen, context/target, huanhuan)."""
    texts = []
    for line in (SHARED_DATA / "advertisegen" / "dev.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        texts += [record["content"], record["summary"]]
    for name in ("mixed_train_dataset.jsonl", "mixed_dev_dataset.jsonl"):
        for line in (SHARED_DATA / "context-target" / name).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts += [record["context"], record["target"]]
    for record in json.loads((SHARED_DATA / "huanhuan" / "huanhuan.json").read_text(encoding="utf-8")):
        texts += [record["instruction"], record["input"], record["output"]]
    return tuple(t for t in texts if t)


def train_sentencepiece(folder: Path, texts, vocab_size: int = 4000) -> Path:
    """A BPE SentencePiece model trained like ChatGLM3's. Newlines are left out of training, as in the real
    model, where no piece contains one (they encode as the byte <0x0A>)."""
    import sentencepiece as spm

    prefix = folder / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t.replace("\n", " ") for t in texts]), model_prefix=str(prefix),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, character_coverage=0.98, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1, max_sentence_length=50000)
    return prefix.with_suffix(".model")


class SentencePieceSource:
    """ChatGLM2/3's tokenizer semantics: SentencePiece ``encode`` for text, special tokens after the pieces
    (in ``tokenizer.special_tokens``, as the remote code keeps them), ``</s>`` ends, ``<unk>`` pads."""

    def __init__(self, model_file: Path, specials=CHATGLM3_SPECIALS):
        import sentencepiece as spm

        self.vocab_file = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        first = self.sp.get_piece_size()
        self.tokenizer = type("SPTokenizer", (), {})()
        self.tokenizer.special_tokens = {name: first + i for i, name in enumerate(specials)}
        self.index_special = {i: name for name, i in self.tokenizer.special_tokens.items()}
        self.eos_token_id, self.pad_token_id, self.unk_token_id = 2, 0, 0
        self.added_tokens_decoder, self.chat_template = {}, None

    def encode(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return self.sp.encode(text)

    def convert_tokens_to_ids(self, token):
        return self.tokenizer.special_tokens.get(token, self.sp.piece_to_id(token))

    def convert_ids_to_tokens(self, index):
        return self.index_special.get(index) or self.sp.id_to_piece(index)


def glm4_pattern() -> str:
    """The split pattern GLM-4's tokenizer uses (cl100k's), as transformers' tiktoken converter defaults to."""
    import inspect

    from transformers.convert_slow_tokenizer import TikTokenConverter

    return inspect.signature(TikTokenConverter.__init__).parameters["pattern"].default


def train_tiktoken_ranks(folder: Path, texts, pattern: str, vocab_size: int = 3000) -> Path:
    """A tiktoken ranks file (``base64 rank`` lines, as GLM-4's tokenizer.model): the 256 bytes, then the
    merges of a byte-level BPE trained on ``texts`` with ``pattern`` as the pre-split."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                            use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    ranks = [bytes([b]) for b in range(256)]
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        ranks.append(bytes(to_byte[c] for c in left + right))
    path = folder / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks)))
    return path


class TiktokenSource:
    """GLM-4's tokenizer semantics: a tiktoken ``Encoding`` for text, special tokens as added tokens after it."""

    def __init__(self, ranks_file: Path, pattern: str, chat_template: str | None = None):
        import tiktoken
        from tokenizers import AddedToken

        self.vocab_file, self.pat_str = str(ranks_file), pattern
        ranks = {}
        for line in Path(ranks_file).read_text().splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        self.encoding = tiktoken.Encoding("glmport-test", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.specials = {name: len(ranks) + i for i, name in enumerate(GLM4_SPECIALS)}
        self.added_tokens_decoder = {i: AddedToken(name, special=True) for name, i in self.specials.items()}
        self.eos_token_id = self.pad_token_id = self.specials["<|endoftext|>"]
        self.unk_token_id = None
        self.chat_template = chat_template

    def encode(self, text, add_special_tokens=False):
        """Special tokens in text are split out first (they are added tokens), the rest is tiktoken's."""
        import re

        assert not add_special_tokens
        ids, pattern = [], "(" + "|".join(re.escape(t) for t in sorted(self.specials, key=len, reverse=True)) + ")"
        for piece in re.split(pattern, text):
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                ids += self.encoding.encode(piece, disallowed_special=())
        return ids

    def convert_tokens_to_ids(self, token):
        return self.specials.get(token)

    def convert_ids_to_tokens(self, index):
        return next((name for name, i in self.specials.items() if i == index), None)

    def apply_chat_template(self, conversation, tokenize=True, add_generation_prompt=False, **_):
        """As the GLM-4 tokenizer with a chat_template: Jinja renders the text, the text is encoded."""
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=[conversation], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt)
        return self.encode(rendered[0]) if tokenize else rendered[0]
