"""``glmport export RESULT OUT --merge``: a training result as a standard model folder, for any tool.

What a result becomes:

* a **LoRA adapter**: merged into the base weights (peft's ``merge_and_unload``), in fp32, then cast once
  to the folder's dtype;
* a **ChatGLM2/3 P-Tuning v2 prefix encoder**: the base weights plus ``transformer.prefix_encoder.*`` in the
  same state dict and ``pre_seq_len`` / ``prefix_projection`` in config.json: the remote code builds its
  prefix encoder from those and loads it with the rest (the layout its own P-Tuning checkpoints have);
* a **full model** (SFT), or a plain model folder: copied in the dtype asked for.

peft's prefix tuning (GLM-4, native models) keeps its prefix outside the weights and cannot be merged; it is
refused with what to do instead. The folder holds sharded safetensors with their index, config.json,
generation_config.json (the family's stop tokens), the tokenizer files and, for remote-code models, the
code as it was plus the compat patch set as plain code in ``glmport_compat.py``, which the ``auto_map`` entries
load first (:mod:`glmport.convert.standalone`): ``AutoModelForCausalLM.from_pretrained(OUT,
trust_remote_code=True)`` works on current transformers on a machine without glmport, and glmport loads the
folder like the original. ``glmport_export.json`` says what was exported from what.

Everything is written to ``OUT.partial`` and renamed at the end: OUT is complete or not there.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from glmport.convert.outdir import check_out_dir, publish, staging_dir, write_failed
from glmport.errors import ModelError, Problem

log = logging.getLogger("glmport")

EXPORT_FILE = "glmport_export.json"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
REMOTE_CODE = {"modeling": "modeling_chatglm.py", "configuration": "configuration_chatglm.py",
               "tokenization": "tokenization_chatglm.py"}
# written anew, or not a part of a model folder (training state, glmport's own records)
_NOT_COPIED = ("config.json", "generation_config.json", "trainer_state.json", "training_args.bin", "optimizer.pt",
               "scheduler.pt", "rng_state.pth", "adapter_config.json", "adapter_model.safetensors",
               "adapter_model.bin", "prefix_encoder.safetensors")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass
class Exported:
    path: Path
    content: str
    files: list[str]
    notes: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)


def parse_shard_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGIB")
    unit = raw[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        value = 0
    if value < 1:
        raise ModelError(f"--max-shard-size {text!r} is not a size", [Problem(
            "--max-shard-size", f"{text!r}", "give a size such as 5GB, 500MB or 2GiB")])
    return int(value)


def _copy_folder_files(source: Path, staging: Path) -> list[str]:
    """Tokenizer files, remote code and whatever else describes the model, as they are."""
    written = []
    for item in sorted(source.iterdir()):
        name = item.name
        if not item.is_file() or name in _NOT_COPIED or name.startswith(("glmport_", ".")):
            continue
        if item.suffix in _WEIGHT_SUFFIXES or name.endswith(".index.json"):
            continue
        shutil.copyfile(item, staging / name)
        written.append(name)
    return written


def _compat_layer(bundle, config: dict) -> tuple[str | None, dict | None, list[str]]:
    """For a remote-code model: the text of glmport_compat.py, tokenizer_config.json with its auto_map
    pointing there (None: no tokenizer config), and the ids of the patches written; ``config``'s auto_map
    is redirected in place (see :mod:`glmport.convert.standalone`)."""
    from glmport.convert.standalone import module_source, redirect_auto_map

    info, session = bundle.loaded.info, bundle.loaded.patches
    if info.kind != "remote" or session is None:
        return None, None, []
    exported: dict[str, list[str]] = {}
    auto_map = dict(config.get("auto_map", {}))
    if "AutoModelForCausalLM" not in auto_map and str(auto_map.get("AutoModel", "")).endswith("ForConditionalGeneration"):
        # ChatGLM-6B's config.json maps only AutoModel/AutoModelForSeq2SeqLM to its (causal) model class; the
        # export is for tools that load with AutoModelForCausalLM, so that name maps to the same class
        auto_map["AutoModelForCausalLM"] = auto_map["AutoModel"]
    config["auto_map"] = redirect_auto_map(auto_map, exported)
    tokenizer_file = info.path / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_file.read_text(encoding="utf-8")) if tokenizer_file.is_file() else None
    if tokenizer_config and "auto_map" in tokenizer_config:
        tokenizer_config["auto_map"] = redirect_auto_map(tokenizer_config["auto_map"], exported)
    patches = [e.patch for e in session.plan.to_apply if e.set_name == "compat"]
    revisions = {key: identity.effective_revision for key, identity in session.plan.files.items()
                 if key in REMOTE_CODE}
    module = module_source(patches, session.plan.family, revisions, f"{info.family} ({info.path.name})", exported)
    return module, tokenizer_config, [patch.id for patch in patches]


def _merged_model(bundle, path: Path):
    """The model to write, and what it holds."""
    content = (bundle.result or {}).get("content", "model")
    model = bundle.model
    if content != "adapter":
        return model, content
    config = next(iter(model.peft_config.values()))
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if getattr(config, "is_prompt_learning", False) or not hasattr(model, "merge_and_unload"):
        raise ModelError(f"{path}: a {kind} adapter cannot be merged into the weights", [Problem(
            str(path), f"peft's {kind.lower().replace('_', ' ')} keeps its virtual tokens outside the model's "
                       "weights: there is nothing to merge them into",
            f"serve it with its base model (glmport infer {path}, or peft's PeftModel.from_pretrained); "
            "P-Tuning v2 that merges is ChatGLM2/ChatGLM3's own prefix encoder (peft_type PREFIX_TUNING on a "
            "ChatGLM3 remote-code model)")])
    log.info("merging the %s adapter into the base weights (fp32)", kind)
    return model.merge_and_unload(), "adapter"


def _config_json(bundle, content: str, dtype_name: str) -> dict:
    info = bundle.loaded.info
    config = json.loads((info.path / "config.json").read_text(encoding="utf-8"))
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype" if info.kind == "remote" else "dtype"]
    for key in keys:
        config[key] = dtype_name
    if content == "prefix-encoder":
        model_config = bundle.model.config
        config["pre_seq_len"] = model_config.pre_seq_len
        config["prefix_projection"] = bool(getattr(model_config, "prefix_projection", False))
    return config


def _generation_config(bundle) -> dict:
    file = bundle.loaded.info.path / "generation_config.json"
    config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    config["eos_token_id"] = list(bundle.template.stop_token_ids)
    config["pad_token_id"] = bundle.template.pad_token_id
    return config


def export(path: Path, out: Path, bundle, *, merge: bool, dtype: str | None, max_shard_size: str = "5GB",
           force: bool = False) -> Exported:
    """Write the loaded result ``bundle`` (:func:`glmport.infer.load_for_inference` of ``path``, in fp32)
    as a model folder at ``out``."""
    import torch
    from huggingface_hub import save_torch_state_dict

    path, out = Path(path).resolve(), Path(out).resolve()
    info = bundle.loaded.info
    check_out_dir(out, force, [path, info.path])
    content = (bundle.result or {}).get("content", "model")
    if content in ("adapter", "prefix-encoder") and not merge:
        raise ModelError(f"{path}: a{'n' if content == 'adapter' else ''} {content} needs --merge", [Problem(
            "--merge", f"{path} holds a trained {content}, not a whole model",
            "pass --merge to write it together with its base model's weights")])
    shard_bytes = parse_shard_size(max_shard_size)
    model, content = _merged_model(bundle, path)
    source_dtype = json.loads((info.path / "config.json").read_text(encoding="utf-8")).get("torch_dtype")
    dtype_name = DTYPES[dtype] if dtype else (source_dtype if source_dtype in DTYPES.values() else "float32")
    torch_dtype = getattr(torch, dtype_name)
    config = _config_json(bundle, content, dtype_name)
    compat_module, tokenizer_config, compat_ids = _compat_layer(bundle, config)

    state = {name: (t.detach().to("cpu", dtype=torch_dtype) if t.is_floating_point() else t.detach().to("cpu"))
             for name, t in model.state_dict().items()}
    try:
        staging = staging_dir(out)
    except OSError as exc:
        raise write_failed(exc, out) from exc
    try:
        save_torch_state_dict(state, str(staging), max_shard_size=shard_bytes, metadata={"format": "pt"})
        del state
        files = sorted(p.name for p in staging.iterdir())
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps(_generation_config(bundle), indent=2) + "\n")
        files += ["config.json", "generation_config.json"]
        files += _copy_folder_files(info.path, staging)
        if compat_module is not None:
            (staging / "glmport_compat.py").write_text(compat_module, encoding="utf-8")
            files.append("glmport_compat.py")
        if tokenizer_config is not None:
            (staging / "tokenizer_config.json").write_text(
                json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        record = {
            "exported_from": str(path), "base_model": str(info.path), "content": content,
            "method": (bundle.result or {}).get("method"), "merged": content == "adapter",
            "model_kind": info.kind, "model_family": info.family, "template": bundle.template.name,
            "dtype": dtype_name, "compat_patches": compat_ids,
            # a QLoRA adapter trained on a 4-bit base; it is merged into the full-precision weights
            "trained_quantization": (bundle.result or {}).get("quantization", "none"),
        }
        (staging / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        publish(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_failed(exc, out) from exc
        raise
    notes = []
    if compat_ids:
        notes.append(f"remote code with {len(compat_ids)} compat patches written in (glmport_compat.py): "
                     f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True) needs no glmport")
    return Exported(out, content, sorted(set(files)), notes, record)
