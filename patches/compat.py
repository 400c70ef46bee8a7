"""compat: the 2023-2024 remote code on current transformers (4.4x-5.x), every backend and mode.

Each patch fixes one measured failure of the upstream files on transformers 5 (the failure order is in
the module docstring of each function); none changes the model's numbers, but for ChatGLM2's rotary
angles in half precision (``compat-rotary-fp32``, golden-tested: the angles upstream's fp16 runs computed).
"""

from __future__ import annotations

import functools

from glmport.patching import Patch

TOKENIZER_CLASS = {"chatglm3": "ChatGLMTokenizer", "glm4": "ChatGLM4Tokenizer", "chatglm2": "ChatGLMTokenizer"}
CHATGLM2_REVISIONS = ("chatglm2-6b-2023-07", "chatglm2-6b-2023-09", "chatglm2-6b-2023-10")
CHATGLM3_GC_NOOP = ("chatglm3-6b-2024-06", "chatglm3-6b-2024-08")
# the 2023 modeling files (release, Nov and Dec 2023) keep the pre-4.35 checkpointing hook
CHATGLM3_OLD_GC_HOOK = ("chatglm3-6b-2023-10", "chatglm3-6b-2023-11", "chatglm3-6b-2023-12")
GLM4_REVISIONS = ("glm-4-9b-chat-2024-07", "glm-4-9b-chat-2024-07-jinja")


def keep_use_cache(ctx) -> None:
    """transformers 5's config base class pops generation settings from the constructor's kwargs, but the
    remote code reads ``config.use_cache`` in every forward (AttributeError)."""
    original = ctx.original("ChatGLMConfig.__init__")

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        use_cache = kwargs.get("use_cache", True)
        original(self, *args, **kwargs)
        self.use_cache = use_cache

    ctx.replace("ChatGLMConfig.__init__", __init__)


def legacy_cache_generation(ctx) -> None:
    """transformers 5's ``generate`` hands the model a ``DynamicCache`` and sets an all-ones attention
    mask to None; the remote code indexes its cache as nested tuples, calls the removed
    ``_extract_past_from_model_output`` and calls ``.new_ones`` on the mask. Opt out of the default cache,
    update the generation kwargs the way the remote code expects, and make the class a
    ``GenerationMixin`` (none of the revisions inherit it; transformers 5 no longer adds it to
    ``PreTrainedModel``)."""
    import torch
    from transformers import GenerationMixin

    cls = ctx.module.ChatGLMForConditionalGeneration

    def update_model_kwargs(self, outputs, model_kwargs, is_encoder_decoder=False,
                            standardize_cache_format=False, **_unused):
        model_kwargs["past_key_values"] = getattr(outputs, "past_key_values", None)
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        positions = model_kwargs.get("position_ids")
        if positions is not None:
            model_kwargs["position_ids"] = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
        model_kwargs["is_first_forward"] = False
        return model_kwargs

    ctx.replace("ChatGLMForConditionalGeneration._update_model_kwargs_for_generation", update_model_kwargs)
    ctx.add("ChatGLMForConditionalGeneration._supports_default_dynamic_cache", classmethod(lambda klass: False))
    if not issubclass(cls, GenerationMixin):
        old_bases = cls.__bases__
        cls.__bases__ = (*old_bases, GenerationMixin)
        ctx.recorder.on_undo(lambda: setattr(cls, "__bases__", old_bases), "GenerationMixin base")


def build_on_transformers_5(ctx) -> None:
    """Building the model: ``__init__`` reads ``config.max_length`` (which transformers 5 drops from
    configs, and whose presence on a config its ``generate`` rejects), and never calls ``post_init()``,
    which transformers 5's ``from_pretrained`` relies on (``all_tied_weights_keys``: AttributeError while
    loading weights). Lend ``max_length`` for the duration of ``__init__`` only, then call ``post_init``."""
    original = ctx.original("ChatGLMForConditionalGeneration.__init__")

    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        lent = "max_length" not in config.__dict__
        if lent:
            config.__dict__["max_length"] = getattr(config, "seq_length", None)
        try:
            original(self, config, *args, **kwargs)
        finally:
            if lent:
                config.__dict__.pop("max_length", None)
        if "all_tied_weights_keys" not in self.__dict__:
            self.post_init()

    ctx.replace("ChatGLMForConditionalGeneration.__init__", __init__)


