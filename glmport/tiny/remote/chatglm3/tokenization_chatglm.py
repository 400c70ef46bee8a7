"""ChatGLM3 tokenizer for glmport's tiny test models.

Written from scratch for glmport. It keeps the public face of the ChatGLM3-6B remote tokenizer (class
names, special-token commands, ``build_single_message`` / ``build_chat_input``, left padding that also
produces ``position_ids``, and a ``_pad`` with the pre-4.45 signature) but replaces the SentencePiece
model by a character vocabulary with byte fallback, read from ``tiny_vocab.json``: the same ids as
glmport's native tiny tokenizer, with the nine special tokens appended after it at the upstream ids.
This file is copied into model folders and imported by transformers, so it uses only the standard
library and transformers.

Lines starting with ``#?`` / ``#|`` describe how the older fixture revision differs; glmport renders
each revision from this one source (see ``glmport.tiny.remote``).
"""

import json
import os
import re
import shutil

from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding, EncodedInput
from transformers.utils import PaddingStrategy, logging

#? chatglm3-2023-12
#? else
logger = logging.get_logger(__name__)
#? end

_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_FILLER_PREFIX = "<unused_"
_CONTROL_PIECES = ("<unk>", "<s>", "</s>")


class CharPieceModel:
    """A stand-in for ``SentencePieceProcessor``: one piece per character, bytes for the rest.

    ``tiny_vocab.json`` lists the named pieces in id order; ids after them up to ``size`` are filler
    pieces ``<unused_N>`` that text never produces.
    """

    def __init__(self, model_file: str):
        with open(model_file, encoding="utf-8") as handle:
            table = json.load(handle)
        self._pieces = list(table["pieces"])
        self._size = int(table["size"])
        self._ids = {piece: index for index, piece in enumerate(self._pieces)}

    def vocab_size(self) -> int:
        return self._size

    def get_piece_size(self) -> int:
        return self._size

    def unk_id(self) -> int:
        return self._ids["<unk>"]

    def bos_id(self) -> int:
        return self._ids["<s>"]

    def eos_id(self) -> int:
        return self._ids["</s>"]

    def IdToPiece(self, index: int) -> str:
        if index < len(self._pieces):
            return self._pieces[index]
        return f"{_FILLER_PREFIX}{index - len(self._pieces)}>"

    def PieceToId(self, piece: str) -> int:
        if piece in self._ids:
            return self._ids[piece]
        if piece.startswith(_FILLER_PREFIX) and piece.endswith(">"):
            index = len(self._pieces) + int(piece[len(_FILLER_PREFIX):-1])
            if index < self._size:
                return index
        return self.unk_id()

    def EncodeAsPieces(self, text: str) -> list[str]:
        pieces = []
        for char in text:
            if char in self._ids:
                pieces.append(char)
            else:
                pieces.extend(f"<0x{byte:02X}>" for byte in char.encode("utf-8"))
        return pieces

    def encode(self, text: str) -> list[int]:
        return [self._ids[piece] for piece in self.EncodeAsPieces(text)]

    def DecodePieces(self, pieces: list[str]) -> str:
        out = bytearray()
        for piece in pieces:
            byte = _BYTE_PIECE.fullmatch(piece)
            if byte:
                out.append(int(byte.group(1), 16))
            elif piece not in _CONTROL_PIECES and not piece.startswith(_FILLER_PREFIX):
                out.extend(piece.encode("utf-8"))
        return out.decode("utf-8", errors="replace")

    def decode(self, ids: list[int]) -> str:
        return self.DecodePieces([self.IdToPiece(index) for index in ids])


