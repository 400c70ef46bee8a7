"""ChatGLM3 (and ChatGLM2) model code for glmport's tiny test models.

Written from scratch for glmport's test suite; no line of it comes from the ChatGLM3-6B or ChatGLM2-6B
downloads. It keeps the public face of the ``modeling_chatglm.py`` that ChatGLM3-6B ships as remote code,
and ChatGLM2-6B before it with the differences marked below (class and method
names, signatures, attribute names, parameter names, the sequence-first ``[seq, batch, heads, head_dim]``
layout) together with the constructs glmport's patch sets have to deal with: TorchScript fuser flags set
at import, a scripted rotary function, ``skip_init``, SDPA picked by the torch version, fp32 masks and
logits, a tuple KV cache, and generation hooks that predate transformers 5. Those are reproduced on
purpose, including where they break on current transformers: this file stands in for the real one.

Lines starting with ``#?`` / ``#|`` describe how the older fixture revisions differ (ChatGLM2-6B's among
them: rotary angles in the model's dtype, ``[Round N]`` text prompts in ``chat``); glmport renders each
revision from this one source (see ``glmport.tiny.remote``).
"""

import ast
import copy
import math
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

log = logging.get_logger(__name__)

#? chatglm2-2023-07, chatglm2-2023-10
#|CHATGLM_6B_PRETRAINED_MODEL_ARCHIVE_LIST = ["THUDM/chatglm2-6b"]
#? else
CHATGLM_6B_PRETRAINED_MODEL_ARCHIVE_LIST = ["THUDM/chatglm3-6b"]
#? end

# Token id forced when the scores turn NaN/inf (upstream's choice for ChatGLM3).
_FALLBACK_TOKEN = 5


def default_init(cls, *args, **kwargs):
    """Construct a module normally (the alternative to ``skip_init``)."""
    return cls(*args, **kwargs)


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """Replace non-finite scores by a distribution that picks one fixed token."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not bool(torch.isfinite(scores).all()):
            scores.zero_()
            scores[..., _FALLBACK_TOKEN] = 5e4
        return scores


class PrefixEncoder(torch.nn.Module):
    """P-Tuning v2 prompt: prefix positions -> one key and one value row per layer and KV group."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        width = 2 * config.num_layers * config.multi_query_group_num * config.kv_channels
        self.embedding = torch.nn.Embedding(config.pre_seq_len, width)
        if self.prefix_projection:
            self.trans = torch.nn.Sequential(
                torch.nn.Linear(width, config.hidden_size), torch.nn.Tanh(), torch.nn.Linear(config.hidden_size, width)
            )

    def forward(self, prefix: torch.Tensor):
        encoded = self.embedding(prefix)
        return self.trans(encoded) if self.prefix_projection else encoded


def split_tensor_along_last_dim(tensor: torch.Tensor, num_partitions: int,
                                contiguous_split_chunks: bool = False) -> list[torch.Tensor]:
    """Cut the last dimension into ``num_partitions`` equal pieces."""
    pieces = tensor.split(tensor.shape[-1] // num_partitions, dim=-1)
    return tuple(p.contiguous() for p in pieces) if contiguous_split_chunks else pieces


class RotaryEmbedding(nn.Module):
    """Cos/sin table for rotary positions; built afresh, for every position, on each call."""

    def __init__(self, dim, original_impl=False, device=None, dtype=None):
        super().__init__()
        exponent = torch.arange(0, dim, 2, device=device).to(dtype=dtype) / dim
        self.register_buffer("inv_freq", 1.0 / (10000 ** exponent))
        self.dim = dim
        self.original_impl = original_impl

    def forward_impl(self, seq_len: int, n_elem: int, dtype: torch.dtype, device: torch.device, base: int = 10000):
#? chatglm2-2023-07, chatglm2-2023-10
#|        # The angles are computed in the model's dtype (a half-precision model rounds the larger positions) ...
#|        freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=dtype, device=device) / n_elem))
#|        steps = torch.arange(seq_len, dtype=dtype, device=device)
#? else
        # The angles are always computed in fp32 ...
        freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float, device=device) / n_elem))
        steps = torch.arange(seq_len, dtype=torch.float, device=device)
#? end
        angles = torch.outer(steps, freqs).float()
        table = torch.stack((angles.cos(), angles.sin()), dim=-1)  # [seq_len, n_elem // 2, 2]
        # ... and then stored in the model's half precision type, if it has one.
        if dtype in (torch.float16, torch.bfloat16, torch.int8):
            table = table.bfloat16() if dtype == torch.bfloat16 else table.half()
        return table

    def forward(self, max_seq_len, offset=0):
        return self.forward_impl(max_seq_len, self.dim, dtype=self.inv_freq.dtype, device=self.inv_freq.device)


