"""ChatGLM-6B (THUDM/chatglm-6b, spring 2023) remote code on transformers 5, and on devices without 64-bit
kernels or TorchScript. Family ``chatglm``; every revision in the manifest (2023-04-14 to the final one).

The files were written for transformers 4.2x. On 5.x, measured with the real files:

* the tokenizer calls the base class's ``__init__`` before it builds its SentencePiece wrapper, and since
  transformers 4.34 that ``__init__`` asks for the vocabulary: loading fails (zai-org/ChatGLM-6B#1505;
  "'ChatGLMTokenizer' object has no attribute 'sp_tokenizer'" on 4.34-4.5x). Its ``_pad`` lacks the
  ``padding_side`` argument 4.45 added;
* the model never calls ``post_init()`` (transformers 5's loader needs what it sets up), builds its layers in
  fp16 whatever dtype is asked for, has the pre-4.35 ``_set_gradient_checkpointing(module, value)`` hook and a
  no-op ``_init_weights`` (the P-Tuning v2 prefix encoder, never in a checkpoint, would stay uninitialized);
  its P-Tuning prefix ids are a plain tensor made in ``__init__``, which transformers 5 leaves on the meta device;
  its rotary table is computed in the dtype of its frequency buffer, which in a bf16 model rounds positions
  above 256 (upstream only ran fp16 and fp32);
* generation calls the removed ``_extract_past_from_model_output``, expects a 4-D boolean mask it grows in
  place, and the class does not inherit ``GenerationMixin``;
* the model wants its own inputs: a ``[b, 1, s, s]`` boolean prefix-LM mask and ``[b, 2, s]`` positions, built
  from where ``<sop>`` and ``[gMASK]`` sit. Given transformers' ``[b, s]`` padding mask it misreads it, and it
  ignores padding altogether when it builds the mask itself.

The compat set fixes each of these. The inputs fix (``compat-transformers-inputs``) takes what transformers,
peft and glmport's collator pass (a 0/1 padding mask, optional 1-D positions) and builds the model's own
layout from the token ids *and* the padding: left-padded generation batches and right-padded training
batches get the positions and mask each row would have alone, and padding is never attended to.

Device sets: ``no-torchscript`` (fuser flags restored, RoPE and GELU without ``@torch.jit.script``);
``int32`` (int32 position ids and prefix ids, layer ids as Python ints: the model passes ``torch.tensor(i)``,
an int64, to every layer); ``accelerator`` (attention through SDPA, without the in-place boolean
``masked_fill_``; and the label-row training loss of :mod:`glmport.patches.train_loss`).
"""

from __future__ import annotations

import functools
import inspect
import math

from glmport.patching import Patch

FAMILY = "chatglm"
ISSUE_TOKENIZER = "https://github.com/zai-org/ChatGLM-6B/issues/1505"


# --------------------------------------------------------------------------------------------- inputs


def prefix_lm_layout(config, input_ids, padding=None):
    """ChatGLM-6B's attention mask and position ids for a batch, padding-aware.

    ``padding`` ([b, s], nonzero = real token; None = no padding) may be left or right padding. Per row, the
    context runs up to ``<sop>`` (config ``bos_token_id``; the whole row when it has none) and is seen both ways;
    later tokens see the context and what precedes them. No real token sees padding (a padding query sees
    itself too, so no softmax row is empty). Positions count from the row's first real token: in the
    context the token's own index, from ``<sop>`` on the index of ``[gMASK]`` (or ``[MASK]``; no mask token:
    the index itself), and a block position 0 in the context, then 1, 2, ...

    Returns (mask [b, 1, s, s], True = masked; positions [b, 2, s], or [b, s] without 2-D positions) with the
    positions in the dtype of ``input_ids``. Index arithmetic is int32, so nothing 64-bit is computed on a
    device that lacks it.
    """
    import torch

    batch, length = input_ids.shape
    device = input_ids.device
    index = torch.arange(length, dtype=torch.int32, device=device)
    real = torch.ones_like(input_ids, dtype=torch.bool) if padding is None else padding != 0
    end = torch.full((), length, dtype=torch.int32, device=device)

    def first(where):  # per row: the first index where ``where`` holds, else ``length``
        return torch.amin(torch.where(where, index, end), dim=1, keepdim=True)

    first_real = first(real)
    context = first((input_ids == config.bos_token_id) & real)
    gmask, mask = first((input_ids == config.gmask_token_id) & real), first((input_ids == config.mask_token_id) & real)
    mask_position = torch.where(gmask < end, gmask, mask)

    after_context = index >= context  # [b, s]
    own = index - first_real
    at_mask = torch.where(mask_position < end, mask_position - first_real, own)
    positions = torch.where(after_context, at_mask, own).clamp(min=0)
    if getattr(config, "position_encoding_2d", True):
        blocks = torch.where(after_context, index - context + 1, torch.zeros_like(index))
        positions = torch.stack((positions, blocks), dim=1)

    causal = index[None, :] <= index[:, None]  # [query, key]
    visible = (causal[None] | (index[None, None, :] < context[:, :, None])) & real[:, None, :]
    visible = visible | torch.eye(length, dtype=torch.bool, device=device)[None]
    return (~visible).unsqueeze(1), positions.to(input_ids.dtype)


