"""GLM-4 model code for glmport's tiny test models.

Written from scratch for glmport's test suite; no line of it comes from the GLM-4-9B-chat download. It
keeps the public face of the ``modeling_chatglm.py`` that GLM-4-9B-chat ships as remote code (class and
method names, signatures, attribute names, parameter names, the batch-first ``[batch, heads, seq,
head_dim]`` attention layout) together with the constructs glmport's patch sets have to deal with:
TorchScript fuser flags set at import, a scripted rotary function, ``skip_init``, eager / SDPA / flash
attention classes picked through ``config._attn_implementation``, fp32 masks and logits, a legacy KV
cache (one stacked tensor after the prompt, tuples afterwards) and generation hooks that predate
transformers 5. Those are reproduced on purpose, including where they break on current transformers.
"""

import copy
import json
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
from transformers.utils import is_torch_npu_available, logging

from .configuration_chatglm import ChatGLMConfig

# flash-attn is optional: without it, only the "flash_attention_2" implementation is unusable.
try:
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_greater_or_equal_2_10

    if is_flash_attn_2_available():
        from flash_attn import flash_attn_func, flash_attn_varlen_func
        from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input
except Exception:
    _FLASH_ATTN_IMPORT_FAILED = True

# As in the original, importing the module reconfigures TorchScript for the whole process.
if sys.platform != 'darwin' and not is_torch_npu_available():
    torch._C._jit_set_profiling_mode(False)
    torch._C._jit_set_profiling_executor(False)
    torch._C._jit_override_can_fuse_on_cpu(True)
    torch._C._jit_override_can_fuse_on_gpu(True)

log = logging.get_logger(__name__)

# Token id forced when the scores turn NaN/inf (upstream's choice for GLM-4).
_FALLBACK_TOKEN = 198


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


def split_tensor_along_last_dim(tensor: torch.Tensor, num_partitions: int,
                                contiguous_split_chunks: bool = False) -> list[torch.Tensor]:
    """Cut the last dimension into ``num_partitions`` equal pieces."""
    pieces = tensor.split(tensor.shape[-1] // num_partitions, dim=-1)
    return tuple(p.contiguous() for p in pieces) if contiguous_split_chunks else pieces


class RotaryEmbedding(nn.Module):
    """Cos/sin table for rotary positions (base 10000 * rope_ratio); rebuilt in full on each call."""

    def __init__(self, dim, rope_ratio=1, original_impl=False, device=None, dtype=None):
        super().__init__()
        exponent = torch.arange(0, dim, 2, device=device).to(dtype=dtype) / dim
        self.register_buffer("inv_freq", 1.0 / (10000 ** exponent))
        self.dim = dim
        self.original_impl = original_impl
        self.rope_ratio = rope_ratio

    def forward_impl(self, seq_len: int, n_elem: int, dtype: torch.dtype, device: torch.device, base: int = 10000):
        base = base * self.rope_ratio
        # fp32 angles, stored afterwards in the model's half precision type if it has one.
        freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float, device=device) / n_elem))
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float, device=device), freqs).float()
        table = torch.stack((angles.cos(), angles.sin()), dim=-1)  # [seq_len, n_elem // 2, 2]
        if dtype in (torch.float16, torch.bfloat16, torch.int8):
            table = table.bfloat16() if dtype == torch.bfloat16 else table.half()
        return table

    def forward(self, max_seq_len, offset=0):
        return self.forward_impl(max_seq_len, self.dim, dtype=self.inv_freq.dtype, device=self.inv_freq.device)


