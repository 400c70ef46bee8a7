"""ChatGLM-6B tokenizer for glmport's tiny test models.

Written from scratch for glmport. It keeps the public face of the THUDM/chatglm-6b remote tokenizer (spring
2023): ``TextTokenizer`` around a piece model, ``SPTokenizer`` with its special tokens, image-token offset,
``<n>`` / tab / blank-run pieces and ``__getitem__`` lookups, and ``ChatGLMTokenizer`` with ``[MASK]``,
``[gMASK]``, ``<sop>`` (bos) and ``<eop>`` (eos), ``build_inputs_with_special_tokens(a, b)`` =
``a [gMASK] <sop> b <eop>``, and a pre-4.45 ``_pad`` that builds the prefix-LM attention mask and the 2-D
position ids as numpy arrays. Like the original it calls the base class constructor before it has a
vocabulary, which transformers >= 4.34 does not allow (glmport's compat patch set fixes that).

The SentencePiece model is replaced by a character vocabulary with byte fallback, read from
``tiny_vocab.json`` (the same ids as glmport's other tiny tokenizers); the ChatGLM-6B special pieces come
right after it, at the upstream ids ([MASK] 130000, [gMASK] 130001, <sop> 130004, <eop> 130005), followed
by the whitespace pieces and ``<pad>``. Unlike SentencePiece, no dummy prefix is added. This file is copied
into model folders and imported by transformers, so it uses only numpy, the standard library and
transformers.
"""

import json
import os
import re

import numpy as np
from transformers.tokenization_utils import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding, EncodedInput
from transformers.utils import PaddingStrategy, logging

logger = logging.get_logger(__name__)

PRETRAINED_POSITIONAL_EMBEDDINGS_SIZES = {"THUDM/chatglm-6b": 2048}

_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_FILLER_PREFIX = "<unused_text_"
_CONTROL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")
# The pieces the model knows besides text, in id order right after the vocabulary (user-defined symbols
# of the piece model: they are recognised inside text too).
_SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
_MAX_BLANK = 80
_WHITESPACE_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, _MAX_BLANK + 1)]


class TextTokenizer:
    """The piece model: ``tiny_vocab.json`` pieces, fillers up to its ``size``, then the special and
    whitespace pieces and ``<pad>``. Same methods as upstream's wrapper around ``SentencePieceProcessor``."""

    def __init__(self, model_path):
        with open(model_path, encoding="utf-8") as handle:
            table = json.load(handle)
        self._pieces = list(table["pieces"])
        self._size = int(table["size"])
        self._user_defined = _SPECIAL_PIECES + _WHITESPACE_PIECES
        # <pad> is a control piece of its own (upstream's is id 3), never read from text
        self._appended = self._user_defined + ["<pad>"]
        self._ids = {piece: index for index, piece in enumerate(self._pieces)}
        for offset, piece in enumerate(self._appended):
            self._ids[piece] = self._size + offset
        # longest first, so <|blank_12|> is not read as <|blank_1|>...
        names = sorted(self._user_defined, key=len, reverse=True)
        self._user_expression = re.compile("|".join(re.escape(name) for name in names))
        self.num_tokens = self._size + len(self._appended)

    def _piece(self, index: int) -> str:
        if index < len(self._pieces):
            return self._pieces[index]
        if index < self._size:
            return f"{_FILLER_PREFIX}{index - len(self._pieces)}>"
        return self._appended[index - self._size]

    def tokenize(self, text):
        pieces, cursor = [], 0
        for found in self._user_expression.finditer(text):
            pieces += self._characters(text[cursor:found.start()])
            pieces.append(found.group(0))
            cursor = found.end()
        return pieces + self._characters(text[cursor:])

    def _characters(self, text):
        pieces = []
        for char in text:
            if char in self._ids:
                pieces.append(char)
            else:
                pieces.extend(f"<0x{byte:02X}>" for byte in char.encode("utf-8"))
        return pieces

    def encode(self, text):
        return [self._ids[piece] for piece in self.tokenize(text)]

    def convert_tokens_to_string(self, tokens):
        out = bytearray()
        for piece in tokens:
            byte = _BYTE_PIECE.fullmatch(piece)
            if byte:
                out.append(int(byte.group(1), 16))
            elif piece not in _CONTROL_PIECES and not piece.startswith(_FILLER_PREFIX):
                out.extend(piece.encode("utf-8"))
        return out.decode("utf-8", errors="replace")

    def decode(self, ids):
        return self.convert_tokens_to_string([self._piece(index) for index in ids])

    def convert_tokens_to_ids(self, tokens):
        return [self.convert_token_to_id(token) for token in tokens]

    def convert_token_to_id(self, token):
        if token in self._ids:
            return self._ids[token]
        if token.startswith(_FILLER_PREFIX) and token.endswith(">"):
            index = len(self._pieces) + int(token[len(_FILLER_PREFIX):-1])
            if index < self._size:
                return index
        return self._ids["<unk>"]

    def convert_id_to_token(self, idx):
        return self._piece(idx)

    def __len__(self):
        return self.num_tokens


