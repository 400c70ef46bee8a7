"""ChatGLM-6B model code for glmport's tiny test models.

Written from scratch for glmport's test suite; no line of it comes from the THUDM/chatglm-6b download. It
keeps the public face of the ``modeling_chatglm.py`` that ChatGLM-6B shipped as remote code in spring 2023
(class and method names, signatures, attribute and parameter names, the sequence-first
``[seq, batch, heads, head_dim]`` layout, the fused per-head ``[q | k | v]`` projection) and computes the
same function: a GLM-130B style block (LayerNorm, the normalized input scaled by ``sqrt(2 * num_layers)``
as the residual, a GELU MLP), rotary positions in two dimensions (the first half of every head rotated
by the position, the second half by the position inside the generated block), and a prefix-LM attention
mask in which the prompt, up to ``<sop>``, attends both ways.

It also reproduces, on purpose, the constructs glmport's patch sets deal with: TorchScript fuser flags
flipped at import, ``@torch.jit.script`` functions, ``skip_init``, layers built in fp16 whatever dtype is
asked for, no ``post_init()``, a pre-4.35 gradient checkpointing hook, int64 positions, prefix ids and
layer ids, an in-place boolean masked fill, a tuple KV cache and generation hooks written for
transformers 4.2x (``_extract_past_from_model_output``, a 4-D boolean mask grown in place). This file stands
in for the real one, including where that breaks on current transformers.
"""