@torch.jit.script
def apply_rotary_pos_emb(x: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
    # x: [b, np, sq, hn]; rope_cache: [b, sq', rot / 2, 2]. The first 2 * rope_cache.size(-2) channels
    # rotate as (even, odd) pairs, the rest pass through.
    batch, heads, seq = x.size(0), x.size(1), x.size(2)
    half = rope_cache.size(-2)
    pairs = x[..., : 2 * half].reshape(batch, heads, seq, half, 2)
    table = rope_cache[:, :seq].view(-1, 1, seq, half, 2)
    cos = table[..., 0]
    sin = table[..., 1]
    first = pairs[..., 0]
    second = pairs[..., 1]
    turned = torch.stack((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return torch.cat((turned.flatten(3), x[..., 2 * half:]), dim=-1)


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
    """Eager attention on [b, np, s, hn] tensors: explicit scores, fp32 softmax, dropout."""

    def __init__(self, config: ChatGLMConfig, layer_number):
        super().__init__()
        self.config = config
        self.apply_query_key_layer_scaling = config.apply_query_key_layer_scaling
        # Layer scaling divides the scores by the layer number first, which only fp32 softmax tolerates.
        self.attention_softmax_in_fp32 = config.attention_softmax_in_fp32 or self.apply_query_key_layer_scaling
        self.layer_number = max(1, layer_number)
        self.is_causal = True
        self.num_attention_heads_per_partition = config.num_attention_heads
        self.hidden_size_per_attention_head = config.kv_channels
        self.hidden_size_per_partition = config.kv_channels * config.num_attention_heads
        self.coeff = self.layer_number if self.apply_query_key_layer_scaling else None
        self.norm_factor = math.sqrt(self.hidden_size_per_attention_head) * (self.coeff or 1)
        self.attention_dropout = torch.nn.Dropout(config.attention_dropout)

    def _merge_heads(self, context):
        # [b, np, sq, hn] -> [b, sq, np * hn]
        context = context.transpose(1, 2).contiguous()
        return context.reshape(context.shape[0], context.shape[1], self.hidden_size_per_partition)

    def forward(self, query_layer, key_layer, value_layer, attention_mask):
        # attention_mask: bool [b, 1, sq, sk], True where attention is blocked (or None).
        batch, heads, sq, dim = query_layer.shape
        sk = key_layer.shape[2]
        q = query_layer.reshape(batch * heads, sq, dim)
        k_t = key_layer.reshape(batch * heads, sk, dim).transpose(1, 2)
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
        v = value_layer.reshape(batch * heads, sk, dim)
        context = torch.bmm(probs.view(batch * heads, sq, sk), v).view(batch, heads, sq, dim)
        return self._merge_heads(context)


class SdpaAttention(CoreAttention):
    """The same attention through ``torch.nn.functional.scaled_dot_product_attention``."""

    def forward(self, query_layer, key_layer, value_layer, attention_mask):
        dropout = self.config.attention_dropout if self.training else 0.0
        if attention_mask is None and query_layer.shape[2] == key_layer.shape[2]:
            context = torch.nn.functional.scaled_dot_product_attention(
                query_layer, key_layer, value_layer, is_causal=True, dropout_p=dropout
            )
        else:
            allowed = None if attention_mask is None else ~attention_mask
            context = torch.nn.functional.scaled_dot_product_attention(
                query_layer, key_layer, value_layer, allowed, dropout_p=dropout
            )
        return self._merge_heads(context)


def _get_unpad_data(attention_mask):
    """Positions of the real tokens, int32 cumulative lengths and the longest length of a [b, s] mask."""
    lengths = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(lengths.max().item())


class FlashAttention2(CoreAttention):
    """flash-attn kernels (CUDA only). attention_mask here is the 2-D padding mask, or None."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._flash_attn_uses_top_left_mask = not is_flash_attn_greater_or_equal_2_10()

    def forward(self, query_states, key_states, value_states, attention_mask):
        # flash-attn wants [b, s, heads, hn]
        q, k, v = (t.transpose(1, 2) for t in (query_states, key_states, value_states))
        batch, q_len = q.shape[:2]
        causal = self.is_causal and (q_len != 1 or not self._flash_attn_uses_top_left_mask)
        dropout = self.config.attention_dropout if self.training else 0.0
        if attention_mask is None:
            out = flash_attn_func(q, k, v, dropout, softmax_scale=None, causal=causal)
        else:
            q, k, v, q_index, (cu_q, cu_k), (max_q, max_k) = self._upad_input(q, k, v, attention_mask, q_len)
            packed = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                            max_seqlen_k=max_k, dropout_p=dropout, softmax_scale=None,
                                            causal=causal)
            out = pad_input(packed, q_index, batch, q_len)
        return out.reshape(batch, q_len, self.hidden_size_per_partition).contiguous()

    def _upad_input(self, query_layer, key_layer, value_layer, attention_mask, query_length):
        k_index, cu_k, max_k = _get_unpad_data(attention_mask)
        batch, k_len, kv_heads, dim = key_layer.shape
        key_layer = index_first_axis(key_layer.reshape(batch * k_len, kv_heads, dim), k_index)
        value_layer = index_first_axis(value_layer.reshape(batch * k_len, kv_heads, dim), k_index)
        if query_length == k_len:
            heads = self.num_attention_heads_per_partition
            query_layer = index_first_axis(query_layer.reshape(batch * k_len, heads, dim), k_index)
            q_index, cu_q, max_q = k_index, cu_k, max_k
        elif query_length == 1:
            cu_q = torch.arange(batch + 1, dtype=torch.int32, device=query_layer.device)
            q_index, max_q = cu_q[:-1], 1
            query_layer = query_layer.squeeze(1)
        else:
            # left padding assumed: the queries are the last query_length positions
            query_layer, q_index, cu_q, max_q = unpad_input(query_layer, attention_mask[:, -query_length:])[:4]
        return query_layer, key_layer, value_layer, q_index, (cu_q, cu_k), (max_q, max_k)


CORE_ATTENTION_CLASSES = {"eager": CoreAttention, "sdpa": SdpaAttention, "flash_attention_2": FlashAttention2}


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
        self.core_attention = CORE_ATTENTION_CLASSES[config._attn_implementation](config, self.layer_number)
        self.dense = nn.Linear(self.projection_size, config.hidden_size, bias=config.add_bias_linear,
                               device=device, **_config_to_kwargs(config))

    def _allocate_memory(self, inference_max_sequence_len, batch_size, device=None, dtype=None):
        heads = (self.num_multi_query_groups_per_partition if self.multi_query_attention
                 else self.num_attention_heads_per_partition)
        shape = (inference_max_sequence_len, batch_size, heads, self.hidden_size_per_attention_head)
        return torch.empty(shape, dtype=dtype, device=device)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        # hidden_states: [b, sq, h]
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
        # [b, sq, heads, hn] -> [b, heads, sq, hn]
        query_layer, key_layer, value_layer = (t.transpose(1, 2) for t in (query_layer, key_layer, value_layer))

        if rotary_pos_emb is not None:
            query_layer = apply_rotary_pos_emb(query_layer, rotary_pos_emb)
            key_layer = apply_rotary_pos_emb(key_layer, rotary_pos_emb)

        if kv_cache is not None:
            past_key, past_value = kv_cache
            key_layer = torch.cat((past_key, key_layer), dim=2)
            value_layer = torch.cat((past_value, value_layer), dim=2)
        if not use_cache:
            kv_cache = None
        elif kv_cache is None:
            # After the prompt: keys and values stacked into one [1, 2, b, groups, s, hn] tensor.
            kv_cache = torch.stack((key_layer, value_layer), dim=0).unsqueeze(0)
        else:
            kv_cache = (key_layer, value_layer)

        if self.multi_query_attention:
            per_group = heads // self.num_multi_query_groups_per_partition
            key_layer = key_layer.unsqueeze(2).expand(-1, -1, per_group, -1, -1).contiguous()
            key_layer = key_layer.view(key_layer.shape[0], heads, *key_layer.shape[3:])
            value_layer = value_layer.unsqueeze(2).expand(-1, -1, per_group, -1, -1).contiguous()
            value_layer = value_layer.view(value_layer.shape[0], heads, *value_layer.shape[3:])

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
        decoding = kv_caches[0] is not None
        presents = () if use_cache else None
        collected = () if output_hidden_states else None

        for index in range(self.num_layers):
            if output_hidden_states:
                collected += (hidden_states,)
            layer = self._get_layer(index)
            if checkpointing:
                hidden_states, kv_cache = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, attention_mask, rotary_pos_emb, kv_caches[index], use_cache,
                    use_reentrant=False,
                )
            else:
                hidden_states, kv_cache = layer(hidden_states, attention_mask, rotary_pos_emb,
                                                kv_cache=kv_caches[index], use_cache=use_cache)
            if not use_cache:
                continue
            if decoding:
                presents += (kv_cache,)
            elif len(presents) == 0:
                # Prompt pass: the layers' stacked caches are concatenated into one tensor.
                presents = kv_cache
            else:
                presents = torch.cat((presents, kv_cache.to(presents.device)), dim=0)

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
    _supports_flash_attn_2 = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module):
        # Deliberately nothing: weights come from the checkpoint (or stay as the layers made them).
        return

    def get_masks(self, input_ids, past_key_values, padding_mask=None):
        """Bool mask [b, 1, sq, past + sq], True where a query may NOT look (flash-attn: the 2-D mask)."""
        if self.config._attn_implementation == "flash_attention_2":
            return padding_mask if padding_mask is not None and not padding_mask.all() else None
        batch_size, seq_length = input_ids.shape
        device = input_ids.device
        visible = torch.ones(batch_size, seq_length, seq_length, device=device)
        visible.tril_()
        past_length = past_key_values[0][0].shape[2] if past_key_values else 0
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

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        # Checks support and stops there: nothing here switches GLMTransformer.gradient_checkpointing on.
        if not self.supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing.")


class Embedding(torch.nn.Module):
    """Token embeddings (batch first)."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, self.hidden_size, dtype=config.torch_dtype,
                                            device=device)
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids):
        embeddings = self.word_embeddings(input_ids)
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
        self.rotary_pos_emb = RotaryEmbedding(head_dim // 2, rope_ratio=config.rope_ratio,
                                              original_impl=config.original_rope, device=device,
                                              dtype=config.torch_dtype)
        self.encoder = init_method(GLMTransformer, config, **placement)
        self.output_layer = init_method(nn.Linear, config.hidden_size, config.padded_vocab_size, bias=False,
                                        dtype=config.torch_dtype, **placement)

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def forward(self, input_ids, position_ids=None, attention_mask=None, full_attention_mask=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        config = self.config
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        if use_cache is None:
            use_cache = config.use_cache
        if return_dict is None:
            return_dict = config.use_return_dict

        batch_size, seq_length = input_ids.shape  # input_ids is required, even next to inputs_embeds
        embeds = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds

        if full_attention_mask is None:
            has_padding = attention_mask is not None and not attention_mask.all()
            if has_padding or (past_key_values and seq_length != 1):
                full_attention_mask = self.get_masks(input_ids, past_key_values, padding_mask=attention_mask)

        # The table covers all seq_length positions and is recomputed on every call, as upstream does.
        rotary_pos_emb = self.rotary_pos_emb(self.seq_length)
        rotary_pos_emb = rotary_pos_emb[None, :seq_length] if position_ids is None else rotary_pos_emb[position_ids]

        hidden_states, presents, all_hidden_states, all_self_attentions = self.encoder(
            embeds, full_attention_mask, rotary_pos_emb=rotary_pos_emb, kv_caches=past_key_values,
            use_cache=use_cache, output_hidden_states=output_hidden_states,
        )
        if isinstance(presents, torch.Tensor):
            # [layers, 2, b, groups, s, hn] -> ((key, value), ...) per layer
            presents = tuple((layer[0], layer[1]) for layer in presents.unbind(0))

        if not return_dict:
            parts = (hidden_states, presents, all_hidden_states, all_self_attentions)
            return tuple(part for part in parts if part is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=presents,
                                       hidden_states=all_hidden_states, attentions=all_self_attentions)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, empty_init=True, device=None):
        super().__init__(config)
        self.max_sequence_length = config.max_length
        self.transformer = ChatGLMModel(config, empty_init=empty_init, device=device)
        self.config = config

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
        hidden_states = transformer_outputs[0]  # [b, s, h]
        if return_last_logit:
            hidden_states = hidden_states[:, -1:]
        lm_logits = self.transformer.output_layer(hidden_states)

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
        """Pick the cache rows of the surviving beams (batch is dim 0 in this layout)."""
        reordered = []
        for key, value in past:
            reordered.append((key.index_select(0, beam_idx.to(key.device)),
                              value.index_select(0, beam_idx.to(value.device))))
        return tuple(reordered)

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
                content = {"name": metadata.strip(), "parameters": json.loads(content)}
            else:
                content = {"name": metadata.strip(), "content": content}
        return content, history

    def _chat_stop_ids(self, tokenizer):
        return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|user|>"),
                tokenizer.convert_tokens_to_ids("<|observation|>")]

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history: list[dict] | None = None, role: str = "user",
             max_length: int = 8192, num_beams=1, do_sample=True, top_p=0.8, temperature=0.8, logits_processor=None,
             **kwargs):
        history = [] if history is None else history
        processors = LogitsProcessorList() if logits_processor is None else logits_processor
        processors.append(InvalidScoreLogitsProcessor())
        history.append({"role": role, "content": query})
        inputs = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                               return_tensors="pt", return_dict=True).to(self.device)
        generated = self.generate(**inputs, max_length=max_length, num_beams=num_beams, do_sample=do_sample,
                                  top_p=top_p, temperature=temperature, logits_processor=processors,
                                  eos_token_id=self._chat_stop_ids(tokenizer), **kwargs)
        reply_ids = generated.tolist()[0][len(inputs["input_ids"][0]):-1]
        return self.process_response(tokenizer.decode(reply_ids), history)

    @torch.inference_mode()
    def stream_chat(self, tokenizer, query: str, history: list[dict] | None = None, role: str = "user",
                    past_key_values=None, max_length: int = 8192, do_sample=True, top_p=0.8, temperature=0.8,
                    logits_processor=None, return_past_key_values=False, **kwargs):
        history = [] if history is None else history
        processors = LogitsProcessorList() if logits_processor is None else logits_processor
        processors.append(InvalidScoreLogitsProcessor())
        history.append({"role": role, "content": query})
        if past_key_values is None:
            conversation = history
        else:
            conversation = history[-1:]
        inputs = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_tensors="pt", return_dict=True).to(self.device)
        if past_key_values is not None:
            # Continue after the cached turns: shift positions and let the mask cover the cache.
            cached = past_key_values[0][0].shape[2]
            inputs.position_ids += cached
            mask = inputs.attention_mask
            inputs["attention_mask"] = torch.cat((mask.new_ones(1, cached), mask), dim=1)
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
            if stop_tensor is not None:
                stopped = (chosen.unsqueeze(0) == stop_tensor.unsqueeze(1)).any(dim=0)
                running = running * (~stopped).to(running.dtype)
            yield (input_ids, outputs.past_key_values) if return_past_key_values else input_ids
            if running.max() == 0 or criteria(input_ids, None):
                break
