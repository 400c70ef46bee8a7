"""ChatGLM-6B configuration for glmport's tiny test models.

Written from scratch for glmport. It has the constructor and the attributes of the configuration class
that ChatGLM-6B (THUDM/chatglm-6b, spring 2023) ships as remote code, so that code written against that
class, and glmport's patches for it, see the same object: the special ids ride on the config
(``mask_token_id``, ``gmask_token_id``, ``bos_token_id`` = ``<sop>``, ``eos_token_id`` = ``<eop>``), the
model uses 2-D positions (``position_encoding_2d``) and P-Tuning v2 is configured by ``pre_seq_len`` and
``prefix_projection``. Unlike ChatGLM2/3 it keeps ``use_cache`` as an attribute of its own.
"""

from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, vocab_size=150528, hidden_size=4096, num_layers=28, num_attention_heads=32,
                 layernorm_epsilon=1e-5, use_cache=False, bos_token_id=150004, eos_token_id=150005,
                 mask_token_id=150000, gmask_token_id=150001, pad_token_id=0, max_sequence_length=2048,
                 inner_hidden_size=16384, position_encoding_2d=True, quantization_bit=0, pre_seq_len=None,
                 prefix_projection=False, **kwargs):
        # The defaults are the March 2023 ids (the 150528 vocabulary with image tokens); every released
        # config.json names the ids it was saved with.
        named = {key: value for key, value in locals().items() if key not in ("self", "kwargs", "__class__")}
        for key, value in named.items():
            setattr(self, key, value)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