class SPTokenizer:
    """Text <-> ids: newlines, tabs and runs of blanks become pieces of their own, and every id is shifted
    by ``num_image_tokens`` (20000 for the first, image-capable vocabulary; 0 since April 2023)."""

    def __init__(self, vocab_file, num_image_tokens=20000, max_blank_length=_MAX_BLANK, byte_fallback=True):
        if vocab_file is None:
            raise ValueError("ChatGLM-6B's tokenizer needs its vocabulary file")
        self.vocab_file, self.num_image_tokens = vocab_file, num_image_tokens
        self.max_blank_length, self.byte_fallback = max_blank_length, byte_fallback
        self.special_tokens = list(_SPECIAL_PIECES)
        self.text_tokenizer = TextTokenizer(vocab_file)

    def _get_text_tokenizer(self):
        return self.text_tokenizer

    @staticmethod
    def get_blank_token(length: int):
        if length < 2:
            raise ValueError("a blank run is at least two spaces long")
        return f"<|blank_{length}|>"

    @staticmethod
    def get_tab_token():
        return "<|tab|>"

    @property
    def num_text_tokens(self):
        return self.text_tokenizer.num_tokens

    @property
    def num_tokens(self):
        return self.num_image_tokens + self.num_text_tokens

    @staticmethod
    def _encode_whitespaces(text: str, max_len: int = _MAX_BLANK):
        text = text.replace("\t", SPTokenizer.get_tab_token())
        for length in range(max_len, 1, -1):  # longest runs first
            text = text.replace(" " * length, SPTokenizer.get_blank_token(length))
        return text

    def _preprocess(self, text: str, linebreak=True, whitespaces=True):
        if linebreak:
            text = text.replace("\n", "<n>")
        if whitespaces:
            text = self._encode_whitespaces(text, max_len=self.max_blank_length)
        return text

    def encode(self, text: str, linebreak=True, whitespaces=True, add_dummy_prefix=True) -> list[int]:
        # No dummy prefix exists in the character model, so add_dummy_prefix changes nothing here.
        ids = self._get_text_tokenizer().encode(self._preprocess(text, linebreak, whitespaces))
        return [index + self.num_image_tokens for index in ids]

    def postprocess(self, text):
        text = text.replace("<n>", "\n").replace(SPTokenizer.get_tab_token(), "\t")
        for length in range(2, self.max_blank_length + 1):
            text = text.replace(self.get_blank_token(length), " " * length)
        return text

    def decode(self, text_ids: list[int]) -> str:
        shifted = [int(index) - self.num_image_tokens for index in text_ids]
        return self.postprocess(self._get_text_tokenizer().decode([index for index in shifted if index >= 0]))

    def decode_tokens(self, tokens: list[str]) -> str:
        return self.postprocess(self._get_text_tokenizer().convert_tokens_to_string(tokens))

    def tokenize(self, text: str, linebreak=True, whitespaces=True, add_dummy_prefix=True) -> list[str]:
        return self._get_text_tokenizer().tokenize(self._preprocess(text, linebreak, whitespaces))

    def __getitem__(self, x):
        """A piece's id, or an id's piece; ids below ``num_image_tokens`` are image tokens ``<image_N>``."""
        offset = self.num_image_tokens
        if isinstance(x, int):
            return f"<image_{x}>" if x < offset else self.text_tokenizer.convert_id_to_token(x - offset)
        if isinstance(x, str):
            image = re.fullmatch(r"<image_(\d+)>", x)
            return int(image.group(1)) if image else self.text_tokenizer.convert_token_to_id(x) + offset
        raise ValueError("The key should be str or int.")


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiny_vocab.json"}
    max_model_input_sizes = PRETRAINED_POSITIONAL_EMBEDDINGS_SIZES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file, do_lower_case=False, remove_space=False, bos_token='<sop>', eos_token='<eop>',
                 end_token='</s>', mask_token='[MASK]', gmask_token='[gMASK]', padding_side="left", pad_token="<pad>",
                 unk_token="<unk>", num_image_tokens=20000, **kwargs) -> None:
        # The base class first, the vocabulary after, as upstream: transformers >= 4.34 asks for the
        # vocabulary inside the base constructor, so this order fails there.
        super().__init__(do_lower_case=do_lower_case, remove_space=remove_space, padding_side=padding_side,
                         bos_token=bos_token, eos_token=eos_token, end_token=end_token, mask_token=mask_token,
                         gmask_token=gmask_token, pad_token=pad_token, unk_token=unk_token,
                         num_image_tokens=num_image_tokens, **kwargs)
        self.vocab_file, self.do_lower_case, self.remove_space = vocab_file, do_lower_case, remove_space
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("end_token", end_token),
                            ("mask_token", mask_token), ("gmask_token", gmask_token)):
            setattr(self, name, token)
        self.sp_tokenizer = SPTokenizer(vocab_file, num_image_tokens=num_image_tokens)

    @property
    def gmask_token_id(self):
        return None if self.gmask_token is None else self.convert_tokens_to_ids(self.gmask_token)

    @property
    def end_token_id(self):
        """Id of the end-of-context token, or None when it is not set."""
        return None if self.end_token is None else self.convert_tokens_to_ids(self.end_token)

    @property
    def vocab_size(self):
        return self.sp_tokenizer.num_tokens

    def get_vocab(self):
        vocab = {self._convert_id_to_token(index): index for index in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def preprocess_text(self, inputs):
        text = " ".join(inputs.strip().split()) if self.remove_space else inputs
        return text.lower() if self.do_lower_case else text

    def _tokenize(self, text, **kwargs):
        return self.sp_tokenizer.tokenize(self.preprocess_text(text))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_tokenizer.decode_tokens(tokens)

    def _decode(self, token_ids, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if not token_ids:
            return ""
        token_ids = [index for index in token_ids if index != self.pad_token_id]  # padding reads as nothing
        return super()._decode(token_ids, **kwargs)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_tokenizer[index]

    def _convert_token_to_id(self, token):
        return self.sp_tokenizer[token]

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """Copy the vocabulary file into ``save_directory`` (or to that path)."""
        target = os.path.join(save_directory, self.vocab_files_names["vocab_file"]) \
            if os.path.isdir(save_directory) else save_directory
        with open(self.vocab_file, "rb") as source, open(target, "wb") as sink:
            sink.write(source.read())
        return (target,)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """``A [gMASK] <sop>``, or for a pair ``A [gMASK] <sop> B <eop>``."""
        ids = token_ids_0 + [self.sp_tokenizer[self.gmask_token], self.sp_tokenizer[self.bos_token]]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.sp_tokenizer[self.eos_token]]
        return ids

    def _pad(
        self,
        encoded_inputs: dict[str, EncodedInput] | BatchEncoding,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        """Left-pad one sequence. With a length to pad to, also builds its attention mask [1, s, s] (True =
        masked; the context before <sop> is seen both ways) and position ids [2, s], as numpy arrays."""
        bos_id = self.sp_tokenizer[self.bos_token]
        mask_id = self.sp_tokenizer[self.mask_token]
        gmask_id = self.sp_tokenizer[self.gmask_token]
        assert self.padding_side == "left"

        ids = encoded_inputs[self.model_input_names[0]]
        length = len(ids)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        pad_now = padding_strategy != PaddingStrategy.DO_NOT_PAD and length != max_length

        if max_length is not None:
            context_length = ids.index(bos_id) if bos_id in ids else length
            if "attention_mask" not in encoded_inputs:
                visible = np.tril(np.ones((1, length, length)))
                visible[:, :, :context_length] = 1
                encoded_inputs["attention_mask"] = np.bool_(visible < 0.5)
            if "position_ids" not in encoded_inputs:
                positions = np.arange(length, dtype=np.int64)
                mask_token = mask_id if mask_id in ids else gmask_id
                if mask_token in ids:
                    positions[context_length:] = ids.index(mask_token)
                blocks = np.concatenate([np.zeros(context_length, dtype=np.int64),
                                         np.arange(1, length - context_length + 1, dtype=np.int64)])
                encoded_inputs["position_ids"] = np.stack([positions, blocks], axis=0)

        if pad_now:
            missing = max_length - length
            if "attention_mask" in encoded_inputs:
                encoded_inputs["attention_mask"] = np.pad(encoded_inputs["attention_mask"],
                                                          pad_width=[(0, 0), (missing, 0), (missing, 0)],
                                                          mode="constant", constant_values=True)
            if "token_type_ids" in encoded_inputs:
                encoded_inputs["token_type_ids"] = [self.pad_token_type_id] * missing + encoded_inputs["token_type_ids"]
            if "special_tokens_mask" in encoded_inputs:
                encoded_inputs["special_tokens_mask"] = [1] * missing + encoded_inputs["special_tokens_mask"]
            if "position_ids" in encoded_inputs:
                encoded_inputs["position_ids"] = np.pad(encoded_inputs["position_ids"], pad_width=[(0, 0), (missing, 0)])
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * missing + ids
        return encoded_inputs
