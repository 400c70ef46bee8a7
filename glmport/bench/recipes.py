"""The reference recipe, glmport's, and the steps between them, one knob at a time.

The reference is what ChatGLM3's ``finetune_hf.py`` does with transformers and peft: micro-batches of 4
samples padded to the longest (``DataCollatorForSeq2Seq(padding="longest")``), gradient accumulation up to
the samples per step, gradient checkpointing on, and the remote code's loss: every logit of the batch in
fp32, a shifted contiguous copy, cross-entropy over it. Each later recipe changes one thing from the one
before, so ``--recipe all`` shows what each optimization buys; the last is glmport's default.

Every recipe trains the same samples in the same order, the same number of samples per optimizer step,
with the loss normalized per label token of the step, so their losses are comparable step by step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Recipe:
    name: str
    change: str  # what this recipe changes from the one before it
    micro_batch: int | None  # samples per micro-batch (None: all samples of the step in one micro-batch)
    collator: str  # "seq2seq" (DataCollatorForSeq2Seq, padding longest), "glmport" (padded), "packed"
    checkpointing: str  # "off", "full" or "selective" (glmport.train.checkpointing)
    loss: str  # "full-vocab" (the remote code's) or "label-rows" (glmport.train.loss)
    compile: bool = False  # torch.compile of each transformer layer (glmport.compile)


REFERENCE = Recipe("reference", "finetune_hf.py: batches of 4, padding longest, checkpointing, fp32 full-vocabulary loss",
                   4, "seq2seq", "full", "full-vocab")

STEPS = (
    ("no-checkpointing", "gradient checkpointing off", {"checkpointing": "off"}),
    ("label-rows", "loss on label rows only, fp32 in chunks (no full-vocabulary logits)", {"loss": "label-rows"}),
    ("one-microbatch", "all samples of the step in one micro-batch (glmport's collator)",
     {"micro_batch": None, "collator": "glmport"}),
    ("packed", "padding-free packed rows (positions restart, block-diagonal attention)", {"collator": "packed"}),
)


def ladder(packing: bool = True) -> list[Recipe]:
    """The reference, then each step; with ``packing`` False the packed step is left out."""
    recipes = [REFERENCE]
    for name, change, knobs in STEPS:
        if name == "packed" and not packing:
            continue
        recipes.append(replace(recipes[-1], name=name, change=change, **knobs))
    return recipes


def glmport_recipe(packing: bool = True) -> Recipe:
    """glmport's default: the last rung of the ladder."""
    return replace(ladder(packing)[-1], name="glmport", change="glmport's defaults")


def select(which: str, packing: bool, checkpointing: str | None = None, compile: bool = False,
           micro_batch: int | None = None) -> list[Recipe]:
    """``--recipe`` glmport | reference | all; ``--checkpointing``, ``--compile`` and ``--micro-batch`` change the
    last recipe (glmport's, or the ladder's last rung), the one measured for glmport. (Whether one micro-batch
    of all the step's samples beats several smaller ones depends on the device: on a CPU it need not.)"""
    recipes = [glmport_recipe(packing)] if which == "glmport" else \
        [REFERENCE, glmport_recipe(packing)] if which == "reference" else ladder(packing)
    last = recipes[-1]
    changes = [f"checkpointing {checkpointing}"] if checkpointing and checkpointing != last.checkpointing else []
    changes += ["torch.compile of each layer"] if compile else []
    changes += [f"micro-batches of {micro_batch}"] if micro_batch is not None else []
    if changes:
        recipes[-1] = replace(last, checkpointing=checkpointing or last.checkpointing, compile=compile,
                              micro_batch=micro_batch if micro_batch is not None else last.micro_batch,
                              change=f"{last.change}; {', '.join(changes)}")
    return recipes