def _has_past(past) -> bool:
    """A cache with something in it (upstream passes ``(None,) * layers`` for "no past")."""
    if past is None:
        return False
    if hasattr(past, "get_seq_length"):
        return past.get_seq_length() > 0
    return any(layer is not None for layer in past)


def _past_length(past) -> int:
    return next(layer[0].shape[0] for layer in past if layer is not None)


def transformers_inputs(ctx) -> None:
    """``ChatGLMModel.forward`` takes a 2-D padding mask and 1-D positions (what transformers' ``generate``,
    peft and glmport's collator pass) and hands the original its own 4-D mask and 2-D positions."""
    original = ctx.original("ChatGLMModel.forward")
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        arguments = bound.arguments
        mask, positions, ids = arguments.get("attention_mask"), arguments.get("position_ids"), arguments.get("input_ids")
        padding = mask if mask is not None and mask.dim() == 2 else None
        one_d = positions is not None and positions.dim() == 2 and self.position_encoding_2d
        if ids is None or (padding is None and not one_d):
            return original(*bound.args, **bound.kwargs)
        past = arguments.get("past_key_values")
        if _has_past(past):
            if padding is None or positions is None or one_d:
                raise ValueError("ChatGLM-6B: a step with a cache needs the model's own [b, 2, s] position ids "
                                 "(from prepare_inputs_for_generation)")
            # queries are the newest tokens; they see every real token up to themselves
            import torch

            keys = torch.arange(padding.shape[1], dtype=torch.int32, device=padding.device)
            queries = keys[-ids.shape[1]:]
            visible = (keys[None, :] <= queries[:, None])[None] & (padding != 0)[:, None, :]
            arguments["attention_mask"] = (~visible).unsqueeze(1)
        else:
            layout_mask, layout_positions = prefix_lm_layout(self.config, ids, padding)
            if padding is not None or mask is None:  # a 4-D mask of the caller's own stays as it is
                arguments["attention_mask"] = layout_mask
            if positions is None or one_d:
                arguments["position_ids"] = layout_positions
        return original(*bound.args, **bound.kwargs)

    ctx.replace("ChatGLMModel.forward", forward)


# ------------------------------------------------------------------------------------------ generation


def generation_on_transformers_5(ctx) -> None:
    """Generation: inputs built by :func:`prefix_lm_layout` from the whole sequence so far (its last column on
    steps with a cache), the 2-D padding mask grown by one each step, the legacy tuple cache kept as it is,
    and the class made a ``GenerationMixin``."""
    import torch
    from transformers import GenerationMixin

    cls = ctx.module.ChatGLMForConditionalGeneration

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      position_ids=None, use_cache=None, **_unused):
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        mask, positions = prefix_lm_layout(self.config, input_ids, padding)
        inputs = {"input_ids": input_ids, "past_key_values": None, "position_ids": positions,
                  "attention_mask": mask, "use_cache": use_cache}
        if _has_past(past_key_values):
            inputs.update(input_ids=input_ids[:, -1:], past_key_values=past_key_values,
                          position_ids=positions[..., -1:], attention_mask=mask[:, :, -1:])
        return inputs

    def update_model_kwargs(self, outputs, model_kwargs, is_encoder_decoder=False, standardize_cache_format=False,
                            **_unused):
        model_kwargs["past_key_values"] = getattr(outputs, "past_key_values", None)
        mask = model_kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        model_kwargs.pop("position_ids", None)  # rebuilt from the sequence on the next step
        return model_kwargs

    ctx.replace("ChatGLMForConditionalGeneration.prepare_inputs_for_generation", prepare_inputs_for_generation)
    ctx.replace("ChatGLMForConditionalGeneration._update_model_kwargs_for_generation", update_model_kwargs)
    ctx.add("ChatGLMForConditionalGeneration._supports_default_dynamic_cache", classmethod(lambda klass: False))
    if not issubclass(cls, GenerationMixin):
        old_bases = cls.__bases__
        cls.__bases__ = (*old_bases, GenerationMixin)
        ctx.recorder.on_undo(lambda: setattr(cls, "__bases__", old_bases), "GenerationMixin base")


