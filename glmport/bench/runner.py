"""One recipe, timed through glmport's own training step.

The model is loaded the way ``glmport train`` loads it (:func:`glmport.modeling.load_model`: the backend's
patch session, the dtype policy), the method applied by :func:`glmport.train.methods.apply_method`, and
the steps run by :class:`glmport.train.trainer.GlmTrainer` (batches narrowed by the backend, the
label-row loss, the Trainer's own loop, accumulation and AdamW). Only the reference recipe swaps the loss
for the remote code's (full-vocabulary fp32 logits) and the collator for ``DataCollatorForSeq2Seq``.

Timing follows the notes (section 6): the first ``warmup`` optimizer steps are discarded; the clock runs
from the end of the last warm-up step to the end of the last step, with the device synchronized, and so
includes data loading and collation.
"""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmport.bench.flops import StepWork, executed_flops, model_flops
from glmport.bench.recipes import Recipe

log = logging.getLogger("glmport")

PEFT_CONFIGS = {
    # LoRA-A of the notes: r=8, alpha=32 on query_key_value (ChatGLM3's default); dropout 0 for speed runs
    "lora": {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["query_key_value"]},
    "ptuning": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 128},
    "sft": None,
}


@dataclass
class BenchSettings:
    method: str = "lora"
    samples_per_step: int = 16
    steps: int = 50
    warmup: int = 10
    seed: int = 0
    dtype: str = "auto"
    row_tokens: int | None = None  # packed rows: None = the micro-batch's longest sample
    learning_rate: float = 1e-4
    lora_rank: int = 8

    def peft_config(self) -> dict | None:
        config = PEFT_CONFIGS[self.method]
        if config is not None and self.method == "lora":
            config = dict(config, r=self.lora_rank)
        return config


@dataclass
class CountingCollator:
    """Wraps a collator and records, per micro-batch, what the step computes on (in call order)."""

    inner: object
    loss: str
    batches: list[StepWork] = field(default_factory=list)

    def __call__(self, features):
        batch = self.inner(features)
        lengths = [len(f["input_ids"]) for f in features]
        labels = sum(1 for f in features for label in list(f["labels"])[1:] if label != -100)
        padded = int(batch["input_ids"].numel())
        self.batches.append(StepWork(sum(lengths), sum(n * n for n in lengths), labels, padded,
                                     padded if self.loss == "full-vocab" else labels))
        return batch


def _reference_trainer_class():
    """GlmTrainer with the remote code's loss: all logits in fp32, a shifted contiguous copy, cross-entropy
    (normalized per label token of the step, as glmport's, so the losses compare)."""
    import torch.nn.functional as F

    from glmport.train.trainer import GEN_KEYS, GlmTrainer

    class ReferenceLossTrainer(GlmTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**{k: v for k, v in inputs.items() if k not in GEN_KEYS})
            logits = outputs.logits.float()
            shifted = logits[..., :-1, :].contiguous()
            targets = labels[..., 1:].contiguous()
            total = F.cross_entropy(shifted.view(-1, shifted.shape[-1]), targets.view(-1).long(), ignore_index=-100,
                                    reduction="sum")
            denominator = float(num_items_in_batch) if num_items_in_batch is not None else float((targets != -100).sum())
            loss = total / max(denominator, 1.0)
            return (loss, outputs) if return_outputs else loss

    return ReferenceLossTrainer


def _collator(recipe: Recipe, tokenizer, pad_token_id: int, row_tokens: int | None):
    if recipe.collator == "seq2seq":
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    if recipe.collator == "packed":
        from glmport.data.packing import PackingCollator

        return PackingCollator(pad_token_id, row_tokens)
    from glmport.train.dataset import Collator

    return Collator(pad_token_id)


def _step_clock(backend):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            backend.synchronize()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            backend.synchronize()
            self.ends.append(time.perf_counter())

    return StepClock()


