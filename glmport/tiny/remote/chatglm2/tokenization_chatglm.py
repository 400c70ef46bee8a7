"""ChatGLM2 tokenizer for glmport's tiny test models.

Written from scratch for glmport. It keeps the public face of the ChatGLM2-6B remote tokenizer: a
SentencePiece wrapper (``SPTokenizer``) with five special tokens appended after the piece vocabulary
(``[MASK] [gMASK] [sMASK] sop eop``, no role tokens), ``get_command``, ``get_prefix_tokens`` ([gMASK], sop),
``build_prompt`` with its ``[Round N]`` / ``问：`` / ``答：`` text, read-only special-token properties, special
tokens that read back as empty strings, left padding that also produces ``position_ids`` and a ``_pad`` with
the pre-4.45 signature. The SentencePiece model is replaced by a character vocabulary with byte fallback,
read from ``tiny_vocab.json`` (the same ids as glmport's native tiny tokenizer). This file is copied into
model folders and imported by transformers, so it uses only the standard library and transformers.

Lines starting with ``#?`` / ``#|`` describe how the older fixture revision differs; glmport renders
each revision from this one source (see ``glmport.tiny.remote``).
"""

import json
import os
import re
import shutil

from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding, EncodedInput
from transformers.utils import PaddingStrategy

_BYTE = re.compile(r"<0x([0-9A-F]{2})>")
_FILLER = "<unused_"
_CONTROL = frozenset({"<unk>", "<s>", "</s>"})


class PieceTable:
    """What ``SentencePieceProcessor`` offers the wrapper below, over a character vocabulary.

    ``tiny_vocab.json`` names the first pieces in id order; the ids after them, up to ``size``, are
    ``<unused_N>`` filler that no text encodes to. A character outside the table is spelled as its UTF-8
    byte pieces, as SentencePiece's byte fallback does.
    """

    def __init__(self, model_file: str):
        with open(model_file, encoding="utf-8") as handle:
            table = json.load(handle)
        self.named = list(table["pieces"])
        self.size = int(table["size"])
        self.index = {piece: number for number, piece in enumerate(self.named)}

    def vocab_size(self) -> int:
        return self.size

    def get_piece_size(self) -> int:
        return self.size

    def bos_id(self) -> int:
        return self.index["<s>"]

    def eos_id(self) -> int:
        return self.index["</s>"]

    def unk_id(self) -> int:
        return self.index["<unk>"]

    def IdToPiece(self, number: int) -> str:
        extra = number - len(self.named)
        return self.named[number] if extra < 0 else f"{_FILLER}{extra}>"

    def PieceToId(self, piece: str) -> int:
        found = self.index.get(piece)
        if found is not None:
            return found
        if piece.startswith(_FILLER) and piece.endswith(">") and piece[len(_FILLER):-1].isdigit():
            number = len(self.named) + int(piece[len(_FILLER):-1])
            if number < self.size:
                return number
        return self.unk_id()

    def EncodeAsPieces(self, text: str) -> list[str]:
        out = []
        for char in text:
            out += [char] if char in self.index else [f"<0x{b:02X}>" for b in char.encode("utf-8")]
        return out

    def encode(self, text: str) -> list[int]:
        return [self.index[piece] for piece in self.EncodeAsPieces(text)]

    def DecodePieces(self, pieces: list[str]) -> str:
        data = bytearray()
        for piece in pieces:
            byte = _BYTE.fullmatch(piece)
            if byte:
                data.append(int(byte.group(1), 16))
            elif piece not in _CONTROL and not piece.startswith(_FILLER):
                data += piece.encode("utf-8")
        return data.decode("utf-8", errors="replace")

    def decode(self, ids: list[int]) -> str:
        return self.DecodePieces([self.IdToPiece(number) for number in ids])


