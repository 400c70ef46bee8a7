"""Native GLM (transformers' ``GlmModel`` and ``Glm4Model``): default position ids in int32.

When no ``position_ids`` are passed (generation never passes them for GLM), ``GlmModel.forward`` (and
``Glm4Model.forward``, the same signature and the same construct) builds
them with ``torch.arange`` (int64) plus the cache length. This wrapper builds the same positions in int32
before calling the original forward, so the numbers are unchanged and nothing 64-bit reaches the device.
"""

from __future__ import annotations

import functools

from glmport.patching import Patch

CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers 5.24 renamed past_key_values to cache
MODEL_CLASSES = {"glm-native": "GlmModel", "glm4-native": "Glm4Model"}  # patch family -> the class patched


def apply(ctx) -> None:
    import inspect

    import torch

    target = ctx.patch.replaces[0]
    original = ctx.original(target)
    signature = inspect.signature(original)
    cache_name = next(name for name in CACHE_ARGUMENTS if name in signature.parameters)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        arguments = bound.arguments
        if arguments.get("position_ids") is None:
            source = arguments.get("input_ids")
            source = source if source is not None else arguments.get("inputs_embeds")
            cache = arguments.get(cache_name)
            past = cache.get_seq_length() if cache is not None else 0
            arguments["position_ids"] = torch.arange(past, past + source.shape[1], dtype=torch.int32,
                                                     device=source.device)[None]
        # everything by keyword: transformers' decorators on forward add keywords (use_cache) themselves
        by_name = {}
        for name, value in list(arguments.items())[1:]:  # [0] is self
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                by_name.update(value)
            else:
                by_name[name] = value
        return original(self, **by_name)

    ctx.replace(target, forward)


def patch(family: str = "glm-native", *, requires) -> Patch:
    """``family``: ``glm-native`` (``GlmModel``) or ``glm4-native`` (``Glm4Model``)."""
    target = f"{MODEL_CLASSES[family]}.forward"
    return Patch(
        id="native-positions32",
        family=family,
        file="transformers",
        replaces=(target,),
        why=f"{target} builds default position ids with an int64 arange; build the same ones in int32",
        apply=apply,
        requires=requires,
    )