@torch.jit.script
def apply_rotary_pos_emb(x: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
    # x: [sq, b, np, hn]. Only the first 2 * rope_cache.size(-2) channels rotate, as (even, odd) pairs.
    seq = x.size(0)
    half = rope_cache.size(-2)
    head_part = x[..., : 2 * half]
    tail = x[..., 2 * half:]
    pairs = head_part.reshape(seq, -1, x.size(2), half, 2)
    table = rope_cache[:seq].view(seq, -1, 1, half, 2)
    cos = table[..., 0]
    sin = table[..., 1]
    first = pairs[..., 0]
    second = pairs[..., 1]
    turned = torch.stack((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return torch.cat((turned.flatten(3), tail), dim=-1)


class RMSNorm(torch.nn.Module):
    def __init__(self, normalized_shape, eps=1e-5, device=None, dtype=None, **kwargs):
        super().__init__()
        # Left uninitialised, like the original: checkpoints always provide it.
        self.weight = torch.nn.Parameter(torch.empty(normalized_shape, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor):
        kept_dtype = hidden_states.dtype
        mean_square = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        scaled = hidden_states * torch.rsqrt(mean_square + self.eps)
        return (self.weight * scaled).to(kept_dtype)


class CoreAttention(torch.nn.Module):
    """softmax(QK^T / sqrt(d)) V on sequence-first tensors; SDPA on torch 2, explicit matmuls before."""

    def __init__(self, config: ChatGLMConfig, layer_number):
        super().__init__()
        self.apply_query_key_layer_scaling = config.apply_query_key_layer_scaling
        # Layer scaling divides the scores by the layer number first, which only fp32 softmax tolerates.
        self.attention_softmax_in_fp32 = config.attention_softmax_in_fp32 or self.apply_query_key_layer_scaling
        self.layer_number = max(1, layer_number)
        self.num_attention_heads_per_partition = config.num_attention_heads
        self.hidden_size_per_attention_head = config.kv_channels
        self.hidden_size_per_partition = config.kv_channels * config.num_attention_heads
        self.coeff = self.layer_number if self.apply_query_key_layer_scaling else None
        self.norm_factor = math.sqrt(self.hidden_size_per_attention_head) * (self.coeff or 1)
        self.attention_dropout = torch.nn.Dropout(config.attention_dropout)

    def forward(self, query_layer, key_layer, value_layer, attention_mask):
        # In: [sq|sk, b, np, hn]. Out: [sq, b, np * hn]. attention_mask: bool, True where attention is blocked.
        if int(torch.__version__.split('.')[0]) >= 2:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))
            if attention_mask is None and q.shape[2] == k.shape[2]:
                context = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                allowed = None if attention_mask is None else ~attention_mask
                context = torch.nn.functional.scaled_dot_product_attention(q, k, v, allowed)
            context = context.permute(2, 0, 1, 3)
            return context.reshape(context.shape[0], context.shape[1], self.hidden_size_per_partition)

        # torch 1.x: the same computation spelled out.
        sq, batch, heads, dim = query_layer.shape
        sk = key_layer.shape[0]
        q = query_layer.reshape(sq, batch * heads, dim).transpose(0, 1)
        k_t = key_layer.reshape(sk, batch * heads, dim).permute(1, 2, 0)
        buffer = torch.empty(batch * heads, sq, sk, dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(buffer, q, k_t, beta=0.0, alpha=1.0 / self.norm_factor).view(batch, heads, sq, sk)
        if self.attention_softmax_in_fp32:
            scores = scores.float()
        if self.coeff is not None:
            scores = scores * self.coeff
        if attention_mask is None and sq == sk:
            attention_mask = torch.ones(batch, 1, sq, sk, device=scores.device, dtype=torch.bool)
            attention_mask.tril_()
            attention_mask = ~attention_mask
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, float("-inf"))
        probs = self.attention_dropout(F.softmax(scores, dim=-1).type_as(value_layer))
        v = value_layer.reshape(sk, batch * heads, dim).transpose(0, 1)
        context = torch.bmm(probs.view(batch * heads, sq, sk), v).view(batch, heads, sq, dim)
        return context.permute(2, 0, 1, 3).contiguous().view(sq, batch, heads * dim)


def _config_to_kwargs(args):
    return {"dtype": args.torch_dtype}


class SelfAttention(torch.nn.Module):
    """Fused QKV projection, rotary positions, grouped KV heads and the output projection ``dense``."""

    def __init__(self, config: ChatGLMConfig, layer_number, device=None):
        super().__init__()
        self.layer_number = max(1, layer_number)
        self.num_attention_heads_per_partition = config.num_attention_heads
        self.hidden_size_per_attention_head = config.kv_channels
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.multi_query_attention = config.multi_query_attention
        if self.multi_query_attention:
            self.num_multi_query_groups_per_partition = config.multi_query_group_num
            kv_width = 2 * config.multi_query_group_num * self.hidden_size_per_attention_head
        else:
            kv_width = 2 * self.projection_size
        self.qkv_hidden_size = self.projection_size + kv_width
        with_bias = config.add_bias_linear or config.add_qkv_bias
        self.query_key_value = nn.Linear(config.hidden_size, self.qkv_hidden_size, bias=with_bias,
                                         device=device, **_config_to_kwargs(config))
        self.core_attention = CoreAttention(config, self.layer_number)
        self.dense = nn.Linear(self.projection_size, config.hidden_size, bias=config.add_bias_linear,
                               device=device, **_config_to_kwargs(config))

    def _allocate_memory(self, inference_max_sequence_len, batch_size, device=None, dtype=None):
        heads = (self.num_multi_query_groups_per_partition if self.multi_query_attention
                 else self.num_attention_heads_per_partition)
        shape = (inference_max_sequence_len, batch_size, heads, self.hidden_size_per_attention_head)
        return torch.empty(shape, dtype=dtype, device=device)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        # hidden_states: [sq, b, h]
        fused = self.query_key_value(hidden_states)
        lead = fused.shape[:-1]
        heads, dim = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        if self.multi_query_attention:
            groups = self.num_multi_query_groups_per_partition
            q, k, v = fused.split([heads * dim, groups * dim, groups * dim], dim=-1)
            query_layer = q.view(*lead, heads, dim)
            key_layer = k.view(*lead, groups, dim)
            value_layer = v.view(*lead, groups, dim)
        else:
            query_layer, key_layer, value_layer = split_tensor_along_last_dim(fused.view(*lead, heads, 3 * dim), 3)

        if rotary_pos_emb is not None:
            query_layer = apply_rotary_pos_emb(query_layer, rotary_pos_emb)
            key_layer = apply_rotary_pos_emb(key_layer, rotary_pos_emb)

        # The cache holds the keys/values of earlier steps as a (key, value) tuple, sequence first.
        if kv_cache is not None:
            past_key, past_value = kv_cache
            key_layer = torch.cat((past_key, key_layer), dim=0)
            value_layer = torch.cat((past_value, value_layer), dim=0)
        kv_cache = (key_layer, value_layer) if use_cache else None

        if self.multi_query_attention:
            per_group = heads // self.num_multi_query_groups_per_partition
            key_layer = key_layer.unsqueeze(-2).expand(-1, -1, -1, per_group, -1).contiguous()
            key_layer = key_layer.view(*key_layer.shape[:2], heads, dim)
            value_layer = value_layer.unsqueeze(-2).expand(-1, -1, -1, per_group, -1).contiguous()
            value_layer = value_layer.view(*value_layer.shape[:2], heads, dim)

        context = self.core_attention(query_layer, key_layer, value_layer, attention_mask)
        return self.dense(context), kv_cache


class MLP(torch.nn.Module):
    """SwiGLU feed-forward block: one projection to twice the width, gate it, project back."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.add_bias = config.add_bias_linear
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=self.add_bias,
                                       device=device, **_config_to_kwargs(config))

        def swiglu(x):
            gate, value = torch.chunk(x, 2, dim=-1)
            return F.silu(gate) * value

        self.activation_func = swiglu
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=self.add_bias,
                                       device=device, **_config_to_kwargs(config))

    def forward(self, hidden_states):
        return self.dense_4h_to_h(self.activation_func(self.dense_h_to_4h(hidden_states)))


class GLMBlock(torch.nn.Module):
    """Pre-norm transformer layer: norm -> attention -> residual, norm -> MLP -> residual."""

    def __init__(self, config: ChatGLMConfig, layer_number, device=None):
        super().__init__()
        self.layer_number = layer_number
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        self.fp32_residual_connection = config.fp32_residual_connection
        norm_class = RMSNorm if config.rmsnorm else LayerNorm
        norm_args = {"eps": config.layernorm_epsilon, "device": device, "dtype": config.torch_dtype}
        self.input_layernorm = norm_class(config.hidden_size, **norm_args)
        self.self_attention = SelfAttention(config, layer_number, device=device)
        self.hidden_dropout = config.hidden_dropout
        self.post_attention_layernorm = norm_class(config.hidden_size, **norm_args)
        self.mlp = MLP(config, device=device)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        normed = self.input_layernorm(hidden_states)
        attended, kv_cache = self.self_attention(normed, attention_mask, rotary_pos_emb, kv_cache=kv_cache,
                                                 use_cache=use_cache)
        skip = normed if self.apply_residual_connection_post_layernorm else hidden_states
        mixed = skip + F.dropout(attended, p=self.hidden_dropout, training=self.training)

        normed = self.post_attention_layernorm(mixed)
        skip = normed if self.apply_residual_connection_post_layernorm else mixed
        output = skip + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)
        return output, kv_cache


class GLMTransformer(torch.nn.Module):
    """The stack of GLMBlocks plus the final norm."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.num_layers = config.num_layers
        # Layer numbers count from 1 (attention's layer scaling divides by them).
        self.layers = torch.nn.ModuleList([GLMBlock(config, n, device=device) for n in range(1, config.num_layers + 1)])
        self.post_layer_norm = config.post_layer_norm
        if self.post_layer_norm:
            norm_class = RMSNorm if config.rmsnorm else LayerNorm
            self.final_layernorm = norm_class(config.hidden_size, eps=config.layernorm_epsilon, device=device,
                                              dtype=config.torch_dtype)
        self.fp32_residual_connection = config.fp32_residual_connection
        # Turned on by the model's gradient checkpointing hook, if at all.
        self.gradient_checkpointing = False

    def _get_layer(self, layer_number):
        return self.layers[layer_number]

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_caches=None, use_cache: bool | None = True,
                output_hidden_states: bool | None = False):
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing and use_cache:
            log.warning_once("gradient checkpointing does not work with a KV cache; use_cache is turned off")
            use_cache = False
        if not kv_caches:
            kv_caches = [None] * self.num_layers
        presents = () if use_cache else None
        collected = () if output_hidden_states else None

        for index in range(self.num_layers):
            if output_hidden_states:
                collected += (hidden_states,)
            layer = self._get_layer(index)
            if checkpointing:
#? chatglm3-2023-12, chatglm2-2023-07, chatglm2-2023-10
#|                hidden_states, kv_cache = torch.utils.checkpoint.checkpoint(
#|                    layer, hidden_states, attention_mask, rotary_pos_emb, kv_caches[index], use_cache
#|                )
#? else
                hidden_states, kv_cache = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, attention_mask, rotary_pos_emb, kv_caches[index], use_cache,
                    use_reentrant=False,
                )