def run_recipe(recipe: Recipe, settings: BenchSettings, *, shape, folder: Path, samples: list[dict], backend,
               patch_sets, peak_flops: float | None) -> dict:
    """Train ``samples`` (``(warmup + steps) * samples_per_step`` of them) with ``recipe``; the measurements."""
    import torch
    from datasets import Dataset
    from transformers import Seq2SeqTrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from glmport.data.packing import enable_packed_attention, packing_refusal
    from glmport.modeling import inspect_model_dir, load_model, resolve_dtype
    from glmport.train.checkpointing import apply_checkpointing, compile_layers, remove_selective
    from glmport.train.methods import apply_method, count_parameters, prefix_config_overrides
    from glmport.train.trainer import GlmTrainer

    peft_config = settings.peft_config()
    info = inspect_model_dir(folder)
    dtype, _ = resolve_dtype(settings.dtype, backend, info.family, settings.method)
    backend.seed(settings.seed)
    loaded = load_model(info, backend, mode="train", dtype=dtype, patch_sets=patch_sets,
                        config_overrides=prefix_config_overrides(info, peft_config))
    try:
        model = apply_method(loaded.model, info, settings.method, peft_config, backend)
        apply_checkpointing(model, info, recipe.checkpointing, backend=backend)
        if recipe.compile:
            compile_layers(model, backend, key="--compile")
        if recipe.collator == "packed":
            refusal = packing_refusal(model, settings.method, peft_config)
            if refusal is not None:
                return {"recipe": recipe.name, "change": recipe.change, "skipped": refusal}
            enable_packed_attention(model)
        trainable, _ = count_parameters(model)
        micro = recipe.micro_batch or settings.samples_per_step
        if settings.samples_per_step % micro:
            raise ValueError(f"samples per step {settings.samples_per_step} is not a multiple of {micro}")
        pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        collator = CountingCollator(_collator(recipe, loaded.tokenizer, pad_id, settings.row_tokens), recipe.loss)
        with tempfile.TemporaryDirectory(prefix="glmport-bench-") as workdir:
            args = Seq2SeqTrainingArguments(
                output_dir=workdir, max_steps=settings.warmup + settings.steps, per_device_train_batch_size=micro,
                gradient_accumulation_steps=settings.samples_per_step // micro, learning_rate=settings.learning_rate,
                lr_scheduler_type="constant", save_strategy="no", eval_strategy="no", report_to="none",
                logging_steps=1, disable_tqdm=True, remove_unused_columns=False, train_sampling_strategy="sequential",
                dataloader_num_workers=0, seed=settings.seed,
                bf16=settings.method == "sft" and backend.preferred_dtype() == torch.bfloat16,
                **backend.training_arguments())
            trainer_class = _reference_trainer_class() if recipe.loss == "full-vocab" else GlmTrainer
            trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(samples),
                                    data_collator=collator, processing_class=loaded.tokenizer, backend=backend,
                                    guard_mode=None)
            trainer.remove_callback(PrinterCallback)
            clock = _step_clock(backend)
            trainer.add_callback(clock)
            gc.collect()
            start_memory = backend.memory_stats().allocated
            backend.reset_peak_memory()
            trainer.train()
            memory = backend.memory_stats()
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            accumulation = args.gradient_accumulation_steps
            del trainer
    finally:
        remove_selective(loaded.model)  # the cores are the loaded model's; the patches come off next
        if loaded.patches is not None:
            loaded.patches.undo()
    return _measurements(recipe, settings, shape, clock, collator.batches, accumulation, losses, memory,
                         start_memory, trainable, peak_flops)


def _measurements(recipe, settings, shape, clock, batches, accumulation, losses, memory, start_memory, trainable,
                  peak_flops) -> dict:
    first = settings.warmup * accumulation
    measured = batches[first:first + settings.steps * accumulation]
    work = StepWork(*(sum(getattr(b, name) for b in measured) for name in StepWork.__dataclass_fields__))
    begin = clock.ends[settings.warmup - 1] if settings.warmup else clock.begin
    seconds = clock.ends[-1] - begin
    step_times = [b - a for a, b in zip([begin] + clock.ends[settings.warmup:-1], clock.ends[settings.warmup:])]
    prefix = (settings.peft_config() or {}).get("num_virtual_tokens", 0) if settings.method == "ptuning" else 0
    adapter = trainable if settings.method == "lora" else 0
    flops = model_flops(shape, settings.method, work, adapter_params=adapter, prefix=prefix)
    done = executed_flops(shape, settings.method, work, adapter_params=adapter, prefix=prefix)
    samples = settings.steps * settings.samples_per_step
    return {
        "recipe": recipe.name, "change": recipe.change, "micro_batch": recipe.micro_batch or settings.samples_per_step,
        "collator": recipe.collator, "checkpointing": recipe.checkpointing, "compile": recipe.compile,
        "loss": recipe.loss,
        "steps": settings.steps, "seconds": seconds,
        "step_s": {"mean": statistics.fmean(step_times), "min": min(step_times), "max": max(step_times)},
        "tokens_per_s": work.tokens / seconds, "label_tokens_per_s": work.label_rows / seconds,
        "samples_per_s": samples / seconds, "it_per_s": settings.steps / seconds,
        "padding_fraction": 1 - work.tokens / work.padded_tokens,
        "peak_allocated": memory.peak, "peak_above_start": memory.peak - start_memory, "reserved": memory.reserved,
        "model_flops_per_s": flops / seconds, "executed_flops_per_s": done / seconds,
        "mfu": flops / seconds / peak_flops if peak_flops else None,
        "trainable_parameters": trainable, "losses": losses,
        "work": {"tokens": work.tokens, "label_tokens": work.label_rows, "padded_tokens": work.padded_tokens,
                 "head_rows": work.head_rows, "sum_sq_lengths": work.squares},
        "mean_micro_batch_tokens": work.padded_tokens / max(len(measured), 1),
        "mean_micro_batch_label_rows": work.head_rows / max(len(measured), 1),
    }
