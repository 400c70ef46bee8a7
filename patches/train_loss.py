"""Training loss without the full-vocabulary fp32 copy: with labels, the remote forward upcasts all
``[batch, seq, vocab]`` logits to fp32 and makes a shifted copy (2 GB per copy at 8k tokens for
ChatGLM3, 5 GB for GLM-4). Compute the loss in fp32 on label positions only, chunk by chunk.
(``glmport train`` computes its loss itself; this covers code that calls the model with labels.)"""

from __future__ import annotations

import functools
import inspect

from glmport.patching import Patch


def apply(ctx) -> None:
    import torch

    from glmport.train.loss import label_loss_sum

    original = ctx.original("ChatGLMForConditionalGeneration.forward")
    signature = inspect.signature(original)

    @functools.wraps(original)  # generate() checks kwargs against the forward's signature
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        labels = bound.arguments.get("labels")
        if labels is None or bound.arguments.get("return_dict") is False:
            return original(self, *args, **kwargs)
        bound.arguments["labels"] = None
        output = original(*bound.args, **bound.kwargs)
        total, count = label_loss_sum(output.logits, labels, torch.nn.Identity())
        # a new output object: assigning a key to the old one would put the loss after the logits,
        # and output[0] must be the loss, as with the original forward
        fields = {key: value for key, value in output.items() if key != "loss"}
        return type(output)(loss=total / max(count, 1), **fields)

    ctx.replace("ChatGLMForConditionalGeneration.forward", forward)


def patch(family: str, *, requires) -> Patch:
    return Patch(
        "label-row-loss", family=family, file="modeling", replaces=("ChatGLMForConditionalGeneration.forward",),
        why="loss on label rows in fp32 chunks instead of an fp32 copy of every logit",
        apply=apply, requires=requires, modes=("train",),
    )