def real_prefix_tokens(ctx) -> None:
    """ChatGLM3's P-Tuning v2 keeps its prefix token ids as a plain tensor attribute made in ``__init__``;
    transformers 5 runs ``__init__`` under a meta-device context and only materializes parameters and
    buffers, so the ids stay a meta tensor ("Cannot copy out of meta tensor" at the first step)."""
    import torch

    original = ctx.original("ChatGLMModel.__init__")

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        tokens = getattr(self, "prefix_tokens", None)
        if isinstance(tokens, torch.Tensor) and tokens.is_meta:
            self.prefix_tokens = torch.arange(tokens.shape[0], dtype=tokens.dtype, device="cpu")

    ctx.replace("ChatGLMModel.__init__", __init__)


def legacy_cache_input(ctx) -> None:
    """peft's prefix tuning hands the model its prompt as a transformers ``Cache``; the 2024 GLM-4 code
    indexes ``past_key_values`` as a tuple of ``(key, value)`` per layer (TypeError: 'DynamicCache' object
    is not subscriptable; the P-Tuning failures of zai-org/GLM-4#303). Give it the tuple layout."""
    import inspect

    from transformers import Cache

    original = ctx.original("ChatGLMModel.forward")
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        past = bound.arguments.get("past_key_values")
        if not isinstance(past, Cache):
            return original(self, *args, **kwargs)
        layers = tuple((layer.keys, layer.values) for layer in past.layers) if past.get_seq_length() else None
        bound.arguments["past_key_values"] = layers
        return original(*bound.args, **bound.kwargs)

    ctx.replace("ChatGLMModel.forward", forward)


def real_gradient_checkpointing(ctx) -> None:
    """The 2024 files override ``gradient_checkpointing_enable`` with a check that never turns
    checkpointing on (a silent no-op on 4.4x; on 5.x the Trainer's extra ``every_n_layers`` argument makes
    it a TypeError). Use transformers' own method, which sets ``GLMTransformer.gradient_checkpointing``;
    the remote layer loop then checkpoints each layer itself."""
    from transformers import PreTrainedModel

    ctx.replace("ChatGLMPreTrainedModel.gradient_checkpointing_enable", PreTrainedModel.gradient_checkpointing_enable)


def new_style_checkpointing_hook(ctx) -> None:
    """The Dec-2023 file has the pre-4.35 ``_set_gradient_checkpointing(module, value)`` hook (a TypeError
    on 4.35-4.4x, a deprecation path on 5.x); use transformers' current one."""
    from transformers import PreTrainedModel

    ctx.replace("ChatGLMPreTrainedModel._set_gradient_checkpointing", PreTrainedModel._set_gradient_checkpointing)


def initialize_missing_weights(ctx) -> None:
    """``_init_weights`` is a no-op upstream and RMSNorm weights start as ``torch.empty``. transformers 5
    builds models on the meta device and initializes only what the checkpoint lacks, through
    ``_init_weights``: P-Tuning v2's prefix encoder (never in the checkpoint) would be left as garbage and
    train to NaN. Give missing weights the values a freshly built module has."""
    import torch

    def _init_weights(self, module):
        if type(module).__name__ == "RMSNorm":
            torch.nn.init.ones_(module.weight)
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.reset_parameters()

    ctx.replace("ChatGLMPreTrainedModel._init_weights", _init_weights)


def tokenizer_padding_side(ctx) -> None:
    """transformers 4.45+ passes ``padding_side`` to ``_pad``; the remote tokenizers' ``_pad`` has no such
    parameter, so on 5.x every ``encode`` fails. They pad on the left only (and assert it). The original is
    called by keyword: a ``_pad`` that does take ``padding_side`` (GLM-4's late-2024 tokenizer has it third,
    before ``padding_strategy``) must not get the strategy in its place."""
    import inspect

    name = TOKENIZER_CLASS[ctx.module_family]
    original = ctx.original(f"{name}._pad")
    takes_side = "padding_side" in inspect.signature(original).parameters

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=None, pad_to_multiple_of=None,
             padding_side=None, return_attention_mask=None, **_unused):
        from transformers.utils import PaddingStrategy

        if padding_side not in (None, "left"):
            raise ValueError(f"{type(self).__name__} pads on the left only (padding_side={padding_side!r})")
        strategy = padding_strategy if padding_strategy is not None else PaddingStrategy.DO_NOT_PAD
        side = {"padding_side": "left"} if takes_side else {}
        return original(self, encoded_inputs, max_length=max_length, padding_strategy=strategy,
                        pad_to_multiple_of=pad_to_multiple_of, return_attention_mask=return_attention_mask, **side)

    ctx.replace(f"{name}._pad", _pad)


