"""GLM-4 tokenizer for glmport's tiny test models.

Written from scratch for glmport. It keeps the public face of the GLM-4-9B-chat remote tokenizer
(``ChatGLM4Tokenizer``, ``build_single_message``, left padding that also produces ``position_ids``, a
``_pad`` with the pre-4.45 signature, special tokens known only from ``tokenizer_config.json``) but
replaces the tiktoken ranks by a character vocabulary with byte fallback, read from ``tiny_vocab.json``:
the same ids as glmport's native tiny tokenizer. Chat formatting comes from the ``chat_template`` in
``tokenizer_config.json``. This file is copied into model folders and imported by transformers, so it
uses only the standard library and transformers.
"""

import json
import os
import re
import shutil

from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding, EncodedInput
from transformers.utils import PaddingStrategy

_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_FILLER_PREFIX = "<unused_"


class CharLevelEncoding:
    """A stand-in for the tiktoken ``Encoding``: one token per character, UTF-8 byte tokens for the rest."""

    def __init__(self, vocab_file: str):
        with open(vocab_file, encoding="utf-8") as handle:
            table = json.load(handle)
        self.named = list(table["pieces"])
        self.size = int(table["size"])
        self.ranks = {piece: index for index, piece in enumerate(self.named)}

    def token(self, index: int) -> str:
        if 0 <= index < len(self.named):
            return self.named[index]
        if len(self.named) <= index < self.size:
            return f"{_FILLER_PREFIX}{index - len(self.named)}>"
        raise KeyError(index)

    def rank(self, token: str) -> int:
        if token in self.ranks:
            return self.ranks[token]
        if token.startswith(_FILLER_PREFIX) and token.endswith(">"):
            index = len(self.named) + int(token[len(_FILLER_PREFIX):-1])
            if index < self.size:
                return index
        raise KeyError(token)

    def encode(self, text: str, disallowed_special=()) -> list[int]:
        ids = []
        for char in text:
            if char in self.ranks:
                ids.append(self.ranks[char])
            else:
                ids.extend(self.ranks[f"<0x{byte:02X}>"] for byte in char.encode("utf-8"))
        return ids


class ChatGLM4Tokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiny_vocab.json"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file, padding_side="left", clean_up_tokenization_spaces=False,
                 encode_special_tokens=False, **kwargs):
        self.name = "GLM4Tokenizer"
        self.vocab_file = vocab_file
        self.encode_special_tokens = encode_special_tokens  # kept for compatibility; not used
        self.tokenizer = CharLevelEncoding(vocab_file)
        self.mergeable_ranks = self.tokenizer.ranks
        self.n_words = self.tokenizer.size
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         **kwargs)

    @property
    def vocab_size(self):
        # The base vocabulary only; special tokens are added tokens on top of it.
        return self.n_words

    def get_vocab(self):
        vocab = {self._convert_id_to_token(index): index for index in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def convert_tokens_to_string(self, tokens: list[bytes | str]) -> str:
        """Join tokens; byte tokens are collected and decoded together so split characters come back whole."""
        text, pending = [], bytearray()
        for token in tokens:
            if isinstance(token, bytes):
                pending.extend(token)
                continue
            if not isinstance(token, str):
                raise TypeError(f"tokens are str or bytes, not {type(token).__name__}")
            byte = _BYTE_PIECE.fullmatch(token)
            if byte:
                pending.append(int(byte.group(1), 16))
                continue
            if pending:
                text.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            if not token.startswith(_FILLER_PREFIX) and token not in ("<unk>", "<s>", "</s>"):
                text.append(token)
        if pending:
            text.append(pending.decode("utf-8", errors="replace"))
        return "".join(text)

    def _tokenize(self, text, **kwargs):
        return [self.tokenizer.token(index) for index in self.tokenizer.encode(text)]

    def _convert_token_to_id(self, token):
        return self.tokenizer.rank(token)

    def _convert_id_to_token(self, index):
        try:
            return self.tokenizer.token(index)
        except KeyError:
            return ""

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if os.path.isdir(save_directory):
            target = os.path.join(save_directory, self.vocab_files_names["vocab_file"])
        else:
            target = save_directory
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)

    def get_prefix_tokens(self):
        return [self.convert_tokens_to_ids("[gMASK]"), self.convert_tokens_to_ids("<sop>")]

    def build_single_message(self, role, metadata, message, tokenize=True):
        """``<|role|>`` + metadata line + message, as token ids (or as text with ``tokenize=False``)."""
        if role not in ("system", "user", "assistant", "observation"):
            raise AssertionError(role)
        if not tokenize:
            return f"<|{role}|>{metadata}\n{message}"
        header = [self.convert_tokens_to_ids(f"<|{role}|>")]
        header += self.tokenizer.encode(f"{metadata}\n", disallowed_special=())
        return header + self.tokenizer.encode(message, disallowed_special=())

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """``[gMASK] <sop> A`` or, for a pair, ``[gMASK] <sop> A B <eos>``."""
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
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
