"""glmport's Trainer: transformers' ``Seq2SeqTrainer`` with the device questions asked of the backend.

What it changes, and why:

* every batch is narrowed by the backend (``Backend.coerce``) before it is moved, and each step runs in
  the backend's compute context and, where the device lacks 64-bit kernels, the 64-bit guard;
* the loss is computed here (:mod:`glmport.train.loss`) instead of by the model, normalized over all
  label tokens of the accumulated batch;
* evaluation computes the eval loss on the full sequence and generates from the left-padded prompt;
* checkpoints are marked complete only after every file is written, by every rank (DeepSpeed ZeRO writes
  per-rank shards, and each rank its RNG state): rank 0 writes the manifest after all ranks are done (see
  :mod:`glmport.train.resume`);
* a step whose loss is NaN/inf stops the run, and :meth:`GlmTrainer.raise_if_diverged` keeps it from
  publishing anything.

No second training loop: the Trainer's own loop, scheduler, accumulation, logging and saving are used.
:func:`build_trainer` assembles it for a run: arguments, collator, metrics, progress and plugin callbacks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import Seq2SeqTrainer
from transformers.trainer_callback import PrinterCallback

from glmport.data.packing import training_collator
from glmport.errors import TrainingDiverged
from glmport.guard import GuardReport, sixty_four_bit_guard
from glmport.infer import generation_batch, peft_prefix_length, with_prefix_cache
from glmport.train.arguments import generation_config, training_arguments
from glmport.train.callbacks import MetricsLog, ProgressCallback
from glmport.train.checkpoints import RunIdentity, rotate, write_manifest
from glmport.train.dataset import Collator
from glmport.train.faults import write_faults
from glmport.train.guarded import guarded_forward
from glmport.train.loss import model_loss_sum
from glmport.train.metrics import make_compute_metrics
from glmport.train.outputs import CHECKPOINT_MARKER, METRICS_FILE, WRITING_MARKER, checkpoint_name
from glmport.train.ranks import Ranks
from glmport.train.state import TrainingRun

GEN_KEYS = ("gen_input_ids", "gen_attention_mask", "gen_output_ids")


class GlmTrainer(Seq2SeqTrainer):
    def __init__(self, *args, backend, guard_mode: str | None, ranks: Ranks | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.ranks = ranks or Ranks()
        self.guard_mode = guard_mode  # None: off; "error" or "report"
        self.guard_report = GuardReport()
        self.tokens_seen = 0
        self.first_nonfinite_step: int | None = None  # a diverged run stops and publishes nothing
        self.force_generate = False  # test-split predictions generate even without predict_with_generate
        self.label_tokens_seen = 0
        self.identity = RunIdentity()  # what checkpoint manifests record about the run (set by the recipe)
        self.resume_flag = "--resume"  # how the user asks to resume, for the message of a failed save
        self.model_kind = "remote"  # "native" for transformers' GLM classes (set by build_trainer)
        # Let the Trainer count label tokens across the accumulated batch and hand us the total.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.loss_is_scaled_for_ga = True

    # --- device policy around a step ------------------------------------------------------------
    @contextlib.contextmanager
    def device_step(self):
        """Backend compute context plus (optionally) the 64-bit guard, for one unit of device work."""
        policy = self.backend.sixty_four_bit_policy()
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.backend.compute_context())
            if self.guard_mode and policy.lacks_64bit:
                report = stack.enter_context(
                    sixty_four_bit_guard(policy.narrow.keys(), label=self.backend.name, mode=self.guard_mode)
                )
                try:
                    yield
                finally:
                    self._merge(report)
            else:
                yield

    def _merge(self, report: GuardReport) -> None:
        self.guard_report.ops_checked += report.ops_checked
        known = {(leak.op, leak.site) for leak in self.guard_report.leaks}
        self.guard_report.leaks.extend(leak for leak in report.leaks if (leak.op, leak.site) not in known)

    def create_optimizer(self, *args, **kwargs):
        """The optimizer step runs inside the device context too (guard included), like forward/backward."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if not getattr(optimizer.step, "_glmport_wrapped", False):
            step = optimizer.step

            def guarded_step(*step_args, **step_kwargs):
                with self.device_step():
                    return step(*step_args, **step_kwargs)

            guarded_step._glmport_wrapped = True
            optimizer.step = guarded_step
        return optimizer

    def _prepare_inputs(self, inputs):
        return super()._prepare_inputs(self.backend.coerce(inputs))

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.tokens_seen += int(inputs["attention_mask"].sum())
        self.label_tokens_seen += int((inputs["labels"][:, 1:] != -100).sum())
        inputs = self.backend.coerce(inputs)  # host-side narrowing happens before the guarded step
        with self.device_step():
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.first_nonfinite_step is None and not bool(torch.isfinite(loss)):
            self.first_nonfinite_step = self.state.global_step + 1
            self.control.should_training_stop = True
        return loss

    def raise_if_diverged(self) -> None:
        """After ``train()``: a run whose loss became NaN/inf publishes nothing."""
        if self.first_nonfinite_step is not None:
            raise TrainingDiverged(
                f"the training loss became NaN/inf at step {self.first_nonfinite_step}; stopped without publishing "
                "a result or a checkpoint of that state. Lower the learning rate, or use bf16/fp32 (fp16 overflows "
                "GLM-4). Complete checkpoints from before it remain."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        loss_sum, count, outputs = model_loss_sum(model, {k: v for k, v in inputs.items() if k not in GEN_KEYS}, labels)
        # One normalization over every label token of the accumulated batch (the Trainer counts them),
        # so gradient accumulation and uneven batches weigh tokens equally.
        denominator = float(num_items_in_batch) if num_items_in_batch is not None else float(max(count, 1))
        loss = loss_sum / max(denominator, 1.0)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1 and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    # --- evaluation -------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        inputs = self._prepare_inputs(inputs)
        gen = {k: inputs.pop(k) for k in GEN_KEYS if k in inputs}
        with torch.no_grad(), self.device_step():
            labels = inputs["labels"]
            loss_sum, count, _ = model_loss_sum(model, {k: v for k, v in inputs.items() if k != "labels"}, labels)
            loss = (loss_sum / max(count, 1)).detach()
        generate = self.args.predict_with_generate or self.force_generate
        if (prediction_loss_only and not self.force_generate) or not generate or not gen:
            return loss, None, None
        generated = self._generate(model, gen, gen_kwargs)
        return loss, generated, gen["gen_output_ids"]

    def _generate(self, model, gen: dict, gen_kwargs: dict):
        kwargs = dict(self._gen_kwargs) if hasattr(self, "_gen_kwargs") and not gen_kwargs else dict(gen_kwargs)
        kwargs.pop("synced_gpus", None)
        prompt = gen["gen_input_ids"]
        config = self.model.generation_config
        batch = {"input_ids": prompt, "attention_mask": gen["gen_attention_mask"]}
        model, prefix = self.model, peft_prefix_length(self.model, self.model_kind)
        if prefix:  # native peft prefix tuning: generate from the prefix as a filled cache, as glmport infer does
            prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt.cpu(), gen["gen_attention_mask"].cpu())]
            batch = self.backend.coerce(generation_batch(prompts, int(config.pad_token_id), prefix))
            model, batch = with_prefix_cache(self.model, self.backend, {k: v.to(prompt.device) for k, v in batch.items()})
        with torch.no_grad(), guarded_forward(self.model, self.backend, self.guard_mode, self._merge):
            out = model.generate(**batch, generation_config=config, **kwargs)
        return out[:, prefix + prompt.shape[1]:]

    # --- checkpoints ------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        if self.first_nonfinite_step is not None:
            return  # never mark weights from a diverged step as a complete checkpoint
        folder = Path(self._get_output_dir(trial=trial)) / checkpoint_name(self.state.global_step)
        # A failed write (full disk, read-only remount) is one clear error; the folder keeps its writing
        # marker and gets no manifest, so nothing takes it for complete (a resume renames it .incomplete).
        # A write that fails on one rank stops every rank (agree), instead of leaving them at the barrier.
        def faults():
            return write_faults(folder.name, folder, folder.parent, resume_flag=self.resume_flag,
                                left=f"{folder.name} is incomplete: a resumed run renames it {folder.name}.incomplete")

        limit = self.args.save_total_limit
        with self.ranks.agree(), faults():
            self._write_checkpoint(model, trial, folder)
        with self.ranks.agree(), faults():  # after every rank wrote its part (ZeRO shards, RNG states)
            if self.args.should_save and folder.is_dir():
                write_manifest(folder, self.state.global_step, run_fingerprint=self.identity.fingerprint,
                               history=self.identity.history(self.state.global_step))
                (folder / WRITING_MARKER).unlink(missing_ok=True)
                best = self.state.best_model_checkpoint
                rotate(folder.parent, limit, keep=Path(best) if best else None)

    def _write_checkpoint(self, model, trial, folder: Path) -> None:
        if self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / CHECKPOINT_MARKER).unlink(missing_ok=True)
            (folder / WRITING_MARKER).touch()
        # The Trainer deletes old checkpoints (save_total_limit) at the end of its save, before this one
        # is marked complete: a crash in between would leave no complete checkpoint. Rotate afterwards.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit


def build_trainer(run: TrainingRun, manager) -> GlmTrainer:
    """The trainer for ``run``, with glmport's progress lines and the plugins' callbacks; sets ``run.trainer``."""
    args = training_arguments(run, has_eval=run.datasets.eval is not None, generation=generation_config(run))
    generates = (args.predict_with_generate and run.datasets.eval is not None) or run.datasets.test is not None
    trainer = GlmTrainer(
        model=run.model,
        args=args,
        train_dataset=run.datasets.train,
        eval_dataset=run.datasets.eval,
        data_collator=training_collator(run, Collator(run.template.pad_token_id)),
        processing_class=run.loaded.tokenizer,
        compute_metrics=make_compute_metrics(run.loaded.tokenizer, run.template.pad_token_id) if generates else None,
        backend=run.backend,
        guard_mode=run.guard_mode,
        ranks=run.ranks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback prints lines
    trainer.add_callback(ProgressCallback(trainer))
    trainer.add_callback(MetricsLog(run.output_dir / METRICS_FILE, resume_flag=run.request.resume_flag))
    trainer.resume_flag = run.request.resume_flag
    trainer.model_kind = run.loaded.info.kind
    for plugin_callbacks in manager.hook.glmport_trainer_callbacks(run=run):
        for callback in plugin_callbacks or []:
            trainer.add_callback(callback)
    run.trainer = trainer
    return trainer