class SPTokenizer:
    """The piece model plus ChatGLM3's nine special tokens, numbered right after it."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(model_path)
        self.sp_model = CharPieceModel(model_path)
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.unk_id()
        roles = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
        names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", *roles]
        first = self.sp_model.vocab_size()
        self.special_tokens = {name: first + offset for offset, name in enumerate(names)}
        self.index_special_tokens = {index: name for name, index in self.special_tokens.items()}
        self.n_words: int = first + len(names)
        # Which specials encode_special_tokens=True recognises inside text.
#? chatglm3-2023-12
#|        recognised = roles
#? else
        recognised = names
#? end
        self.role_special_token_expression = "|".join(re.escape(name) for name in recognised)

    def tokenize(self, s: str, encode_special_tokens=False):
        if not encode_special_tokens:
            return self.sp_model.EncodeAsPieces(s)
        pieces, cursor = [], 0
        for found in re.finditer(self.role_special_token_expression, s):
            pieces.extend(self.sp_model.EncodeAsPieces(s[cursor:found.start()]))
            pieces.append(found.group(0))
            cursor = found.end()
        pieces.extend(self.sp_model.EncodeAsPieces(s[cursor:]))
        return pieces

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"expected text, got {type(s).__name__}")
        ids = self.sp_model.encode(s)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, t: list[int]) -> str:
        text, pending = [], []
        for index in t:
            if index in self.index_special_tokens:
                text.append(self.sp_model.decode(pending))
                pending = []
                text.append(self.index_special_tokens[index])
            else:
                pending.append(index)
        text.append(self.sp_model.decode(pending))
        return "".join(text)

    def decode_tokens(self, tokens: list[str]) -> str:
        return self.sp_model.DecodePieces(tokens)

    def convert_token_to_id(self, token):
        special = self.special_tokens.get(token)
        return self.sp_model.PieceToId(token) if special is None else special

    def convert_id_to_token(self, index):
        special = self.index_special_tokens.get(index)
        if special is not None:
            return special
        # Control tokens and ids outside the piece model read as empty text.
        ordinary = 0 <= index < self.sp_model.vocab_size() and index not in (self.eos_id, self.bos_id, self.pad_id)
        return self.sp_model.IdToPiece(index) if ordinary else ""


#? chatglm3-2023-12
#? else
def _fixed_special_token(command, attribute):
    def read(self) -> str:
        return self.tokenizer.sp_model.IdToPiece(self.get_command(command))

    def refuse(self, value):
        logger.warning(f"Setting {attribute} is not supported, use the default one.")

    return property(read, refuse)


#? end
class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiny_vocab.json"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file, padding_side="left", clean_up_tokenization_spaces=False,
                 encode_special_tokens=False, **kwargs):
        self.tokenizer = SPTokenizer(vocab_file)
        self.vocab_file = vocab_file
        self.name = "GLMTokenizer"
        # Model-level commands; the nine chat specials live in self.tokenizer.special_tokens.
        self.special_tokens = {"<bos>": self.tokenizer.bos_id, "<eos>": self.tokenizer.eos_id}
#? chatglm3-2023-12
#? else
        self.special_tokens["<unk>"] = self.tokenizer.pad_id
#? end
        self.special_tokens["<pad>"] = self.tokenizer.pad_id
        self.encode_special_tokens = encode_special_tokens
#? chatglm3-2023-12
#|        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
#|                         encode_special_tokens=encode_special_tokens, **kwargs)
#? else
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         **kwargs)
#? end

    def get_command(self, token):
        """Id of a special token: a model-level one (``<eos>``...) or one of the nine appended ones."""
        for table in (self.special_tokens, self.tokenizer.special_tokens):
            if token in table:
                return table[token]
        raise AssertionError(f"{token} is not a special token for {self.name}")

    # The special tokens are fixed. 2023-12: literal values, read-only. Later: read from the vocabulary,
    # and assigning them only logs a warning.
#? chatglm3-2023-12
#|    unk_token = property(lambda self: "<unk>")
#|    pad_token = property(lambda self: "<unk>")
#|    eos_token = property(lambda self: "</s>")
#|    pad_token_id = property(lambda self: self.get_command("<pad>"))
#|    eos_token_id = property(lambda self: self.get_command("<eos>"))
#? else
    unk_token = _fixed_special_token("<unk>", "unk_token")
    pad_token = _fixed_special_token("<pad>", "pad_token")
    eos_token = _fixed_special_token("<eos>", "eos_token")
    unk_token_id = property(lambda self: self.get_command("<unk>"))
    pad_token_id = property(lambda self: self.get_command("<pad>"))
    eos_token_id = property(lambda self: self.get_command("<eos>"))
#? end

    @property
    def vocab_size(self):
        return self.tokenizer.n_words

    def get_vocab(self):
        vocab = {self._convert_id_to_token(index): index for index in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.tokenizer.tokenize(text, encode_special_tokens=self.encode_special_tokens)

    def _convert_token_to_id(self, token):
        return self.tokenizer.convert_token_to_id(token)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.tokenizer.decode_tokens(tokens)

    def _convert_id_to_token(self, index):
        return self.tokenizer.convert_id_to_token(index)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if os.path.isdir(save_directory):
            target = os.path.join(save_directory, self.vocab_files_names["vocab_file"])
        else:
            target = save_directory
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)

    def get_prefix_tokens(self):
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def build_single_message(self, role, metadata, message):
        """``<|role|>`` + metadata line + message, as token ids."""
        if role not in ("system", "user", "assistant", "observation"):
            raise AssertionError(role)
        header = [self.get_command(f"<|{role}|>")] + self.tokenizer.encode(f"{metadata}\n")
        return header + self.tokenizer.encode(message)

    def build_chat_input(self, query, history=None, role="user"):
        ids = []
        for turn in history or []:
            content = turn["content"]
            if turn["role"] == "system" and "tools" in turn:
                content = f"{content}\n{json.dumps(turn['tools'], indent=4, ensure_ascii=False)}"
            ids += self.build_single_message(turn["role"], turn.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query)
        ids.append(self.get_command("<|assistant|>"))
        return self.batch_encode_plus([ids], return_tensors="pt", is_split_into_words=True)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """``[gMASK] sop A`` or, for a pair, ``[gMASK] sop A B <eos>``."""
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.get_command("<eos>")]
        return ids

    def _pad(
        self,
        encoded_inputs: dict[str, EncodedInput] | BatchEncoding,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        """Left-pad one encoded sequence; also creates ``attention_mask`` and ``position_ids``."""
        assert self.padding_side == "left"

        ids = encoded_inputs[self.model_input_names[0]]
        length = len(ids)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of

        encoded_inputs.setdefault("attention_mask", [1] * length)
        encoded_inputs.setdefault("position_ids", list(range(length)))
        if padding_strategy != PaddingStrategy.DO_NOT_PAD and length != max_length:
            missing = max_length - length
            encoded_inputs["attention_mask"] = [0] * missing + encoded_inputs["attention_mask"]
            encoded_inputs["position_ids"] = [0] * missing + encoded_inputs["position_ids"]
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * missing + ids
        return encoded_inputs