# ----------------------------------------------------------------------------------------------- model


def _requested_dtype(config):
    import torch

    dtype = config.__dict__.get("dtype") or config.__dict__.get("torch_dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def build_on_transformers_5(ctx) -> None:
    """``__init__`` never calls ``post_init()``, which transformers 5's ``from_pretrained`` relies on
    (``all_tied_weights_keys``: AttributeError while loading weights), and builds the embeddings, every
    linear layer and the output layer in fp16 whatever dtype is asked for. Call ``post_init`` and build the
    model in the config's dtype (as upstream users did with ``.float()`` / ``.half()``)."""
    original = ctx.original("ChatGLMForConditionalGeneration.__init__")

    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        dtype = _requested_dtype(config)
        if dtype is not None:
            self.to(dtype)
        if "all_tied_weights_keys" not in self.__dict__:
            self.post_init()

    ctx.replace("ChatGLMForConditionalGeneration.__init__", __init__)


def initialize_missing_weights(ctx) -> None:
    """transformers 5 builds models on the meta device and initializes what the checkpoint lacks through
    ``_init_weights``, a no-op upstream: P-Tuning v2's prefix encoder would train from garbage. Give missing
    weights the values a freshly built module has."""
    import torch

    def _init_weights(self, module):
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)):
            module.reset_parameters()

    ctx.replace("ChatGLMPreTrainedModel._init_weights", _init_weights)


def new_style_checkpointing_hook(ctx) -> None:
    """The pre-4.35 ``_set_gradient_checkpointing(module, value)`` hook is a TypeError for transformers'
    ``gradient_checkpointing_enable``; use transformers' own, which sets ``ChatGLMModel.gradient_checkpointing``."""
    from transformers import PreTrainedModel

    ctx.replace("ChatGLMPreTrainedModel._set_gradient_checkpointing", PreTrainedModel._set_gradient_checkpointing)


def rotary_table_in_fp32(ctx) -> None:
    """Upstream computes the rotary table in the dtype of its ``inv_freq`` buffer, fp16 (exact positions up to
    2048) or fp32 after ``.float()``. In a bf16 model (a backend's best half precision; upstream never ran one)
    both the frequencies and the positions above 256 would be rounded to bf16. There, build the table in fp32
    from the fp16-rounded frequencies upstream stores, as an fp32 model does, and hand it on in bf16."""
    import torch

    original = ctx.original("RotaryEmbedding.forward")

    def forward(self, x, seq_dim=1, seq_len=None):
        if self.inv_freq.dtype != torch.bfloat16:
            return original(self, x, seq_dim, seq_len)
        length = int(x.shape[seq_dim] if seq_len is None else seq_len)
        dim = 2 * self.inv_freq.numel()
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim
        frequencies = (1.0 / (10000 ** exponents)).half().float()
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=x.device), frequencies)
        table = torch.cat((angles, angles), dim=-1)
        return table.cos()[:, None, :].bfloat16(), table.sin()[:, None, :].bfloat16()

    ctx.replace("RotaryEmbedding.forward", forward)


# ------------------------------------------------------------------------------------------- tokenizer


def vocabulary_before_base_init(ctx) -> None:
    """Build the SentencePiece wrapper the base class's ``__init__`` reads (through ``vocab_size`` and
    ``get_vocab``) before calling the original, which builds it again as it always did."""
    original = ctx.original("ChatGLMTokenizer.__init__")
    signature = inspect.signature(original)
    wrapper = ctx.module.SPTokenizer

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.sp_tokenizer = wrapper(bound.arguments["vocab_file"], num_image_tokens=bound.arguments["num_image_tokens"])
        original(self, *args, **kwargs)

    ctx.replace("ChatGLMTokenizer.__init__", __init__)


def tokenizer_padding_side(ctx) -> None:
    """transformers 4.45+ passes ``padding_side`` to ``_pad``, which this one does not take (it pads on the
    left only, and asserts it)."""
    original = ctx.original("ChatGLMTokenizer._pad")

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=None, pad_to_multiple_of=None,
             padding_side=None, return_attention_mask=None, **_unused):
        from transformers.utils import PaddingStrategy

        if padding_side not in (None, "left"):
            raise ValueError(f"{type(self).__name__} pads on the left only (padding_side={padding_side!r})")
        strategy = padding_strategy if padding_strategy is not None else PaddingStrategy.DO_NOT_PAD
        return original(self, encoded_inputs, max_length=max_length, padding_strategy=strategy,
                        pad_to_multiple_of=pad_to_multiple_of, return_attention_mask=return_attention_mask)

    ctx.replace("ChatGLMTokenizer._pad", _pad)


