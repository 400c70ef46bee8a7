"""ChatGLM3 (and ChatGLM2) configuration for glmport's tiny test models.

Written from scratch for glmport. It has the constructor and the attributes of the configuration class
that ChatGLM3-6B ships as remote code (ChatGLM2-6B's since its Sep-2023 revision; the Jul-2023 one has no
``classifier_dropout``), so that code written against that class (and glmport's patches for it) sees the
same object. Like the original, it keeps no generation settings of its own: on transformers 5.x the base
class drops ``use_cache`` and ``max_length`` from the keyword arguments.

Lines starting with ``#?`` / ``#|`` describe how a fixture revision differs (see ``glmport.tiny.remote``).
"""

from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

#? chatglm2-2023-07
#|    def __init__(self, num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
#|                 kv_channels=128, num_attention_heads=32, seq_length=2048, hidden_dropout=0.0,
#|                 attention_dropout=0.0, layernorm_epsilon=1e-5, rmsnorm=True,
#? else
    def __init__(self, num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
                 kv_channels=128, num_attention_heads=32, seq_length=2048, hidden_dropout=0.0,
                 classifier_dropout=None, attention_dropout=0.0, layernorm_epsilon=1e-5, rmsnorm=True,
#? end
                 apply_residual_connection_post_layernorm=False, post_layer_norm=True, add_bias_linear=False,
                 add_qkv_bias=False, bias_dropout_fusion=True, multi_query_attention=False,
                 multi_query_group_num=1, apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True,
                 fp32_residual_connection=False, quantization_bit=0, pre_seq_len=None, prefix_projection=False,
                 **kwargs):
        # Every named argument becomes an attribute of the same name; the padded vocabulary doubles as
        # the vocabulary size transformers looks for.
        named = {key: value for key, value in locals().items() if key not in ("self", "kwargs", "__class__")}
        for key, value in named.items():
            setattr(self, key, value)
        self.vocab_size = padded_vocab_size
        super().__init__(**kwargs)