import copy
import math
import re
import sys

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn import CrossEntropyLoss, LayerNorm
from torch.nn.utils import skip_init
from transformers.generation.logits_process import LogitsProcessor
from transformers.generation.utils import (
    GenerationConfig,
    LogitsProcessorList,
    ModelOutput,
    StoppingCriteriaList,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from .configuration_chatglm import ChatGLMConfig

# As in the original, importing the module reconfigures TorchScript for the whole process.
if sys.platform != 'darwin':
    torch._C._jit_set_profiling_mode(False)
    torch._C._jit_set_profiling_executor(False)
    torch._C._jit_override_can_fuse_on_cpu(True)
    torch._C._jit_override_can_fuse_on_gpu(True)

logger = logging.get_logger(__name__)

CHATGLM_6B_PRETRAINED_MODEL_ARCHIVE_LIST = ["THUDM/chatglm-6b"]

# Token id forced when the scores turn NaN/inf (upstream's choice once the image tokens were dropped).
_FALLBACK_TOKEN = 5


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """Replace non-finite scores by a distribution that picks one fixed token."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if bool(torch.isnan(scores).any()) or bool(torch.isinf(scores).any()):
            scores.zero_()
            scores[..., _FALLBACK_TOKEN] = 5e4
        return scores


class PrefixEncoder(torch.nn.Module):
    """P-Tuning v2 prompt: prefix position -> a key and a value row of full width for every layer."""

    def __init__(self, config):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        width = 2 * config.num_layers * config.hidden_size
        if self.prefix_projection:
            # a small MLP between the prefix embedding and the per-layer keys and values
            self.embedding = torch.nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = torch.nn.Sequential(
                torch.nn.Linear(config.hidden_size, config.hidden_size), torch.nn.Tanh(),
                torch.nn.Linear(config.hidden_size, width),
            )
        else:
            self.embedding = torch.nn.Embedding(config.pre_seq_len, width)

    def forward(self, prefix: torch.Tensor):
        encoded = self.embedding(prefix)
        return self.trans(encoded) if self.prefix_projection else encoded


@torch.jit.script
def gelu_impl(x):
    """GELU, tanh approximation (the GPT-2 form)."""
    inner = 0.7978845608028654 * x * (1.0 + 0.044715 * x * x)
    return 0.5 * x * (1.0 + torch.tanh(inner))


def gelu(x):
    return gelu_impl(x)


class RotaryEmbedding(torch.nn.Module):
    """Cos/sin tables for positions 0..seq_len-1, kept until a longer sequence asks for more."""

    def __init__(self, dim, base=10000, precision=torch.half, learnable=False):
        super().__init__()
        exponents = torch.arange(0, dim, 2).float() / dim
        frequencies = (1.0 / (base ** exponents)).half()  # stored in fp16, like the original
        self.learnable, self.precision = learnable, precision
        self.max_seq_len_cached = self.cos_cached = self.sin_cached = None
        if learnable:
            self.inv_freq = torch.nn.Parameter(frequencies)
        else:
            self.register_buffer('inv_freq', frequencies)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints carry inv_freq, and it is ignored: the buffer keeps the value computed above.
        return

    def forward(self, x, seq_dim=1, seq_len=None):
        seq_len = x.shape[seq_dim] if seq_len is None else seq_len
        if self.max_seq_len_cached is None or seq_len > self.max_seq_len_cached:
            self.max_seq_len_cached = None if self.learnable else seq_len
            steps = torch.arange(seq_len, device=x.device, dtype=self.inv_freq.dtype)
            angles = torch.outer(steps, self.inv_freq)
            table = torch.cat((angles, angles), dim=-1).to(x.device)  # [seq, dim]: both halves alike
            if self.precision == torch.bfloat16:
                table = table.float()
            cos, sin = table.cos()[:, None, :], table.sin()[:, None, :]  # [seq, 1, dim]
            if self.precision == torch.bfloat16:
                cos, sin = cos.bfloat16(), sin.bfloat16()
            if self.learnable:
                return cos, sin
            self.cos_cached, self.sin_cached = cos, sin
        return self.cos_cached[:seq_len, ...], self.sin_cached[:seq_len, ...]

    def _apply(self, fn):
        # the cached tables follow the module across devices and dtypes
        for name in ("cos_cached", "sin_cached"):
            table = getattr(self, name, None)
            if table is not None:
                setattr(self, name, fn(table))
        return super()._apply(fn)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=x.ndim - 1)


@torch.jit.script
def apply_rotary_pos_emb_index(q, k, cos, sin, position_id):
    # q, k: [sq, b, np, hn]; cos, sin: [max_pos, 1, hn]; position_id: [sq, b] -> tables [sq, b, 1, hn]
    cos = F.embedding(position_id, cos.squeeze(1)).unsqueeze(2)
    sin = F.embedding(position_id, sin.squeeze(1)).unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def attention_fn(self, query_layer, key_layer, value_layer, attention_mask, hidden_size_per_partition, layer_id,
                 layer_past=None, scaling_attention_score=True, use_cache=False):
    """softmax(QK^T / sqrt(d)) V over sequence-first tensors; ``attention_mask`` is True where a query may
    NOT look. Returns (context [sq, b, hp], present (key, value) or None, probabilities)."""
    if layer_past is not None:
        cached_key, cached_value = layer_past[0], layer_past[1]
        key_layer = torch.cat((cached_key, key_layer), dim=0)
        value_layer = torch.cat((cached_value, value_layer), dim=0)
    present = (key_layer, value_layer) if use_cache else None

    sq, batch, heads, dim = query_layer.shape
    sk = key_layer.shape[0]
    # Layer scaling: the scores are divided by the layer number before the product (fp16 headroom)
    # and multiplied back in fp32 before the softmax.
    coeff = float(layer_id + 1)
    if scaling_attention_score:
        query_layer = query_layer / (math.sqrt(dim) * coeff)
    queries = query_layer.reshape(sq, batch * heads, dim).transpose(0, 1)  # [b * np, sq, hn]
    keys_t = key_layer.reshape(sk, batch * heads, dim).permute(1, 2, 0)  # [b * np, hn, sk]
    start = torch.zeros(1, 1, 1, dtype=queries.dtype, device=queries.device)
    scores = torch.baddbmm(start, queries, keys_t, beta=0.0, alpha=1.0).view(batch, heads, sq, sk)

    if self.scale_mask_softmax:
        self.scale_mask_softmax.scale = coeff
        probs = self.scale_mask_softmax(scores, attention_mask.contiguous())
    else:
        if not (attention_mask == 0).all():  # an all-visible mask (a decoding step) is skipped
            scores.masked_fill_(attention_mask, -10000.0)
        kept = scores.dtype
        probs = F.softmax(scores.float() * coeff, dim=-1).type(kept)

    values = value_layer.reshape(sk, batch * heads, dim).transpose(0, 1)  # [b * np, sk, hn]
    context = torch.bmm(probs.view(batch * heads, sq, sk), values).view(batch, heads, sq, dim)
    context = context.permute(2, 0, 1, 3).contiguous().view(sq, batch, hidden_size_per_partition)
    return context, present, probs


def default_init(cls, *args, **kwargs):
    """Construct a module normally (the alternative to ``skip_init``)."""
    return cls(*args, **kwargs)


class SelfAttention(torch.nn.Module):
    """Fused per-head QKV projection, 2-D rotary positions, attention, output projection ``dense``."""

    def __init__(self, hidden_size, num_attention_heads, layer_id, hidden_size_per_attention_head=None, bias=True,
                 params_dtype=torch.float, position_encoding_2d=True, empty_init=True):
        super().__init__()
        init_method = skip_init if empty_init else default_init
        self.layer_id, self.position_encoding_2d = layer_id, position_encoding_2d
        # one partition (no tensor parallelism): the per-partition sizes are the whole sizes
        self.hidden_size = self.hidden_size_per_partition = hidden_size
        self.num_attention_heads = self.num_attention_heads_per_partition = num_attention_heads
        # With 2-D positions each half of a head rotates on its own, so the table covers half a head.
        head = hidden_size // num_attention_heads
        self.rotary_emb = RotaryEmbedding(head // 2 if position_encoding_2d else head, base=10000,
                                          precision=torch.half, learnable=False)
        self.scale_mask_softmax = None
        self.hidden_size_per_attention_head = head if hidden_size_per_attention_head is None \
            else hidden_size_per_attention_head
        self.inner_hidden_size = num_attention_heads * self.hidden_size_per_attention_head
        # one projection for all three; its output is [q | k | v] per head, head after head
        self.query_key_value = init_method(torch.nn.Linear, hidden_size, 3 * self.inner_hidden_size, bias=bias,
                                           dtype=params_dtype)
        self.dense = init_method(torch.nn.Linear, self.inner_hidden_size, hidden_size, bias=bias, dtype=params_dtype)

    @staticmethod
    def attention_mask_func(attention_scores, attention_mask):
        attention_scores.masked_fill_(attention_mask, -10000.0)
        return attention_scores

    def split_tensor_along_last_dim(self, tensor, num_partitions, contiguous_split_chunks=False):
        """Cut the last dimension into ``num_partitions`` equal pieces."""
        pieces = torch.split(tensor, tensor.size()[-1] // num_partitions, dim=tensor.dim() - 1)
        return tuple(piece.contiguous() for piece in pieces) if contiguous_split_chunks else pieces

    def forward(self, hidden_states, position_ids, attention_mask, layer_id, layer_past=None, use_cache=False,
                output_attentions=False):
        """hidden_states [sq, b, h]; position_ids [b, 2, sq] (position, block position) with 2-D positions,
        else [b, sq]; attention_mask [b, 1, sq, sk], True where masked."""
        fused = self.query_key_value(hidden_states)
        fused = fused.view(*fused.size()[:-1], self.num_attention_heads_per_partition,
                           3 * self.hidden_size_per_attention_head)
        query_layer, key_layer, value_layer = self.split_tensor_along_last_dim(fused, 3)

        if self.position_encoding_2d:
            q_position, q_block = query_layer.chunk(2, dim=query_layer.ndim - 1)
            k_position, k_block = key_layer.chunk(2, dim=key_layer.ndim - 1)
            cos, sin = self.rotary_emb(q_position, seq_len=position_ids.max() + 1)
            positions = position_ids[:, 0, :].transpose(0, 1).contiguous()
            blocks = position_ids[:, 1, :].transpose(0, 1).contiguous()
            q_position, k_position = apply_rotary_pos_emb_index(q_position, k_position, cos, sin, positions)
            q_block, k_block = apply_rotary_pos_emb_index(q_block, k_block, cos, sin, blocks)
            query_layer = torch.cat([q_position, q_block], dim=q_position.ndim - 1)
            key_layer = torch.cat([k_position, k_block], dim=k_position.ndim - 1)
        else:
            positions = position_ids.transpose(0, 1)
            cos, sin = self.rotary_emb(value_layer, seq_len=positions.max() + 1)
            query_layer, key_layer = apply_rotary_pos_emb_index(query_layer, key_layer, cos, sin, positions)

        context, present, probs = attention_fn(
            self=self, query_layer=query_layer, key_layer=key_layer, value_layer=value_layer,
            attention_mask=attention_mask, hidden_size_per_partition=self.hidden_size_per_partition,
            layer_id=layer_id, layer_past=layer_past, use_cache=use_cache,
        )
        output = self.dense(context)
        return (output, present, probs) if output_attentions else (output, present)


class GEGLU(torch.nn.Module):
    """Gated GELU (defined upstream, not used by the released model)."""

    def __init__(self):
        super().__init__()
        self.activation_fn = F.gelu

    def forward(self, x):
        value, gate = x.chunk(2, dim=x.ndim - 1)
        return value * self.activation_fn(gate)


class GLU(torch.nn.Module):
    """The feed-forward block: h -> inner (GELU) -> h. (Named GLU upstream; nothing gates.)"""

    def __init__(self, hidden_size, inner_hidden_size=None, layer_id=None, bias=True, activation_func=gelu,
                 params_dtype=torch.float, empty_init=True):
        super().__init__()
        init_method = skip_init if empty_init else default_init
        self.layer_id = layer_id
        self.activation_func = activation_func
        self.hidden_size = hidden_size
        self.inner_hidden_size = 4 * hidden_size if inner_hidden_size is None else inner_hidden_size
        self.dense_h_to_4h = init_method(torch.nn.Linear, self.hidden_size, self.inner_hidden_size, bias=bias,
                                         dtype=params_dtype)
        self.dense_4h_to_h = init_method(torch.nn.Linear, self.inner_hidden_size, self.hidden_size, bias=bias,
                                         dtype=params_dtype)

    def forward(self, hidden_states):
        return self.dense_4h_to_h(self.activation_func(self.dense_h_to_4h(hidden_states)))


class GLMBlock(torch.nn.Module):
    """LayerNorm -> attention, LayerNorm -> MLP; each residual is the *normalized* input times
    ``sqrt(2 * num_layers)`` (GLM-130B's DeepNorm-style scaling)."""

    def __init__(self, hidden_size, num_attention_heads, layernorm_epsilon, layer_id, inner_hidden_size=None,
                 hidden_size_per_attention_head=None, layernorm=LayerNorm, use_bias=True, params_dtype=torch.float,
                 num_layers=28, position_encoding_2d=True, empty_init=True):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = layernorm(hidden_size, eps=layernorm_epsilon)
        self.position_encoding_2d = position_encoding_2d
        self.attention = SelfAttention(hidden_size, num_attention_heads, layer_id,
                                       hidden_size_per_attention_head=hidden_size_per_attention_head, bias=use_bias,
                                       params_dtype=params_dtype, position_encoding_2d=position_encoding_2d,
                                       empty_init=empty_init)
        self.post_attention_layernorm = layernorm(hidden_size, eps=layernorm_epsilon)
        self.num_layers = num_layers
        self.mlp = GLU(hidden_size, inner_hidden_size=inner_hidden_size, bias=use_bias, layer_id=layer_id,
                       params_dtype=params_dtype, empty_init=empty_init)

    def forward(self, hidden_states, position_ids, attention_mask, layer_id, layer_past=None, use_cache=False,
                output_attentions=False):
        """Returns (hidden_states, present if use_cache, attention probabilities if output_attentions)."""
        normed = self.input_layernorm(hidden_states)
        attended = self.attention(normed, position_ids, attention_mask=attention_mask, layer_id=layer_id,
                                  layer_past=layer_past, use_cache=use_cache, output_attentions=output_attentions)
        extra = attended[1:]  # (present, [probs])
        alpha = (2 * self.num_layers) ** 0.5
        mixed = normed * alpha + attended[0]
        normed = self.post_attention_layernorm(mixed)
        output = normed * alpha + self.mlp(normed)
        return (output,) + (extra if use_cache else extra[1:])


class ChatGLMPreTrainedModel(PreTrainedModel):
    is_parallelizable = False
    supports_gradient_checkpointing = True
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"  # checkpoint keys are transformer.*
    _no_split_modules = ["GLMBlock"]

    def __init__(self, *inputs, **kwargs):
        super().__init__(*inputs, **kwargs)

    def _init_weights(self, module: nn.Module):
        # Deliberately nothing: weights come from the checkpoint.
        return

    def get_masks(self, input_ids, device):
        """Bool mask [b, 1, s, s], True where a query may NOT look: causal, except that every token sees
        the whole context (everything before ``<sop>``, the bos token)."""
        batch_size, seq_length = input_ids.shape
        context_lengths = [row.tolist().index(self.config.bos_token_id) for row in input_ids]
        visible = torch.ones((batch_size, seq_length, seq_length), device=device)
        visible.tril_()
        for row, context_length in enumerate(context_lengths):
            visible[row, :, :context_length] = 1
        visible.unsqueeze_(1)
        return (visible < 0.5).bool()

    def get_position_ids(self, input_ids, mask_positions, device, use_gmasks=None):
        """[b, 2, s] with 2-D positions: the position (which stops at the mask token's for everything from
        ``<sop>`` on) and the position inside the generated block (0 in the context, 1, 2, ... after it)."""
        batch_size, seq_length = input_ids.shape
        if use_gmasks is None:
            use_gmasks = [False] * batch_size
        context_lengths = [row.tolist().index(self.config.bos_token_id) for row in input_ids]
        positions = torch.arange(seq_length, dtype=torch.long, device=device).unsqueeze(0).repeat(batch_size, 1)
        if self.position_encoding_2d:
            for row, context_length in enumerate(context_lengths):
                positions[row, context_length:] = mask_positions[row]
            blocks = [torch.cat((torch.zeros(context_length, dtype=torch.long, device=device),
                                 torch.arange(1, seq_length - context_length + 1, dtype=torch.long, device=device)))
                      for context_length in context_lengths]
            return torch.stack((positions, torch.stack(blocks, dim=0)), dim=1)
        for row, context_length in enumerate(context_lengths):
            if not use_gmasks[row]:
                positions[row, context_length:] = mask_positions[row]
        return positions

    def _set_gradient_checkpointing(self, module, value=False):
        # the pre-4.35 hook: transformers called it once per submodule
        if isinstance(module, ChatGLMModel):
            module.gradient_checkpointing = bool(value)


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, empty_init=True):
        super().__init__(config)
        init_method = skip_init if empty_init else default_init
        # the model keeps these config values as attributes of its own, under the config's names
        for name in ("max_sequence_length", "hidden_size", "num_attention_heads", "vocab_size", "num_layers",
                     "layernorm_epsilon", "inner_hidden_size", "position_encoding_2d", "pre_seq_len",
                     "prefix_projection"):
            setattr(self, name, getattr(config, name))
        self.hidden_size_per_attention_head = self.hidden_size // self.num_attention_heads
        self.params_dtype = torch.half  # the layers are fp16 whatever dtype the caller asks for

        self.word_embeddings = init_method(torch.nn.Embedding, num_embeddings=self.vocab_size,
                                           embedding_dim=self.hidden_size, dtype=self.params_dtype)
        self.gradient_checkpointing = False
        self.layers = torch.nn.ModuleList([
            GLMBlock(self.hidden_size, self.num_attention_heads, self.layernorm_epsilon, layer_id,
                     inner_hidden_size=self.inner_hidden_size,
                     hidden_size_per_attention_head=self.hidden_size_per_attention_head, layernorm=LayerNorm,
                     use_bias=True, params_dtype=self.params_dtype, position_encoding_2d=self.position_encoding_2d,
                     empty_init=empty_init)
            for layer_id in range(self.num_layers)
        ])
        self.final_layernorm = LayerNorm(self.hidden_size, eps=self.layernorm_epsilon)

        if self.pre_seq_len is not None:
            # P-Tuning v2: only the prefix encoder trains.
            self.requires_grad_(False)
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_tokens = torch.arange(self.pre_seq_len).long()  # a plain tensor, not a buffer
            self.dropout = torch.nn.Dropout(0.1)

    def set_input_embeddings(self, new_embeddings: torch.Tensor):
        self.word_embeddings = new_embeddings

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.word_embeddings

    def get_prompt(self, batch_size, device, dtype=torch.half):
        """The prefix as a past: per layer one [2, pre_seq_len, b, heads, head_dim] (key, value) tensor."""
        tokens = self.prefix_tokens.unsqueeze(0).expand(batch_size, -1).to(device)
        prompt = self.prefix_encoder(tokens).type(dtype)
        prompt = prompt.view(batch_size, self.pre_seq_len, 2 * self.num_layers, self.num_attention_heads,
                             self.hidden_size // self.num_attention_heads)
        prompt = self.dropout(prompt)
        return prompt.permute([2, 1, 0, 3, 4]).split(2)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = config.use_cache if use_cache is None else use_cache
        return_dict = config.use_return_dict if return_dict is None else return_dict

        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("gradient checkpointing does not work with a KV cache; use_cache is turned off")
            use_cache = False
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        batch_size, seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)

        if past_key_values is None:
            # A fresh sequence: the P-Tuning prefix stands in for the past (else every layer starts empty), and
            # masks and positions come from where <sop> and the mask token sit in each row.
            past_key_values = (self.get_prompt(batch_size=batch_size, device=input_ids.device,
                                               dtype=inputs_embeds.dtype)
                               if self.pre_seq_len is not None else (None,) * self.num_layers)
            if attention_mask is None:
                attention_mask = self.get_masks(input_ids, device=input_ids.device)
            if position_ids is None:
                mask_id, gmask_id = config.mask_token_id, config.gmask_token_id
                mask_positions, use_gmasks = [], []
                for row in input_ids.tolist():
                    token = gmask_id if gmask_id in row else mask_id
                    mask_positions.append(row.index(token))
                    use_gmasks.append(token == gmask_id)
                position_ids = self.get_position_ids(input_ids, mask_positions=mask_positions,
                                                     device=input_ids.device, use_gmasks=use_gmasks)

        if self.pre_seq_len is not None and attention_mask is not None:  # every query sees the whole prefix
            prefix_seen = torch.ones(batch_size, 1, input_ids.size(-1), self.pre_seq_len).to(attention_mask.device)
            attention_mask = torch.cat(((prefix_seen < 0.5).bool(), attention_mask), dim=3)

        hidden_states = inputs_embeds.transpose(0, 1)  # [s, b, h]
        attention_mask = torch.zeros(1, 1, device=input_ids.device).bool() if attention_mask is None \
            else attention_mask.to(hidden_states.device)
        presents, hiddens, attentions = [], [], []
        checkpointing = self.gradient_checkpointing and self.training
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                hiddens.append(hidden_states)
            layer_id = torch.tensor(index)  # the layer number travels as an int64 tensor
            if checkpointing:
                out = torch.utils.checkpoint.checkpoint(layer, hidden_states, position_ids, attention_mask, layer_id,
                                                        past_key_values[index], use_cache, output_attentions)
            else:
                out = layer(hidden_states, position_ids=position_ids, attention_mask=attention_mask, layer_id=layer_id,
                            layer_past=past_key_values[index], use_cache=use_cache,
                            output_attentions=output_attentions)
            hidden_states = out[0]
            if use_cache:
                presents.append(out[1])
            if output_attentions:
                attentions.append(out[-1])

        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            hiddens.append(hidden_states)
        presents = tuple(presents) if use_cache else None
        hiddens = tuple(hiddens) if output_hidden_states else None
        attentions = tuple(attentions) if output_attentions else None
        if not return_dict:
            return tuple(part for part in (hidden_states, presents, hiddens, attentions) if part is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=presents,
                                       hidden_states=hiddens, attentions=attentions)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, empty_init=True):
        super().__init__(config)
        init_method = skip_init if empty_init else default_init
        self.max_sequence_length = config.max_sequence_length
        self.position_encoding_2d = config.position_encoding_2d
        self.transformer = ChatGLMModel(config, empty_init=empty_init)
        self.lm_head = init_method(nn.Linear, config.hidden_size, config.vocab_size, bias=False, dtype=torch.half)
        self.config = config
        self.quantized = False
        if config.quantization_bit:
            self.quantize(config.quantization_bit, empty_init=True)

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict,
                                            is_encoder_decoder: bool = False,
                                            standardize_cache_format: bool = False) -> dict:
        model_kwargs["past_key_values"] = self._extract_past_from_model_output(
            outputs, standardize_cache_format=standardize_cache_format
        )
        mask = model_kwargs.get("attention_mask")
        if mask is not None and mask.dtype == torch.bool:
            # the new token's column (masked for the old rows), then its row (which sees everything)
            mask = torch.cat([mask, mask.new_ones((*mask.shape[:3], 1))], dim=3)
            new_row = mask[:, :, -1:].clone()
            new_row[..., -1] = False
            model_kwargs["attention_mask"] = torch.cat([mask, new_row], dim=2)
        if "position_ids" in model_kwargs:
            positions = model_kwargs["position_ids"]
            following = positions[..., -1:].clone()
            following[:, 1, :] += 1  # the block position advances, the position stays at the mask's
            model_kwargs["position_ids"] = torch.cat([positions, following], dim=-1)
        return model_kwargs

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past=None, past_key_values=None,
                                      attention_mask=None, position_ids=None, **kwargs) -> dict:
        batch_size, seq_length = input_ids.shape
        mask_id, gmask_id = self.config.mask_token_id, self.config.gmask_token_id
        rows = input_ids.tolist()
        mask_positions, use_gmasks = [], []
        for row in rows:
            token = gmask_id if gmask_id in row else mask_id
            mask_positions.append(row.index(token))
            use_gmasks.append(token == gmask_id)

        if past is not None or past_key_values is not None:
            # a decoding step: the newest token only
            last_token = input_ids[:, -1].unsqueeze(-1)
            attention_mask = attention_mask[:, :, -1:] if attention_mask is not None and \
                attention_mask.dtype == torch.bool else None
            if position_ids is not None:
                position_ids = position_ids[..., -1:]
            else:
                context_lengths = [row.index(self.config.bos_token_id) for row in rows]
                if self.position_encoding_2d:
                    pairs = [[mask_position, seq_length - context_length]
                             for mask_position, context_length in zip(mask_positions, context_lengths)]
                    position_ids = torch.tensor(pairs, dtype=torch.long, device=input_ids.device).unsqueeze(-1)
                else:
                    position_ids = torch.tensor(mask_positions, dtype=torch.long, device=input_ids.device).unsqueeze(-1)
            return {"input_ids": last_token, "past_key_values": past if past is not None else past_key_values,
                    "position_ids": position_ids, "attention_mask": attention_mask}

        if attention_mask is not None and attention_mask.dtype != torch.bool:
            logger.warning_once(f"The dtype of attention mask ({attention_mask.dtype}) is not bool")
            attention_mask = None
        if attention_mask is None:
            attention_mask = self.get_masks(input_ids, device=input_ids.device)
        if position_ids is None:
            position_ids = self.get_position_ids(input_ids, device=input_ids.device, mask_positions=mask_positions,
                                                 use_gmasks=use_gmasks)
        return {"input_ids": input_ids, "past_key_values": past, "position_ids": position_ids,
                "attention_mask": attention_mask}

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        transformer_outputs = self.transformer(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
        )
        hidden_states = transformer_outputs[0]  # [s, b, h]
        lm_logits = self.lm_head(hidden_states).permute(1, 0, 2).contiguous()  # [b, s, vocab]

        loss = None
        if labels is not None:
            # fp32 logits for the loss; position t predicts label t + 1
            lm_logits = lm_logits.to(torch.float32)
            predicted = lm_logits[..., :-1, :].contiguous()
            targets = labels[..., 1:].contiguous()
            loss = CrossEntropyLoss(ignore_index=-100)(predicted.view(-1, predicted.size(-1)), targets.view(-1))
            lm_logits = lm_logits.to(hidden_states.dtype)
            loss = loss.to(hidden_states.dtype)

        if not return_dict:
            output = (lm_logits,) + tuple(transformer_outputs[1:])
            return output if loss is None else (loss,) + output
        return CausalLMOutputWithPast(loss=loss, logits=lm_logits, past_key_values=transformer_outputs.past_key_values,
                                      hidden_states=transformer_outputs.hidden_states,
                                      attentions=transformer_outputs.attentions)

    @staticmethod
    def _reorder_cache(past, beam_idx: torch.LongTensor):
        """Pick the cache rows of the surviving beams (batch is dim 1 in this layout)."""
        return tuple((layer[0].index_select(1, beam_idx.to(layer[0].device)),
                      layer[1].index_select(1, beam_idx.to(layer[1].device))) for layer in past)

    def process_response(self, response):
        """Strip the reply and use full-width punctuation next to Chinese characters."""
        response = response.strip().replace("[[训练时间]]", "2023年")
        for ascii_mark, wide_mark in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")):
            response = re.sub(r"([\u4e00-\u9fff])" + ascii_mark, r"\1" + wide_mark, response)
            response = re.sub(ascii_mark + r"([\u4e00-\u9fff])", wide_mark + r"\1", response)
        return response

    @staticmethod
    def _round_prompt(query, history):
        """The chat prompt: the bare query, or numbered rounds of 问/答 when there is history."""
        if not history:
            return query
        rounds = [f"[Round {index}]\n问：{question}\n答：{answer}\n" for index, (question, answer) in enumerate(history)]
        return "".join(rounds) + f"[Round {len(history)}]\n问：{query}\n答："

    @torch.no_grad()
    def chat(self, tokenizer, query: str, history=None, max_length: int = 2048, num_beams=1, do_sample=True,
             top_p=0.7, temperature=0.95, logits_processor=None, **kwargs):
        history = [] if history is None else history
        processors = LogitsProcessorList() if logits_processor is None else logits_processor
        processors.append(InvalidScoreLogitsProcessor())
        inputs = tokenizer([self._round_prompt(query, history)], return_tensors="pt").to(self.device)
        generated = self.generate(**inputs, max_length=max_length, num_beams=num_beams, do_sample=do_sample,
                                  top_p=top_p, temperature=temperature, logits_processor=processors, **kwargs)
        response = self.process_response(tokenizer.decode(generated.tolist()[0][len(inputs["input_ids"][0]):]))
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(self, tokenizer, query: str, history=None, max_length: int = 2048, do_sample=True, top_p=0.7,
                    temperature=0.95, logits_processor=None, **kwargs):
        history = [] if history is None else history
        processors = LogitsProcessorList() if logits_processor is None else logits_processor
        processors.append(InvalidScoreLogitsProcessor())
        inputs = tokenizer([self._round_prompt(query, history)], return_tensors="pt").to(self.device)
        prompt_length = len(inputs["input_ids"][0])
        for sequence in self.stream_generate(**inputs, max_length=max_length, do_sample=do_sample, top_p=top_p,
                                             temperature=temperature, logits_processor=processors, **kwargs):
            response = self.process_response(tokenizer.decode(sequence.tolist()[0][prompt_length:]))
            yield response, history + [(query, response)]

    @torch.no_grad()
    def stream_generate(self, input_ids, generation_config: GenerationConfig | None = None,
                        logits_processor: LogitsProcessorList | None = None,
                        stopping_criteria: StoppingCriteriaList | None = None, prefix_allowed_tokens_fn=None,
                        **kwargs):
        """Sampling loop that yields the sequence after every new token (uses GenerationMixin internals)."""
        config = copy.deepcopy(self.generation_config if generation_config is None else generation_config)
        model_kwargs = config.update(**kwargs)
        stop_ids = [config.eos_token_id] if isinstance(config.eos_token_id, int) else config.eos_token_id
        prompt_length = input_ids.shape[-1]
        if config.max_new_tokens is not None:
            config.max_length = prompt_length + config.max_new_tokens
        processors = self._get_logits_processor(
            generation_config=config, input_ids_seq_length=prompt_length, encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            logits_processor=LogitsProcessorList() if logits_processor is None else logits_processor,
        )
        criteria = self._get_stopping_criteria(
            generation_config=config,
            stopping_criteria=StoppingCriteriaList() if stopping_criteria is None else stopping_criteria,
        )
        warpers = self._get_logits_warper(config)
        running = input_ids.new_ones(input_ids.shape[0])
        while True:
            step_inputs = self.prepare_inputs_for_generation(input_ids, **model_kwargs)
            outputs = self(**step_inputs, return_dict=True, output_attentions=False, output_hidden_states=False)
            scores = warpers(input_ids, processors(input_ids, outputs.logits[:, -1, :]))
            probs = nn.functional.softmax(scores, dim=-1)
            chosen = torch.multinomial(probs, num_samples=1).squeeze(1) if config.do_sample else probs.argmax(dim=-1)
            input_ids = torch.cat([input_ids, chosen[:, None]], dim=-1)
            model_kwargs = self._update_model_kwargs_for_generation(outputs, model_kwargs,
                                                                    is_encoder_decoder=self.config.is_encoder_decoder)
            if stop_ids is not None:
                stopped = sum(chosen == stop for stop in stop_ids).bool()
                running = running * (~stopped).to(running.dtype)
            yield input_ids
            if running.max() == 0 or criteria(input_ids, None):
                break

    def quantize(self, bits: int, empty_init=False, **kwargs):
        if bits == 0:
            return
        raise NotImplementedError("glmport's test fixture has no quantization kernels (quantization.py)")