def compat_patches() -> list[Patch]:
    from glmport.patches.compat import real_prefix_tokens

    common = {"family": FAMILY}
    return [
        Patch("compat-tokenizer-init", file="tokenization", replaces=("ChatGLMTokenizer.__init__",),
              why="build the vocabulary before the base class asks for it (transformers >= 4.34)",
              link=ISSUE_TOKENIZER, apply=vocabulary_before_base_init, **common),
        Patch("compat-tokenizer-pad", file="tokenization", replaces=("ChatGLMTokenizer._pad",),
              why="accept the padding_side argument transformers >= 4.45 passes to _pad",
              apply=tokenizer_padding_side, **common),
        Patch("compat-model-init", file="modeling", replaces=("ChatGLMForConditionalGeneration.__init__",),
              why="build on transformers 5: post_init(), and the layers in the requested dtype instead of fp16",
              apply=build_on_transformers_5, **common),
        Patch("compat-init-missing-weights", file="modeling", replaces=("ChatGLMPreTrainedModel._init_weights",),
              why="initialize weights the checkpoint lacks (the prefix encoder) instead of leaving garbage",
              apply=initialize_missing_weights, **common),
        Patch("compat-rotary-bf16", file="modeling", replaces=("RotaryEmbedding.forward",),
              why="in a bf16 model, the rotary table from fp32 angles (bf16 rounds positions above 256)",
              apply=rotary_table_in_fp32, **common),
        Patch("compat-prefix-tokens", file="modeling", replaces=("ChatGLMModel.__init__",),
              why="P-Tuning v2 prefix ids built on the CPU, not left on the meta device by transformers 5",
              apply=real_prefix_tokens, **common),
        Patch("compat-checkpointing-hook", file="modeling",
              replaces=("ChatGLMPreTrainedModel._set_gradient_checkpointing",),
              why="pre-4.35 _set_gradient_checkpointing(module, value) hook", apply=new_style_checkpointing_hook,
              **common),
        Patch("compat-transformers-inputs", file="modeling", replaces=("ChatGLMModel.forward",),
              why="accept transformers' 2-D padding mask and 1-D positions: build the prefix-LM mask and 2-D "
                  "positions from the ids and the padding", apply=transformers_inputs, **common),
        Patch("compat-generation", file="modeling",
              replaces=("ChatGLMForConditionalGeneration.prepare_inputs_for_generation",
                        "ChatGLMForConditionalGeneration._update_model_kwargs_for_generation"),
              adds=("ChatGLMForConditionalGeneration._supports_default_dynamic_cache",
                    "ChatGLMForConditionalGeneration.__bases__"),
              why="generate on transformers 5: no _extract_past_from_model_output, padding-aware inputs per "
                  "step, legacy tuple cache, GenerationMixin", apply=generation_on_transformers_5, **common),
    ]


# -------------------------------------------------------------------------------------------- devices


