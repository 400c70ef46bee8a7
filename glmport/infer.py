"""Loading a base model or a ``glmport train`` result for generation, with the infer-mode patch set."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmport.errors import ModelError, Problem
from glmport.train.outputs import CHECKPOINT, CHECKPOINT_MARKER, RESULT_DIR, RESULT_FILE, WRITING_MARKER

log = logging.getLogger("glmport")
INCOMPLETE = ".incomplete"  # the suffix glmport gives a checkpoint cut short


@dataclass
class InferenceModel:
    model: Any
    tokenizer: Any
    template: Any
    backend: Any
    loaded: Any  # glmport.modeling.LoadedModel of the base
    description: str


def _read_result(path: Path) -> dict | None:
    file = path / RESULT_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{file}:{exc.lineno}: invalid JSON: {exc.msg}") from None


def _checkpoint_step(path: Path) -> int | None:
    """The step of a Trainer checkpoint folder (``checkpoint-N``, or one with a trainer_state.json)."""
    match = CHECKPOINT.match(path.name.removesuffix(INCOMPLETE))
    if match:
        return int(match.group(1))
    if (path / "trainer_state.json").is_file() or (path / CHECKPOINT_MARKER).is_file():
        try:
            return int(json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1
    return None


def _from_checkpoint(path: Path, step: int) -> dict:
    """A LoRA / prefix-tuning checkpoint loads like a result when its base model is still where it was
    trained from; anything else is explained: how to resume from it, or where the result is."""
    run = path.parent
    shown = f"step {step}" if step >= 0 else "step unknown"
    head = f"{path}: a training checkpoint ({shown}) of {run}, not a model folder or a training result"
    use = (f"to continue training from it: glmport train CONFIG --resume {step if step >= 0 else 'N'} "
           f"(with the run's config); to generate: glmport infer {run / RESULT_DIR}"
           + ("" if (run / RESULT_DIR / RESULT_FILE).is_file() else " once the run has finished"))
    if path.name.endswith(INCOMPLETE) or (path / WRITING_MARKER).exists():
        raise ModelError(head, [Problem(str(path), "it was cut short while being written: its files may be partial",
                                        f"use a complete checkpoint-N of {run}, or {run / RESULT_DIR}")])
    adapter_config = path / "adapter_config.json"
    if not adapter_config.is_file():
        raise ModelError(head, [Problem(str(path), "it holds the Trainer's state, not a result glmport infer can load",
                                        use)])
    try:
        base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not base or not (Path(base) / "config.json").is_file():
        named = f"names the base model {base}, which is not a model folder here" if base else "names no base model"
        raise ModelError(head, [Problem(str(adapter_config), f"its adapter_config.json {named}", use)])
    log.info("%s is a training checkpoint (step %s) holding an adapter of %s: loading it like a result "
             "(for the run's final result: glmport infer %s)", path, shown.split()[-1], base, run / RESULT_DIR)
    return {"content": "adapter", "base_model": base}


def load_for_inference(path: Path, backend, *, patch_sets, allow_unverified: bool = False,
                       dtype: str = "auto", consent=None) -> InferenceModel:
    """``path``: a model folder, the ``final`` folder of a training run (adapter, prefix encoder or
    full model; the base model is found through its glmport_result.json), or a checkpoint of one that holds
    an adapter. ``patch_sets`` is the caller's ``manager.patch_sets``; ``consent``
    (:class:`glmport.modeling.RemoteCodeConsent`) says which remote code may run."""

    from glmport.data.templates import get_template
    from glmport.modeling import inspect_model_dir, load_model, resolve_dtype
    from glmport.train.methods import prefix_config_overrides

    path = Path(path).resolve()
    if not path.is_dir():
        raise ModelError(f"{path}: no such folder" if not path.exists() else
                         f"{path}: a file; glmport infer takes a model folder or OUTPUT_DIR/final")
    result = _read_result(path)
    step = _checkpoint_step(path) if result is None and not (path / "config.json").is_file() else None
    if step is not None:
        result = _from_checkpoint(path, step)
    content = result["content"] if result else "model"
    base_dir = Path(result["base_model"]) if result and content != "full-model" else path
    if not (base_dir / "config.json").is_file():
        raise ModelError(f"{base_dir}: base model folder not found (named by {path / RESULT_FILE})" if result else
                         f"{path}: not a model folder (no config.json), a glmport train result (no {RESULT_FILE}) "
                         "or a training checkpoint; give a model folder or OUTPUT_DIR/final")
    info = inspect_model_dir(base_dir, (result or {}).get("model_family", "auto"))
    torch_dtype, _ = resolve_dtype(dtype, backend, info.family, "lora")
    overrides = prefix_config_overrides(info, result.get("peft_config")) if content == "prefix-encoder" else {}
    if overrides:
        overrides["use_cache"] = True
    loaded = load_model(info, backend, mode="infer", dtype=torch_dtype, patch_sets=patch_sets,
                        allow_unverified=allow_unverified, config_overrides=overrides, consent=consent)
    try:
        model = _with_result(loaded.model, content, path, backend)
    except Exception:
        if loaded.patches is not None:
            loaded.patches.undo()
        raise
    template = get_template((result or {}).get("template", "auto"), loaded.tokenizer,
                            combine=bool((result or {}).get("combine", False)))
    described = f"{info.kind} {info.family} model {base_dir}" + (f" + {content} {path}" if result else "")
    return InferenceModel(model, loaded.tokenizer, template, backend, loaded, described)


def _with_result(model, content: str, path: Path, backend):
    """The base model with the trained part of a result on top, on the backend's device, in eval mode."""
    if content == "adapter":
        from peft import PeftModel

        from glmport.train.methods import narrow_prompt_tokens, quiet_peft

        # Adapter weights are read on the host and moved with the model below: loaders disagree on which
        # device strings they take (safetensors rejects "cpu:0", older releases know no "mlu").
        with quiet_peft():
            model = PeftModel.from_pretrained(model, str(path), torch_device="cpu")
        narrow_prompt_tokens(model, backend)
    elif content == "prefix-encoder":
        from safetensors.torch import load_file  # safetensors: weights only, nothing in them is executed

        state = load_file(str(path / "prefix_encoder.safetensors"))
        model.transformer.prefix_encoder.load_state_dict(state)
    return model.to(backend.device(0)).eval()


def generate_reply(bundle: InferenceModel, messages, *, max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, guard_mode: str | None = None) -> str:
    """Generate the next assistant reply after ``messages`` (a list of glmport.data.records.Message)."""
    import torch
    from transformers import GenerationConfig

    from glmport.train.guarded import guarded_forward

    ids = bundle.template.prompt_ids(messages)
    batch = bundle.backend.coerce({"input_ids": torch.tensor([ids])})  # narrowed before it is moved
    input_ids = batch["input_ids"].to(bundle.backend.device(0))
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None, eos_token_id=list(bundle.template.stop_token_ids),
        pad_token_id=bundle.template.pad_token_id,
    )
    with torch.no_grad(), guarded_forward(bundle.model, bundle.backend, guard_mode):
        output = bundle.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       generation_config=config)
    new = output[0, input_ids.shape[1]:].tolist()
    while new and new[-1] in bundle.template.stop_token_ids:
        new.pop()
    return bundle.tokenizer.decode(new, skip_special_tokens=True).strip()