class SPTokenizer:
    """The piece model plus ChatGLM2's five special tokens, numbered right after it."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(model_path)
        self.sp_model = pieces = PieceTable(model_path)
        self.bos_id: int = pieces.bos_id()
        self.eos_id: int = pieces.eos_id()
        self.pad_id: int = pieces.unk_id()  # ChatGLM2 pads with <unk>
        names = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
        self.special_tokens = {name: pieces.vocab_size() + offset for offset, name in enumerate(names)}
        self.index_special_tokens = {index: name for name, index in self.special_tokens.items()}
        self.n_words: int = pieces.vocab_size() + len(names)

    def tokenize(self, s: str):
        return self.sp_model.EncodeAsPieces(s)

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"expected text, got {type(s).__name__}")
        return [self.bos_id] * bos + self.sp_model.encode(s) + [self.eos_id] * eos

    def decode(self, t: list[int]) -> str:
        return self.sp_model.decode(t)

    def decode_tokens(self, tokens: list[str]) -> str:
        return self.sp_model.DecodePieces(tokens)

    def convert_token_to_id(self, token):
        return self.special_tokens[token] if token in self.special_tokens else self.sp_model.PieceToId(token)

    def convert_id_to_token(self, index):
        # Special, control and negative ids have no text: they read back as "" (the specials too).
        if index < 0 or index in self.index_special_tokens or index in (self.eos_id, self.bos_id, self.pad_id):
            return ""
        return self.sp_model.IdToPiece(index)


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiny_vocab.json"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file, padding_side="left", clean_up_tokenization_spaces=False, **kwargs):
        # 2023-07: the base class is initialized first, and asks for the vocabulary (through
        # self.tokenizer) before there is one; transformers 4.34 and later fail here.
#? chatglm2-2023-07
#|        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
#|                         **kwargs)
#? end
        self.vocab_file = vocab_file
        self.tokenizer = wrapper = SPTokenizer(vocab_file)
        self.name = "GLMTokenizer"
        # Model-level commands; the five appended specials live in self.tokenizer.special_tokens.
        self.special_tokens = {"<bos>": wrapper.bos_id, "<eos>": wrapper.eos_id, "<pad>": wrapper.pad_id}
#? chatglm2-2023-07
#? else
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         **kwargs)
#? end

    def get_command(self, token):
        """Id of ``<bos>``/``<eos>``/``<pad>`` or of one of the five appended special tokens."""
        command = self.special_tokens.get(token, self.tokenizer.special_tokens.get(token))
        if command is None:
            raise AssertionError(f"{token} is not a special token for {self.name}")
        return command

    # Fixed, read-only special tokens (there is no unk_token_id of its own: the base class answers it).
    unk_token = property(lambda self: "<unk>")
    pad_token = property(lambda self: "<unk>")
    eos_token = property(lambda self: "</s>")
    pad_token_id = property(lambda self: self.get_command("<pad>"))
    eos_token_id = property(lambda self: self.get_command("<eos>"))

    @property
    def vocab_size(self):
        return self.tokenizer.n_words

    def get_vocab(self):
        vocab = {self._convert_id_to_token(index): index for index in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.tokenizer.tokenize(text)  # no special tokens inside text: ChatGLM2 never parses them

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.tokenizer.decode_tokens(list(tokens))

    def _convert_token_to_id(self, token):
        return self.tokenizer.convert_token_to_id(token)

    def _convert_id_to_token(self, index):
        return self.tokenizer.convert_id_to_token(int(index))

    def save_vocabulary(self, save_directory, filename_prefix=None):
        folder = os.path.isdir(save_directory)
        target = os.path.join(save_directory, self.vocab_files_names["vocab_file"]) if folder else save_directory
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)

    def get_prefix_tokens(self):
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def build_prompt(self, query, history=None):
        """The chat prompt as text: earlier (question, answer) rounds, then the question; rounds count from 1."""
        rounds = [f"[Round {number}]\n\n问：{question}\n\n答：{answer}\n\n"
                  for number, (question, answer) in enumerate(history or [], 1)]
        return "".join(rounds) + f"[Round {len(rounds) + 1}]\n\n问：{query}\n\n答："

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """``[gMASK] sop A`` or, for a pair, ``[gMASK] sop A B </s>``."""
        ids = self.get_prefix_tokens() + token_ids_0
        return ids if token_ids_1 is None else ids + token_ids_1 + [self.get_command("<eos>")]

    def _pad(
        self,
        encoded_inputs: dict[str, EncodedInput] | BatchEncoding,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        """Left-pad one encoded sequence, adding ``attention_mask`` and ``position_ids`` where missing."""
        assert self.padding_side == "left"

        ids = encoded_inputs[self.model_input_names[0]]
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = len(ids)
        if max_length is not None and pad_to_multiple_of is not None:
            max_length = -(-max_length // pad_to_multiple_of) * pad_to_multiple_of
        if "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * len(ids)
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(len(ids)))
        missing = 0 if padding_strategy == PaddingStrategy.DO_NOT_PAD or max_length is None else max_length - len(ids)
        if missing > 0:
            encoded_inputs["attention_mask"] = [0] * missing + encoded_inputs["attention_mask"]
            encoded_inputs["position_ids"] = [0] * missing + encoded_inputs["position_ids"]
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * missing + ids
        return encoded_inputs
