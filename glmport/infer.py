"""Loading a base model or a ``glmport train`` result for generation, with the infer-mode patch set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmport.errors import ModelError

RESULT_FILE = "glmport_result.json"


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


def load_for_inference(path: Path, backend, *, allow_unverified: bool = False, dtype: str = "auto") -> InferenceModel:
    """``path``: a model folder, or the ``final`` folder of a training run (adapter, prefix encoder or
    full model; the base model is found through its glmport_result.json)."""

    from glmport.data.templates import get_template
    from glmport.modeling import inspect_model_dir, load_model, resolve_dtype
    from glmport.train.methods import prefix_config_overrides

    path = Path(path).resolve()
    result = _read_result(path)
    content = result["content"] if result else "model"
    base_dir = Path(result["base_model"]) if result and content != "full-model" else path
    if not (base_dir / "config.json").is_file():
        raise ModelError(f"{base_dir}: base model folder not found (named by {path / RESULT_FILE})"
                         if result else f"{path}: not a model folder or a glmport result (no config.json)")
    info = inspect_model_dir(base_dir, (result or {}).get("model_family", "auto"))
    torch_dtype, _ = resolve_dtype(dtype, backend, info.family, "lora")
    overrides = prefix_config_overrides(info, result.get("peft_config")) if content == "prefix-encoder" else {}
    if overrides:
        overrides["use_cache"] = True
    loaded = load_model(info, backend, mode="infer", dtype=torch_dtype, allow_unverified=allow_unverified,
                        config_overrides=overrides)
    model = loaded.model
    if content == "adapter":
        from peft import PeftModel

        from glmport.train.methods import narrow_prompt_tokens

        model = PeftModel.from_pretrained(model, str(path), torch_device=str(backend.device(0)))
        narrow_prompt_tokens(model, backend)
    elif content == "prefix-encoder":
        from safetensors.torch import load_file

        state = load_file(str(path / "prefix_encoder.safetensors"))
        model.transformer.prefix_encoder.load_state_dict(state)
    model = model.to(backend.device(0)).eval()
    template = get_template((result or {}).get("template", "auto"), loaded.tokenizer,
                            combine=bool((result or {}).get("combine", False)))
    described = f"{info.kind} {info.family} model {base_dir}" + (f" + {content} {path}" if result else "")
    return InferenceModel(model, loaded.tokenizer, template, backend, loaded, described)


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