def tokenizer_batch_encode_plus(ctx) -> None:
    """``build_chat_input`` (ChatGLM3) and the Python ``apply_chat_template`` (GLM-4, Jul 2024) call
    ``batch_encode_plus``, which transformers 5 removed; calling the tokenizer does the same."""
    cls = getattr(ctx.module, TOKENIZER_CLASS[ctx.module_family])
    if hasattr(cls, "batch_encode_plus"):
        return

    def batch_encode_plus(self, batch_text_or_text_pairs, **kwargs):
        return self(batch_text_or_text_pairs, **kwargs)

    ctx.add(f"{TOKENIZER_CLASS[ctx.module_family]}.batch_encode_plus", batch_encode_plus)


def tokenizer_vocabulary_before_init(ctx) -> None:
    """The Jul-2023 ChatGLM2 tokenizer calls the base class's ``__init__`` before it builds its SentencePiece
    wrapper; since transformers 4.34 that ``__init__`` asks for the vocabulary (``get_vocab``, through the
    wrapper), so loading fails ("'property' object cannot be interpreted as an integer" on 5.x). Build what
    the base class reads (the wrapper and the command ids) first; the original ``__init__`` then runs as it is."""
    original = ctx.original("ChatGLMTokenizer.__init__")
    wrapper = ctx.module.SPTokenizer

    @functools.wraps(original)
    def __init__(self, vocab_file, *args, **kwargs):
        self.tokenizer = wrapper(vocab_file)
        self.special_tokens = {"<bos>": self.tokenizer.bos_id, "<eos>": self.tokenizer.eos_id,
                               "<pad>": self.tokenizer.pad_id}
        original(self, vocab_file, *args, **kwargs)

    ctx.replace("ChatGLMTokenizer.__init__", __init__)


def generation_inputs_follow_the_cache(ctx) -> None:
    """ChatGLM2's files before Oct 2023 cut the input to its last token on every generation step after the
    first, whether or not a cache holds the rest, and never pass ``use_cache`` on. A model built with
    ``use_cache`` off (P-Tuning v2 trains that way, and evaluates with ``predict_with_generate``) then sees
    one token at a time and writes garbage (fixed upstream in the Oct-2023 revision). Cut only when there
    is a cache, and hand ``use_cache`` to the forward."""
    original = ctx.original("ChatGLMForConditionalGeneration.prepare_inputs_for_generation")

    # not functools.wraps: generate() reads this signature, and it must show use_cache
    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, position_ids=None,
                                      use_cache=None, is_first_forward=True, **kwargs):
        inputs = original(self, input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                          position_ids=position_ids, is_first_forward=is_first_forward or past_key_values is None,
                          **kwargs)
        inputs["use_cache"] = use_cache
        return inputs

    ctx.replace("ChatGLMForConditionalGeneration.prepare_inputs_for_generation", prepare_inputs_for_generation)


def rotary_angles_in_fp32(ctx) -> None:
    """ChatGLM2 computes its rotary angles in the model's dtype (ChatGLM3 went back to fp32). In bf16, the
    dtype glmport loads frozen weights in on MLU and CUDA, the frequencies keep 8 bits and every position
    above 256 rounds to a neighbour (fp16, which upstream ran, is exact up to 2048): the model would see
    positions it was never trained with. Compute the angles in fp32 and store the table in the model's
    dtype, as before."""
    import torch

    original = ctx.original("RotaryEmbedding.forward_impl")

    @functools.wraps(original)
    def forward_impl(self, seq_len, n_elem, dtype, device, base=10000):
        table = original(self, seq_len, n_elem, torch.float32, device, base)
        if dtype in (torch.float16, torch.bfloat16, torch.int8):  # the original's storage rule
            table = table.bfloat16() if dtype == torch.bfloat16 else table.half()
        return table

    ctx.replace("RotaryEmbedding.forward_impl", forward_impl)


