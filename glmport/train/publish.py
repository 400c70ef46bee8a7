"""After training: the result folder, published in one rename, and the test split's predictions.

A write that fails here (a full disk) is one clear error (:mod:`glmport.train.faults`) that leaves no
partial file behind: the result is there complete, or not at all.

With several processes, every rank takes part where the weights are spread over them (DeepSpeed ZeRO-3
gathers them for the save; the test split is predicted by all ranks together), and rank 0 alone writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from glmport.train.faults import write_fault_reason, write_faults
from glmport.train.methods import uses_own_prefix_encoder
from glmport.train.outputs import PREDICTIONS_FILE, RESULT_DIR, RESULT_FILE, remove_tree, write_json_atomic
from glmport.train.state import TrainingRun

log = logging.getLogger("glmport")

REMOTE_CODE = ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py", "quantization.py")


def _save_model(run: TrainingRun, staging: Path) -> str:
    """The trained weights into ``staging``; called on every rank, rank 0 writes."""
    info, trainer, writes = run.loaded.info, run.trainer, run.ranks.is_main
    if uses_own_prefix_encoder(info, run.config.peft_config):
        # through accelerate, so weights sharded by DeepSpeed/FSDP are gathered first (the engine knows how)
        state = trainer.accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model)
        marker = "transformer.prefix_encoder."
        if writes:
            encoder = {k.split(marker, 1)[1]: v.detach().cpu().contiguous() for k, v in state.items() if marker in k}
            save_file(encoder, str(staging / "prefix_encoder.safetensors"))
        return "prefix-encoder"
    # ZeRO-3: every rank gathers its shards ("stage3_gather_16bit_weights_on_model_save"), so the result loads
    # without DeepSpeed; the Trainer writes on rank 0 only
    trainer.save_model(str(staging))
    if writes and run.config.method == "sft" and info.kind == "remote":
        for name in REMOTE_CODE:  # the folder loads by path like the original (patches are applied at load)
            if (info.path / name).is_file():
                shutil.copyfile(info.path / name, staging / name)
    return "adapter" if run.config.method != "sft" else "full-model"


def publish_result(run: TrainingRun) -> Path:
    """Write the trained result to OUTPUT_DIR/final in one rename: it exists complete or not at all."""
    final = run.output_dir / RESULT_DIR
    staging = run.output_dir / f".{RESULT_DIR}.partial"
    ranks = run.ranks
    left = "nothing was published" + (f" ({final} still holds an earlier result)" if final.exists() else
                                      f": no {RESULT_DIR}/, no run_summary.json")

    def faults():
        return write_faults("the result", staging, run.output_dir, resume_flag=run.request.resume_flag, left=left,
                            cleanup=lambda: remove_tree(staging) if ranks.is_main else None)

    with ranks.agree(), faults():
        if ranks.is_main:
            remove_tree(staging)
            staging.mkdir(parents=True)
    with ranks.agree(), faults():
        content = _save_model(run, staging)
    with ranks.agree():
        if ranks.is_main:
            with faults():
                _write_metadata(run, staging, content)
            old = run.output_dir / f".{RESULT_DIR}.old"
            remove_tree(old)
            if final.exists():
                final.rename(old)
            staging.rename(final)
            remove_tree(old)
    return final


def _write_metadata(run: TrainingRun, staging: Path, content: str) -> None:
    """The tokenizer and ``glmport_result.json`` beside the weights."""
    try:
        run.loaded.tokenizer.save_pretrained(str(staging))
    except Exception as exc:  # a remote tokenizer that cannot save must not lose the trained weights
        if write_fault_reason(exc) is not None:
            raise  # but a full disk is not the tokenizer's fault
        log.warning("the tokenizer could not be saved with the result (%s); load it from the base model", exc)
    info = run.loaded.info
    write_json_atomic(staging / RESULT_FILE, {
        "content": content,
        "method": run.config.method,
        "peft_config": run.config.peft_config,
        "base_model": str(info.path),
        "model_kind": info.kind,
        "model_family": info.family,
        "template": run.template.name,
        # why this template: the tokenizer's tokens and config.json facts it was decided from
        "family_detection": run.template.detection.as_dict() if run.template.detection else None,
        "combine": run.config.combine,
        "backend": run.backend.name,
        "dtype": str(run.loaded.dtype).replace("torch.", ""),
        "quantization": run.config.glmport.quantization,  # QLoRA: infer loads the base the same way where it can
        "patches": run.loaded.patches.summary() if run.loaded.patches else None,
        "global_step": run.trainer.state.global_step,
    })


def write_predictions(run: TrainingRun) -> Path:
    """Predict the test split and write every prediction next to its reference (upstream wrote none)."""
    trainer, tokenizer = run.trainer, run.loaded.tokenizer
    trainer.force_generate = True  # predictions are the point here, whatever predict_with_generate says
    try:
        output = trainer.predict(run.datasets.test, metric_key_prefix="test")
    finally:
        trainer.force_generate = False
    path = run.output_dir / PREDICTIONS_FILE
    tmp = path.with_name(path.name + ".partial")
    rows = run.datasets.test
    run.notes.append("test: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in output.metrics.items()
                                          if isinstance(v, float) and not k.endswith(("runtime", "per_second", "_time"))))
    with run.ranks.agree():  # every rank predicted its share of the test split; rank 0 writes them all
        if run.ranks.is_main:
            _write_predictions(run, output, rows, tokenizer, path, tmp)
    return path


def _write_predictions(run: TrainingRun, output, rows, tokenizer, path: Path, tmp: Path) -> None:
    with write_faults(PREDICTIONS_FILE, tmp, run.output_dir, resume_flag=run.request.resume_flag,
                      left="nothing was published", cleanup=lambda: tmp.unlink(missing_ok=True)):
        with open(tmp, "w", encoding="utf-8") as out:
            predictions = output.predictions if output.predictions is not None else []
            for index, predicted in enumerate(predictions):
                row = rows[index]
                predicted = np.where(np.asarray(predicted) < 0, run.template.pad_token_id, predicted)
                out.write(json.dumps({
                    "source": row.get("source", ""),
                    "prompt": tokenizer.decode(row["prompt_ids"], skip_special_tokens=True),
                    "prediction": tokenizer.decode(predicted.tolist(), skip_special_tokens=True),
                    "reference": tokenizer.decode(row["output_ids"], skip_special_tokens=True),
                }, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