def _gelu(x):
    """GELU, tanh approximation: the scripted ``gelu_impl`` in plain tensor ops."""
    import torch

    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def _half_turn(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_index(q, k, cos, sin, position_id):
    """``apply_rotary_pos_emb_index`` without TorchScript: q, k ``[sq, b, np, hn]``, tables ``[max, 1, hn]``,
    position_id ``[sq, b]`` (int32 on 32-bit devices; the embedding lookup takes it as it is)."""
    import torch.nn.functional as F

    cos = F.embedding(position_id, cos.squeeze(1)).unsqueeze(2)
    sin = F.embedding(position_id, sin.squeeze(1)).unsqueeze(2)
    return q * cos + _half_turn(q) * sin, k * cos + _half_turn(k) * sin


def no_torchscript(ctx) -> None:
    from glmport.patches.torchscript import leave_fusers_off

    leave_fusers_off(ctx)
    ctx.replace("apply_rotary_pos_emb_index", _rotate_index)
    ctx.replace("gelu_impl", _gelu)


def torchscript_patch(*, requires, modes=("infer", "train")) -> Patch:
    return Patch(
        "torchscript-off", family=FAMILY, file="modeling", replaces=("apply_rotary_pos_emb_index", "gelu_impl"),
        why="no TorchScript: restore the fuser flags the import changed, RoPE and GELU without @torch.jit.script",
        link="https://github.com/hiyouga/LLaMA-Factory/issues/4339", apply=no_torchscript, requires=requires,
        modes=modes,
    )


def int32_position_ids(self, input_ids, mask_positions, device, use_gmasks=None):
    """Upstream's positions ([b, 2, s] position and block position; 1-D: [b, s]), built in int32."""
    import torch

    batch, length = input_ids.shape
    use_gmasks = [False] * batch if use_gmasks is None else use_gmasks
    contexts = [row.tolist().index(self.config.bos_token_id) for row in input_ids]
    index = torch.arange(length, dtype=torch.int32, device=device)
    positions = index.unsqueeze(0).repeat(batch, 1)
    if self.position_encoding_2d:
        blocks = torch.zeros_like(positions)
        for row, context in enumerate(contexts):
            positions[row, context:] = mask_positions[row]
            blocks[row, context:] = index[: length - context] + 1
        return torch.stack((positions, blocks), dim=1)
    for row, context in enumerate(contexts):
        if not use_gmasks[row]:
            positions[row, context:] = mask_positions[row]
    return positions


def int32_prompt(self, batch_size, device, dtype=None):
    """The P-Tuning v2 prefix as a past, from int32 prefix ids: per layer ``[2, pre_seq_len, b, heads, head_dim]``."""
    import torch

    dtype = dtype if dtype is not None else torch.half
    prefix_ids = torch.arange(self.pre_seq_len, dtype=torch.int32, device=device).unsqueeze(0).expand(batch_size, -1)
    prompt = self.prefix_encoder(prefix_ids).type(dtype)
    prompt = prompt.view(batch_size, self.pre_seq_len, 2 * self.num_layers, self.num_attention_heads,
                         self.hidden_size // self.num_attention_heads)
    return self.dropout(prompt).permute([2, 1, 0, 3, 4]).split(2)


def int_layer_ids(ctx) -> None:
    """Every layer gets its number as ``torch.tensor(i)`` (int64), and attention computes ``layer_id + 1`` with
    it; hand it on as a Python int."""
    original = ctx.original("GLMBlock.forward")
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        layer_id = bound.arguments.get("layer_id")
        if layer_id is not None and not isinstance(layer_id, int):
            bound.arguments["layer_id"] = int(layer_id)
        return original(*bound.args, **bound.kwargs)

    ctx.replace("GLMBlock.forward", forward)


def apply_int32(ctx) -> None:
    ctx.replace("ChatGLMPreTrainedModel.get_position_ids", int32_position_ids)
    ctx.replace("ChatGLMModel.get_prompt", int32_prompt)
    int_layer_ids(ctx)


def int32_patch(*, requires, modes=("infer", "train")) -> Patch:
    return Patch(
        "int32-positions", family=FAMILY, file="modeling",
        replaces=("ChatGLMPreTrainedModel.get_position_ids", "ChatGLMModel.get_prompt", "GLMBlock.forward"),
        why="position ids and prefix ids in int32, layer ids as Python ints (the device narrows 64-bit data "
            "silently)", apply=apply_int32, requires=requires, modes=modes,
    )


def sdpa_attention_fn(self, query_layer, key_layer, value_layer, attention_mask, hidden_size_per_partition,
                      layer_id, layer_past=None, scaling_attention_score=True, use_cache=False):
    """``attention_fn`` through SDPA: the same softmax(QK^T / sqrt(d)) V (upstream's layer scaling divides by
    the layer number before the product and multiplies by it after, so it cancels), the mask applied out of
    place, no attention probabilities (None)."""
    import torch
    import torch.nn.functional as F

    if layer_past is not None:
        key_layer = torch.cat((layer_past[0], key_layer), dim=0)
        value_layer = torch.cat((layer_past[1], value_layer), dim=0)
    present = (key_layer, value_layer) if use_cache else None
    sq, batch, heads, dim = query_layer.shape
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))  # [b, np, s, hn]
    allowed = None
    if attention_mask is not None and attention_mask.numel() > 1:  # (1, 1) all-False: nothing masked
        allowed = ~attention_mask
    # without the division upstream is left with the multiplication by the layer number
    scale = 1.0 / math.sqrt(dim) if scaling_attention_score else float(int(layer_id) + 1)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    context = context.permute(2, 0, 1, 3).reshape(sq, batch, hidden_size_per_partition)
    return context, present, None


def attention_patch(*, requires, modes=("infer", "train")) -> Patch:
    return Patch(
        "attention-sdpa", family=FAMILY, file="modeling", replaces=("attention_fn",),
        why="attention through SDPA: no in-place boolean masked_fill_, no fp32 copies of the scores",
        apply=lambda ctx: ctx.replace("attention_fn", sdpa_attention_fn), requires=requires, modes=modes,
    )