def patches(family: str) -> list[Patch]:
    tokenizer = TOKENIZER_CLASS[family]
    found = "https://github.com/zai-org/GLM-4/issues/439" if family == "glm4" else "https://github.com/zai-org/ChatGLM3/issues/1321"
    common = {"family": family}
    made = [
        Patch("compat-config-use-cache", file="configuration", replaces=("ChatGLMConfig.__init__",),
              why="keep config.use_cache, which transformers 5 drops from the config",
              apply=keep_use_cache, **common),
        Patch("compat-generation", file="modeling",
              replaces=("ChatGLMForConditionalGeneration._update_model_kwargs_for_generation",),
              adds=("ChatGLMForConditionalGeneration._supports_default_dynamic_cache",
                    "ChatGLMForConditionalGeneration.__bases__"),
              why="generate on transformers 5: legacy tuple cache, no _extract_past_from_model_output, GenerationMixin",
              link=found, apply=legacy_cache_generation, **common),
        Patch("compat-model-init", file="modeling", replaces=("ChatGLMForConditionalGeneration.__init__",),
              why="build on transformers 5: config.max_length during __init__ only, then post_init()",
              apply=build_on_transformers_5, **common),
        Patch("compat-init-missing-weights", file="modeling", replaces=("ChatGLMPreTrainedModel._init_weights",),
              why="initialize weights the checkpoint lacks (prefix encoder, RMSNorm) instead of leaving garbage",
              apply=initialize_missing_weights, **common),
        Patch("compat-tokenizer-pad", file="tokenization", replaces=(f"{tokenizer}._pad",),
              why="accept the padding_side argument transformers >= 4.45 passes to _pad",
              link="https://github.com/zai-org/ChatGLM3/issues/1324", apply=tokenizer_padding_side, **common),
        Patch("compat-tokenizer-batch-encode-plus", file="tokenization", replaces=(),
              adds=(f"{tokenizer}.batch_encode_plus",),
              why="batch_encode_plus, used by the chat helpers, is gone in transformers 5",
              apply=tokenizer_batch_encode_plus, **common),
    ]
    if family == "chatglm3":
        made += [
            Patch("compat-prefix-tokens", file="modeling", replaces=("ChatGLMModel.__init__",),
                  why="P-Tuning v2 prefix ids built on the CPU, not left on the meta device by transformers 5",
                  apply=real_prefix_tokens, **common),
            Patch("compat-gradient-checkpointing", file="modeling",
                  replaces=("ChatGLMPreTrainedModel.gradient_checkpointing_enable",), revisions=CHATGLM3_GC_NOOP,
                  why="the 2024 override never turns gradient checkpointing on", apply=real_gradient_checkpointing,
                  **common),
            Patch("compat-checkpointing-hook", file="modeling",
                  replaces=("ChatGLMPreTrainedModel._set_gradient_checkpointing",), revisions=CHATGLM3_OLD_GC_HOOK,
                  why="pre-4.35 _set_gradient_checkpointing(module, value) hook",
                  link="https://github.com/zai-org/ChatGLM3/issues/380", apply=new_style_checkpointing_hook, **common),
        ]
    elif family == "chatglm2":
        made += [
            Patch("compat-prefix-tokens", file="modeling", replaces=("ChatGLMModel.__init__",),
                  why="P-Tuning v2 prefix ids built on the CPU, not left on the meta device by transformers 5",
                  apply=real_prefix_tokens, **common),
            Patch("compat-checkpointing-hook", file="modeling",
                  replaces=("ChatGLMPreTrainedModel._set_gradient_checkpointing",), revisions=CHATGLM2_REVISIONS,
                  why="pre-4.35 _set_gradient_checkpointing(module, value) hook",
                  link="https://github.com/zai-org/ChatGLM3/issues/380", apply=new_style_checkpointing_hook, **common),
            Patch("compat-generation-use-cache", file="modeling",
                  replaces=("ChatGLMForConditionalGeneration.prepare_inputs_for_generation",),
                  revisions=("chatglm2-6b-2023-07", "chatglm2-6b-2023-09"),
                  why="generate without a cache: whole sequence each step, use_cache passed on (Oct-2023 fix)",
                  link="https://huggingface.co/THUDM/chatglm2-6b/discussions/85",
                  apply=generation_inputs_follow_the_cache, **common),
            Patch("compat-rotary-fp32", file="modeling", replaces=("RotaryEmbedding.forward_impl",),
                  why="rotary angles in fp32: in bf16 (fp16) positions above 256 (2048) round to their neighbours",
                  apply=rotary_angles_in_fp32, **common),
            Patch("compat-tokenizer-init", file="tokenization", replaces=("ChatGLMTokenizer.__init__",),
                  revisions=("chatglm2-6b-2023-07",),
                  why="build the SentencePiece wrapper before the base __init__ asks for the vocabulary (>= 4.34)",
                  apply=tokenizer_vocabulary_before_init, **common),
        ]
    else:
        made += [
            Patch("compat-gradient-checkpointing", file="modeling",
                  replaces=("ChatGLMPreTrainedModel.gradient_checkpointing_enable",), revisions=GLM4_REVISIONS,
                  why="the 2024 override never turns gradient checkpointing on", apply=real_gradient_checkpointing,
                  **common),
            Patch("compat-cache-input", file="modeling", replaces=("ChatGLMModel.forward",),
                  why="accept a transformers Cache (peft prefix tuning) where the code expects tuples",
                  link="https://github.com/zai-org/GLM-4/issues/303", apply=legacy_cache_input, **common),
        ]
    return made