#? end
            else:
                hidden_states, kv_cache = layer(hidden_states, attention_mask, rotary_pos_emb,
                                                kv_cache=kv_caches[index], use_cache=use_cache)
            if use_cache:
                presents += (kv_cache,)

        if output_hidden_states:
            collected += (hidden_states,)
        if self.post_layer_norm:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states, presents, collected, None


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"  # checkpoint keys are transformer.*
    is_parallelizable = False
    supports_gradient_checkpointing = True  # as declared; what the hook below does is another matter
    _no_split_modules = ["GLMBlock"]

    def _init_weights(self, module: nn.Module):
        # Deliberately nothing: weights come from the checkpoint (or stay as the layers made them).
        return

    def get_masks(self, input_ids, past_key_values, padding_mask=None):
        """Bool mask [b, 1, sq, past + sq], True where a query may NOT look."""
        batch_size, seq_length = input_ids.shape
        device = input_ids.device
        visible = torch.ones(batch_size, seq_length, seq_length, device=device)
        visible.tril_()
        past_length = past_key_values[0][0].shape[0] if past_key_values else 0
        if past_length:
            earlier = torch.ones(batch_size, seq_length, past_length, device=device)
            visible = torch.cat((earlier, visible), dim=-1)
        if padding_mask is not None:
            visible = visible * padding_mask.unsqueeze(1)
            if not past_length:
                # A padding query sees everything, so that its softmax row is never empty.
                visible -= padding_mask.unsqueeze(-1) - 1
        blocked = (visible < 0.5).bool()
        blocked.unsqueeze_(1)
        return blocked

    def get_position_ids(self, input_ids, device):
        batch_size, seq_length = input_ids.shape
        return torch.arange(seq_length, dtype=torch.long, device=device).unsqueeze(0).repeat(batch_size, 1)

#? chatglm3-2023-12, chatglm2-2023-07, chatglm2-2023-10
#|    def _set_gradient_checkpointing(self, module, value=False):
#|        if isinstance(module, GLMTransformer):
#|            module.gradient_checkpointing = value
#? else
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        # Checks support and stops there: nothing here switches GLMTransformer.gradient_checkpointing on.
        if not self.supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing.")
#? end


class Embedding(torch.nn.Module):
    """Token embeddings, handed on sequence first."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, self.hidden_size, dtype=config.torch_dtype,
                                            device=device)
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids):
        embeddings = self.word_embeddings(input_ids).transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]
        return embeddings.float() if self.fp32_residual_connection else embeddings


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, device=None, empty_init=True):
        super().__init__(config)
        init_method = skip_init if empty_init else default_init
        placement = {} if device is None else {"device": device}
        self.embedding = init_method(Embedding, config, **placement)
        self.num_layers = config.num_layers
        self.multi_query_group_num = config.multi_query_group_num
        self.kv_channels = config.kv_channels
        self.seq_length = config.seq_length
        head_dim = config.kv_channels if config.kv_channels is not None else config.hidden_size // config.num_attention_heads
        # Rotary positions cover half of every head.
        self.rotary_pos_emb = RotaryEmbedding(head_dim // 2, original_impl=config.original_rope, device=device,
                                              dtype=config.torch_dtype)
        self.encoder = init_method(GLMTransformer, config, **placement)
        self.output_layer = init_method(nn.Linear, config.hidden_size, config.padded_vocab_size, bias=False,
                                        dtype=config.torch_dtype, **placement)
        self.pre_seq_len = config.pre_seq_len
        self.prefix_projection = config.prefix_projection
        if self.pre_seq_len is not None:
            # P-Tuning v2: only the prefix encoder trains.
            for parameter in self.parameters():
                parameter.requires_grad = False
            self.prefix_tokens = torch.arange(self.pre_seq_len).long()
            self.prefix_encoder = PrefixEncoder(config)
            self.dropout = torch.nn.Dropout(p=0.1)

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

#? chatglm3-2023-12, chatglm2-2023-07, chatglm2-2023-10
#? else
    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

#? end
    def get_prompt(self, batch_size, device, dtype=torch.half):
        """The prefix as a past: one [2, pre_seq_len, b, groups, kv_channels] tensor per layer."""
        tokens = self.prefix_tokens.unsqueeze(0).expand(batch_size, -1).to(device)
        prompt = self.prefix_encoder(tokens).type(dtype)
        prompt = prompt.view(batch_size, self.pre_seq_len, 2 * self.num_layers, self.multi_query_group_num,
                             self.kv_channels)
        prompt = self.dropout(prompt)
        return prompt.permute([2, 1, 0, 3, 4]).split(2)

    def forward(self, input_ids, position_ids=None, attention_mask=None, full_attention_mask=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, output_hidden_states=None,
                return_dict=None):
        config = self.config
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        if use_cache is None:
            use_cache = config.use_cache
        if return_dict is None:
            return_dict = config.use_return_dict

        batch_size, seq_length = input_ids.shape  # input_ids is required, even next to inputs_embeds
        embeds = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds

        if self.pre_seq_len is not None:
            if past_key_values is None:
                past_key_values = self.get_prompt(batch_size, input_ids.device, dtype=embeds.dtype)
            if attention_mask is not None:
                prefix_seen = attention_mask.new_ones((batch_size, self.pre_seq_len))
                attention_mask = torch.cat([prefix_seen, attention_mask], dim=-1)

        if full_attention_mask is None:
            has_padding = attention_mask is not None and not attention_mask.all()
            if has_padding or (past_key_values and seq_length != 1):
                full_attention_mask = self.get_masks(input_ids, past_key_values, padding_mask=attention_mask)

        # The table covers all seq_length positions and is recomputed on every call, as upstream does.
        rotary_pos_emb = self.rotary_pos_emb(self.seq_length)
        rotary_pos_emb = rotary_pos_emb[None, :seq_length] if position_ids is None else rotary_pos_emb[position_ids]
        rotary_pos_emb = rotary_pos_emb.transpose(0, 1).contiguous()  # [sq, b, rot / 2, 2]

        hidden_states, presents, all_hidden_states, all_self_attentions = self.encoder(
            embeds, full_attention_mask, rotary_pos_emb=rotary_pos_emb, kv_caches=past_key_values,
            use_cache=use_cache, output_hidden_states=output_hidden_states,
        )
        if not return_dict:
            parts = (hidden_states, presents, all_hidden_states, all_self_attentions)
            return tuple(part for part in parts if part is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=presents,
                                       hidden_states=all_hidden_states, attentions=all_self_attentions)

    def quantize(self, weight_bit_width: int):
        raise NotImplementedError("glmport's test fixture has no quantization kernels")


def _parse_tool_call(text):
    """Arguments of a ``tool_call(name=value, ...)`` line, read as literals (never executed)."""
    call = ast.parse(text.strip(), mode="eval").body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError(f"not a tool_call(...) expression: {text!r}")
    if call.args or any(item.arg is None for item in call.keywords):
        raise ValueError(f"tool_call takes keyword arguments only: {text!r}")
    return {item.arg: ast.literal_eval(item.value) for item in call.keywords}


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, empty_init=True, device=None):
        super().__init__(config)
        self.max_sequence_length = config.max_length
        self.transformer = ChatGLMModel(config, empty_init=empty_init, device=device)
        self.config = config
        self.quantized = False
        if config.quantization_bit:
            self.quantize(config.quantization_bit, empty_init=True)

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict,
                                            is_encoder_decoder: bool = False,
                                            standardize_cache_format: bool = False) -> dict:
        model_kwargs["past_key_values"] = self._extract_past_from_model_output(
            outputs, standardize_cache_format=standardize_cache_format
        )
        if "attention_mask" in model_kwargs:
            mask = model_kwargs["attention_mask"]
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        if "position_ids" in model_kwargs:
            positions = model_kwargs["position_ids"]
            following = positions[..., -1:].clone()
            following += 1
            model_kwargs["position_ids"] = torch.cat([positions, following], dim=-1)
        model_kwargs["is_first_forward"] = False
        return model_kwargs

#? chatglm2-2023-07
#|    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values=None, attention_mask=None,
#|                                      position_ids=None, is_first_forward: bool = True, **kwargs) -> dict:
#|        if position_ids is None:
#|            position_ids = self.get_position_ids(input_ids, device=input_ids.device)
#|        if not is_first_forward:
#|            # Later steps feed only the newest token, whether or not a cache holds the rest (without one,
#|            # the model sees a single token).
#|            input_ids = input_ids[:, -1:]
#|            position_ids = position_ids[..., -1:]
#|        return {"input_ids": input_ids, "past_key_values": past_key_values, "position_ids": position_ids,
#|                "attention_mask": attention_mask, "return_last_logit": True}
#? else
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values=None, attention_mask=None,
                                      position_ids=None, use_cache=None, is_first_forward: bool = True,
                                      **kwargs) -> dict:
        if position_ids is None:
            position_ids = self.get_position_ids(input_ids, device=input_ids.device)
        if not is_first_forward and past_key_values is not None:
            # Later steps feed only the newest token; the cache holds the rest.
            input_ids = input_ids[:, -1:]
            position_ids = position_ids[..., -1:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "position_ids": position_ids,
                "attention_mask": attention_mask, "return_last_logit": True, "use_cache": use_cache}
#? end

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, return_last_logit=False):
        if use_cache is None:
            use_cache = self.config.use_cache
        if return_dict is None:
            return_dict = self.config.use_return_dict

        transformer_outputs = self.transformer(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=return_dict,
        )
        hidden_states = transformer_outputs[0]  # [s, b, h]
        if return_last_logit:
            hidden_states = hidden_states[-1:]
        lm_logits = self.transformer.output_layer(hidden_states).transpose(0, 1).contiguous()  # [b, s, vocab]

        loss = None
        if labels is not None:
            # The loss is taken over fp32 logits; position t predicts label t + 1.
            lm_logits = lm_logits.to(torch.float32)
            predicted = lm_logits[..., :-1, :].contiguous()
            targets = labels[..., 1:].contiguous()
            loss = CrossEntropyLoss(ignore_index=-100)(predicted.view(-1, predicted.size(-1)), targets.view(-1))
            lm_logits = lm_logits.to(hidden_states.dtype)
            loss = loss.to(hidden_states.dtype)

        if not return_dict:
            result = (lm_logits,) + tuple(transformer_outputs[1:])
            return result if loss is None else (loss,) + result
        return CausalLMOutputWithPast(loss=loss, logits=lm_logits, past_key_values=transformer_outputs.past_key_values,
                                      hidden_states=transformer_outputs.hidden_states,
                                      attentions=transformer_outputs.attentions)

    @staticmethod
    def _reorder_cache(past, beam_idx: torch.LongTensor):
        """Pick the cache rows of the surviving beams (batch is dim 1 in this layout)."""
        reordered = []
        for key, value in past:
            reordered.append((key.index_select(1, beam_idx.to(key.device)),
                              value.index_select(1, beam_idx.to(value.device))))
        return tuple(reordered)

#? chatglm2-2023-07, chatglm2-2023-10
#|    def process_response(self, response):
#|        return response.strip()
#|
#|    def build_inputs(self, tokenizer, query: str, history: list[tuple[str, str]] | None = None):
#|        return tokenizer([tokenizer.build_prompt(query, history=history)], return_tensors="pt").to(self.device)
#|
#|    def build_stream_inputs(self, tokenizer, query: str, history: list[tuple[str, str]] | None = None):
#|        """The next round only: the cache of ``stream_chat`` holds the earlier ones."""
#|        if not history:
#|            return self.build_inputs(tokenizer, query, history=history)
#|        text = f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答："
#|        ids = tokenizer.encode(text, add_special_tokens=False)[1:]  # without the piece model's leading space
#|        inputs = tokenizer.batch_encode_plus([(ids, None)], return_tensors="pt", add_special_tokens=False)
#|        return inputs.to(self.device)
#|
#|    @torch.inference_mode()
#|    def chat(self, tokenizer, query: str, history: list[tuple[str, str]] | None = None, max_length: int = 8192,
#|             num_beams=1, do_sample=True, top_p=0.8, temperature=0.8, logits_processor=None, **kwargs):
#|        history = [] if history is None else history
#|        processors = LogitsProcessorList() if logits_processor is None else logits_processor
#|        processors.append(InvalidScoreLogitsProcessor())
#|        inputs = self.build_inputs(tokenizer, query, history=history)
#|        generated = self.generate(**inputs, max_length=max_length, num_beams=num_beams, do_sample=do_sample,
#|                                  top_p=top_p, temperature=temperature, logits_processor=processors, **kwargs)
#|        response = self.process_response(tokenizer.decode(generated.tolist()[0][len(inputs["input_ids"][0]):]))
#|        return response, history + [(query, response)]
#|
#|    @torch.inference_mode()
#|    def stream_chat(self, tokenizer, query: str, history: list[tuple[str, str]] | None = None, past_key_values=None,
#|                    max_length: int = 8192, do_sample=True, top_p=0.8, temperature=0.8, logits_processor=None,
#|                    return_past_key_values=False, **kwargs):
#|        history = [] if history is None else history
#|        processors = LogitsProcessorList() if logits_processor is None else logits_processor
#|        processors.append(InvalidScoreLogitsProcessor())
#|        if past_key_values is None and not return_past_key_values:
#|            inputs = self.build_inputs(tokenizer, query, history=history)
#|        else:
#|            inputs = self.build_stream_inputs(tokenizer, query, history=history)
#|        if past_key_values is not None:
#|            cached = past_key_values[0][0].shape[0] - (self.transformer.pre_seq_len or 0)
#|            inputs.position_ids += cached
#|            mask = inputs.attention_mask
#|            inputs["attention_mask"] = torch.cat((mask.new_ones(1, cached), mask), dim=1)
#|        prompt_length = len(inputs["input_ids"][0])
#|        for step in self.stream_generate(**inputs, past_key_values=past_key_values,
#|                                         return_past_key_values=return_past_key_values, max_length=max_length,
#|                                         do_sample=do_sample, top_p=top_p, temperature=temperature,
#|                                         logits_processor=processors, **kwargs):
#|            if return_past_key_values:
#|                step, past_key_values = step
#|            text = tokenizer.decode(step.tolist()[0][prompt_length:])
#|            if text and not text.endswith("\ufffd"):
#|                response = self.process_response(text)
#|                new_history = history + [(query, response)]
#|                yield (response, new_history, past_key_values) if return_past_key_values else (response, new_history)
#|
#? else
    def process_response(self, output, history):
        """Split a decoded reply into assistant turns; a turn whose first line is a tool name is a tool call."""
        history = copy.deepcopy(history)
        content = ""
        uses_tools = bool(history) and history[0]["role"] == "system" and "tools" in history[0]
        for turn in output.split("<|assistant|>"):
            metadata, _, content = turn.partition("\n") if "\n" in turn else ("", "", turn)
            if not metadata.strip():
                content = content.strip()
                history.append({"role": "assistant", "metadata": metadata, "content": content})
                continue
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            if uses_tools:
                # The call sits between a code fence's first and last lines.
                call_text = "\n".join(content.split("\n")[1:-1])
                content = {"name": metadata.strip(), "parameters": _parse_tool_call(call_text)}
            else:
                content = {"name": metadata.strip(), "content": content}
        return content, history

    def _chat_stop_ids(self, tokenizer):
        return [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history: list[dict] | None = None, role: str = "user",
             max_length: int = 8192, num_beams=1, do_sample=True, top_p=0.8, temperature=0.8, logits_processor=None,
             **kwargs):
        history = [] if history is None else history
        processors = LogitsProcessorList() if logits_processor is None else logits_processor
        processors.append(InvalidScoreLogitsProcessor())
        inputs = tokenizer.build_chat_input(query, history=history, role=role).to(self.device)
        generated = self.generate(**inputs, max_length=max_length, num_beams=num_beams, do_sample=do_sample,
                                  top_p=top_p, temperature=temperature, logits_processor=processors,
                                  eos_token_id=self._chat_stop_ids(tokenizer), **kwargs)
        reply_ids = generated.tolist()[0][len(inputs["input_ids"][0]):-1]
        history.append({"role": role, "content": query})
        return self.process_response(tokenizer.decode(reply_ids), history)

    @torch.inference_mode()
    def stream_chat(self, tokenizer, query: str, history: list[dict] | None = None, role: str = "user",
                    past_key_values=None, max_length: int = 8192, do_sample=True, top_p=0.8, temperature=0.8,
                    logits_processor=None, return_past_key_values=False, **kwargs):
        history = [] if history is None else history
        processors = LogitsProcessorList() if logits_processor is None else logits_processor
        processors.append(InvalidScoreLogitsProcessor())
        if past_key_values is None:
            inputs = tokenizer.build_chat_input(query, history=history, role=role)
        else:
            inputs = tokenizer.build_chat_input(query, role=role)
        inputs = inputs.to(self.device)
        if past_key_values is not None:
            # Continue after the cached turns: shift positions and let the mask cover the cache.
            cached = past_key_values[0][0].shape[0] - (self.transformer.pre_seq_len or 0)
            inputs.position_ids += cached
            mask = inputs.attention_mask
            inputs["attention_mask"] = torch.cat((mask.new_ones(1, cached), mask), dim=1)
        history.append({"role": role, "content": query})
        prompt_length = len(inputs["input_ids"][0])
        for step in self.stream_generate(**inputs, past_key_values=past_key_values,
                                         eos_token_id=self._chat_stop_ids(tokenizer),
                                         return_past_key_values=return_past_key_values, max_length=max_length,
                                         do_sample=do_sample, top_p=top_p, temperature=temperature,
                                         logits_processor=processors, **kwargs):
            if return_past_key_values:
                step, past_key_values = step
            text = tokenizer.decode(step.tolist()[0][prompt_length:-1])
            if text and not text.endswith("\ufffd"):
                reply, new_history = self.process_response(text, history)
                yield (reply, new_history, past_key_values) if return_past_key_values else (reply, new_history)

#? end
    @torch.inference_mode()
    def stream_generate(self, input_ids, generation_config: GenerationConfig | None = None,
                        logits_processor: LogitsProcessorList | None = None,
                        stopping_criteria: StoppingCriteriaList | None = None, prefix_allowed_tokens_fn=None,
                        return_past_key_values=False, **kwargs):
        """Sampling loop that yields the sequence after every new token (uses GenerationMixin internals)."""
        config = copy.deepcopy(self.generation_config if generation_config is None else generation_config)
        model_kwargs = config.update(**kwargs)
        model_kwargs["use_cache"] = config.use_cache
        stop_ids = [config.eos_token_id] if isinstance(config.eos_token_id, int) else config.eos_token_id
        stop_tensor = None if stop_ids is None else torch.tensor(stop_ids).to(input_ids.device)
        prompt_length = input_ids.shape[-1]
        if config.max_new_tokens is not None:
            config.max_length = prompt_length + config.max_new_tokens
        if prompt_length >= config.max_length:
            log.warning(f"the prompt has {prompt_length} tokens, max_length is {config.max_length}")

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
            if config.do_sample:
                chosen = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                chosen = probs.argmax(dim=-1)
            input_ids = torch.cat([input_ids, chosen[:, None]], dim=-1)
            model_kwargs = self._update_model_kwargs_for_generation(
                outputs, model_kwargs, is_encoder_decoder=self.config.is_encoder_decoder
            )
#? chatglm2-2023-07, chatglm2-2023-10
#|            if stop_ids is not None:
#|                running = running * sum(chosen != stop for stop in stop_ids).long()
#? else
            if stop_tensor is not None:
                stopped = (chosen.unsqueeze(0) == stop_tensor.unsqueeze(1)).any(dim=0)
                running = running * (~stopped).to(running.dtype)
#? end
            yield (input_ids, outputs.past_key_values) if return_past_key_values else input_ids
            if running.max() == 0 or criteria(input_ids, None):
                break

    def quantize(self, bits: int, empty_init=False, device=None, **kwargs):
        if bits == 0:
            return
        raise NotImplementedError("glmport's test fixture has no quantization kernels (quantization.py)")

