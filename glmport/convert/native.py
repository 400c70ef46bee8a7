"""``glmport convert SRC OUT --to native``: a remote-code ChatGLM checkpoint as a transformers ``GlmForCausalLM``.

SRC is a ChatGLM2-6B, ChatGLM3-6B or GLM-4-9B-chat folder (model_type ``chatglm``): a download, a folder
written by ``glmport export``, or a full-SFT result of ``glmport train``. OUT needs no ``trust_remote_code``:
stock tools (vLLM, TGI, llama.cpp's converter, LLaMA-Factory) load it as transformers' own GLM model.

In order, nothing written until every check has passed:

1. config.json: what the native class cannot express is refused with the reason (ChatGLM-6B's 2D
   positions, LayerNorm, biases where GLM has none, a P-Tuning prefix encoder, an adapter);
2. the model's own tokenizer is loaded (its remote code, patched as ``glmport infer`` does, with the same
   consent rules) and decides the family, with config.json (:func:`glmport.data.templates.detect_family`);
3. the fast tokenizer (:mod:`.tokenizer`) and chat template (:mod:`.chat_template`) are built and verified:
   sample texts must get the model's own ids, and sample conversations (system, several turns, tools) the
   ids of glmport's template module. What still differs (special-token spellings inside text) is found by
   probing and reported; the original tokenizer is kept in ``original_tokenizer/`` for that case;
4. the weights are renamed and split (:mod:`.weights`) one checkpoint file at a time, the config mapped
   (``rope_theta = 10000 * rope_ratio``, read from how the model's code applies it; partial rotary factor
   0.5; eos/pad ids of the family's template), all written to ``OUT.partial`` and renamed to OUT.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from glmport.convert.chat_template import known_differences
from glmport.convert.outdir import check_out_dir, publish, staging_dir, write_failed
from glmport.errors import ModelError, Problem

log = logging.getLogger("glmport")

CONVERT_FILE = "glmport_convert.json"
ORIGINAL_TOKENIZER = "original_tokenizer"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BASE_THETA = 10000.0  # ChatGLM's rotary base before rope_ratio


@dataclass
class Converted:
    path: Path
    family: str
    record: dict
    notes: list[str] = field(default_factory=list)


# --- 1. what the native class can express ----------------------------------------------------------------------

def _refuse(config_file: Path, what: str, why: str, fix: str) -> ModelError:
    return ModelError(f"{config_file.parent}: cannot be converted to transformers' GlmForCausalLM",
                      [Problem(str(config_file), f"{what}: {why}", fix)])


def check_convertible(folder: Path, config: dict) -> None:
    """Refuse what ``GlmForCausalLM`` cannot compute, naming the config key and why."""
    from glmport.modeling import CHATGLM6B_VOCAB, NATIVE_MODEL_TYPES

    file = folder / "config.json"
    model_type = config.get("model_type")
    if model_type in NATIVE_MODEL_TYPES:
        raise _refuse(file, f"model_type {model_type}", "it is a native transformers folder already",
                      "use it as it is: it needs no conversion")
    if model_type != "chatglm":
        raise _refuse(file, f"model_type {model_type!r}", "not a ChatGLM remote-code model",
                      "convert ChatGLM2-6B, ChatGLM3-6B or GLM-4-9B-chat folders (model_type chatglm)")
    vocab = config.get("padded_vocab_size", config.get("vocab_size"))
    if config.get("position_encoding_2d") or vocab == CHATGLM6B_VOCAB:
        raise _refuse(file, "ChatGLM-6B (position_encoding_2d" + (f", vocabulary {vocab})" if vocab else ")"),
                      "its attention takes 2D position ids (a position and a block position per token), its "
                      "prompt attends both ways (a prefix-LM mask) and its blocks use LayerNorm, GELU and a "
                      "scaled residual; GlmForCausalLM has one position per token, a causal mask, RMSNorm and "
                      "SwiGLU, so no renaming of the weights computes the same function",
                      "keep using the remote-code folder (glmport train / infer run it; glmport export writes a "
                      "copy that loads without glmport)")
    expected = {"rmsnorm": True, "post_layer_norm": True, "add_bias_linear": False,
                "apply_residual_connection_post_layernorm": False, "fp32_residual_connection": False}
    why = {"rmsnorm": "GlmForCausalLM normalizes with RMSNorm", "post_layer_norm": "it has a final norm",
           "add_bias_linear": "its output and MLP projections have no bias",
           "apply_residual_connection_post_layernorm": "its residual is taken before the norm",
           "fp32_residual_connection": "it adds residuals in the model's dtype"}
    for key, value in expected.items():
        if key in config and bool(config[key]) != value:
            raise _refuse(file, f"{key}: {json.dumps(config[key])}", why[key],
                          "keep using the remote-code folder: this variant has no native counterpart")
    if config.get("pre_seq_len"):
        raise _refuse(file, f"pre_seq_len: {config['pre_seq_len']}", "the folder carries a P-Tuning v2 prefix "
                      "encoder, which is ChatGLM remote code of its own (GlmForCausalLM has none)",
                      "convert the base model; serve the P-Tuning result with its remote-code folder "
                      "(glmport export RESULT OUT --merge)")


def _check_source(src: Path) -> None:
    from glmport.train.outputs import RESULT_FILE

    result_file = src / RESULT_FILE
    if not (src / "config.json").is_file():
        adapter = result_file.is_file() or (src / "adapter_config.json").is_file()
        raise ModelError(f"{src}: not a model folder (no config.json)", [Problem(
            str(src), "a trained adapter or prefix, not a whole model" if adapter else "no config.json here",
            f"merge it with its base model first: glmport export {src} MERGED --merge, then glmport convert MERGED "
            "OUT --to native" if adapter else "give a ChatGLM2-6B, ChatGLM3-6B or GLM-4-9B-chat model folder")])
    if result_file.is_file():
        content = json.loads(result_file.read_text(encoding="utf-8")).get("content")
        if content != "full-model":
            raise ModelError(f"{src}: a glmport train result holding a {content}", [Problem(
                str(result_file), f"content: {content}; only a full model (SFT) converts as it is",
                f"glmport export {src} MERGED --merge first, then glmport convert MERGED OUT --to native")])


# --- 4. config ----------------------------------------------------------------------------------------------------

_BASE_SCALED = re.compile(r"base\s*=\s*base\s*\*\s*self\.rope_ratio")
_POSITIONS_SCALED = re.compile(r"\)\s*/\s*self\.rope_ratio")


def rope_parameters(config: dict, modeling_text: str) -> tuple[dict, str]:
    """transformers ``rope_parameters`` for a ChatGLM config, and how they were derived.

    ``rope_ratio`` means what the model's code does with it: GLM-4 and ChatGLM3-32k/128k multiply the rotary
    base (``rope_theta = 10000 * rope_ratio``; transformers' own conversion script reads it from the wrong
    object and writes 10000), ChatGLM2-32k divides the positions (linear scaling by ``rope_ratio``). Code
    that never reads it leaves the base at 10000. ChatGLM rotates the first half of each head."""
    ratio = config.get("rope_ratio")
    common = {"partial_rotary_factor": 0.5}
    if ratio in (None, 1, 1.0):
        said = "no rope_ratio" if ratio is None else "rope_ratio 1"
        return {"rope_type": "default", "rope_theta": BASE_THETA, **common}, f"rope_theta 10000 ({said})"
    if _BASE_SCALED.search(modeling_text):
        theta = BASE_THETA * float(ratio)
        return ({"rope_type": "default", "rope_theta": theta, **common},
                f"rope_theta {theta:g} = 10000 x rope_ratio {ratio:g} (modeling_chatglm.py scales the base)")
    if _POSITIONS_SCALED.search(modeling_text):
        return ({"rope_type": "linear", "factor": float(ratio), "rope_theta": BASE_THETA, **common},
                f"linear rope scaling by rope_ratio {ratio:g} (modeling_chatglm.py divides the positions)")
    if "rope_ratio" not in modeling_text:
        return ({"rope_type": "default", "rope_theta": BASE_THETA, **common},
                f"rope_theta 10000: config.json has rope_ratio {ratio:g}, but modeling_chatglm.py never reads it")
    raise ModelError("cannot tell how this model applies rope_ratio", [Problem(
        "modeling_chatglm.py", f"it reads rope_ratio ({ratio}) but neither scales the rotary base nor the positions "
                               "the way the known revisions do", "report this model folder to glmport")])


def native_config(config: dict, *, template, modeling_text: str, dtype_name: str):
    """The ``GlmConfig`` of a remote-code ChatGLM ``config``; eos/pad ids from the family's ``template``."""
    from transformers import GlmConfig

    heads = config["num_attention_heads"]
    kv_heads = config["multi_query_group_num"] if config.get("multi_query_attention") else heads
    rope, rope_note = rope_parameters(config, modeling_text)
    native = GlmConfig(
        vocab_size=config["padded_vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=config.get("kv_channels") or config["hidden_size"] // heads,
        max_position_embeddings=config["seq_length"],
        rms_norm_eps=config.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(config.get("add_qkv_bias", True)),
        attention_dropout=config.get("attention_dropout", 0.0),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        pad_token_id=template.pad_token_id,
        eos_token_id=list(template.stop_token_ids),
        bos_token_id=None,
        rope_parameters=rope,
        dtype=dtype_name,
    )
    native.architectures = ["GlmForCausalLM"]
    return native, rope_note


# --- 4. weights ---------------------------------------------------------------------------------------------------

def weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in dict.fromkeys(weight_map.values())]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise ModelError(f"{folder}: no weights", [Problem(
        str(folder), "no model.safetensors, pytorch_model.bin or an index of shards",
        "give the complete model folder, weights included")])


def _tensors(path: Path):
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()
            for name in names:
                yield name, handle.get_tensor(name)
    else:  # weights_only: nothing in the pickle is executed
        yield from torch.load(str(path), map_location="cpu", weights_only=True, mmap=True).items()


def convert_weights(src: Path, staging: Path, config: dict, native, torch_dtype=None) -> list[str]:
    """Rename and split every checkpoint file of ``src`` into ``staging`` (one output file per input file)."""
    from safetensors.torch import save_file

    from glmport.convert.weights import AttentionShape, expected_native_names, remote_to_native

    shape = AttentionShape(native.num_attention_heads, native.num_key_value_heads, native.head_dim)
    files = weight_files(src)
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)])
    weight_map, total, dropped = {}, 0, []
    for path, name in zip(files, names):
        out = {}
        for remote, tensor in _tensors(path):
            converted = remote_to_native(remote, tensor, shape, source=str(path))
            if not converted:
                dropped.append(remote)
            for native_name, value in converted.items():
                if native_name in weight_map or native_name in out:
                    raise ModelError(f"{path}: {remote} appears twice in the checkpoint")
                if torch_dtype is not None and value.is_floating_point():
                    value = value.to(torch_dtype)
                out[native_name] = value.contiguous()
                total += value.numel() * value.element_size()
        save_file(out, str(staging / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, name))
        log.info("converted %s -> %s (%d tensors)", path.name, name, len(out))
    missing = expected_native_names(native.num_hidden_layers, native.attention_bias) - set(weight_map)
    if missing:
        raise ModelError(f"{src}: the checkpoint lacks weights GlmForCausalLM needs", [Problem(
            str(src), f"{len(missing)} missing, e.g. {', '.join(sorted(missing)[:3])}",
            "give the complete checkpoint (every shard its index names)")])
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dropped


# --- 3. tokenizer and chat template ---------------------------------------------------------------------------

def _chat_template(family: str, source, dummy_prefix: bool) -> tuple[str, str]:
    from glmport.convert import chat_template

    if family == "chatglm3":
        return chat_template.chatglm3(dummy_prefix=dummy_prefix), "glmport's ChatGLM3 layout"
    if family == "chatglm2":
        return chat_template.chatglm2(dummy_prefix=dummy_prefix), "glmport's ChatGLM2 layout"
    own = getattr(source, "chat_template", None)
    if isinstance(own, str) and own:
        return own, "the model's own chat_template"
    return chat_template.glm4_from_python(source), "learned from the model's Python apply_chat_template"


def verify_chat_template(fast, source, template, family: str) -> list[str]:
    """Render :func:`~.chat_template.sample_conversations` both ways; return their names, raise on a mismatch."""
    from glmport.convert.chat_template import as_dicts, expected_ids, sample_conversations

    checked, wrong = [], []
    for name, messages in sample_conversations(family):
        want, prompt = expected_ids(template, messages)
        got = fast.apply_chat_template(as_dicts(messages), add_generation_prompt=prompt, tokenize=True,
                                       return_dict=False)
        checked.append(name)
        if list(got) != list(want):
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            wrong.append(Problem(f"conversation {name!r}", f"ids differ from position {at}: chat template "
                                 f"{list(got)[at:at + 8]}, glmport's {family} template {list(want)[at:at + 8]}"))
    if wrong:
        raise ModelError("the converted chat template does not reproduce the prompt layout", wrong + [Problem(
            "glmport", "this is a bug in glmport convert", "report it with the model folder's revision")])
    return checked


def _tokenizer_config(staging: Path, chat_template: str, max_length: int) -> None:
    """tokenizer_config.json readable by transformers 4.x too (vLLM, TGI pin older releases), chat template in."""
    file = staging / "tokenizer_config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if extra:
        config["additional_special_tokens"] = list(extra)
    config["chat_template"] = chat_template
    config["model_max_length"] = max_length
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (staging / "chat_template.jinja").unlink(missing_ok=True)  # one copy of the template: tokenizer_config.json


def _keep_original_tokenizer(src: Path, staging: Path, session, source) -> None:
    """The model's own tokenizer, for text whose ids differ: its files, and the compat patches as plain code
    in front of it (as glmport export writes them), so that it loads without glmport."""
    from glmport.convert.standalone import module_source, redirect_auto_map
    from glmport.patching.manifest import REMOTE_FILES

    target = staging / ORIGINAL_TOKENIZER
    target.mkdir()
    shutil.copyfile(src / REMOTE_FILES["tokenization"], target / REMOTE_FILES["tokenization"])
    vocab = Path(source.vocab_file)
    shutil.copyfile(vocab, target / vocab.name)
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    exported: dict[str, list[str]] = {}
    config["auto_map"] = redirect_auto_map(config.get("auto_map", {}), exported)
    patches = [e.patch for e in session.plan.to_apply if e.set_name == "compat" and e.patch.file == "tokenization"]
    revision = session.plan.files["tokenization"].effective_revision
    (target / "glmport_compat.py").write_text(module_source(
        patches, session.plan.family, {"tokenization": revision}, f"the original tokenizer of {src.name}", exported))
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# --- the command ----------------------------------------------------------------------------------------------

@dataclass
class _Tokenizer:
    """What step 3 made and checked: the family, its template module, the fast tokenizer and chat template."""

    family: str
    template: object  # glmport.data.templates.Template over the model's own tokenizer
    built: object  # .tokenizer.FastTokenizer
    chat_template: str
    origin: str
    differences: list[str]
    conversations: list[str]


def _tokenizer(source, config: dict) -> _Tokenizer:
    """Steps 2 and 3 with the model's own tokenizer ``source``: everything is verified before anything is written."""
    from glmport.convert import tokenizer as fast_tokenizer
    from glmport.data.templates import detect_family, get_template

    family = detect_family(source, config).family
    template = get_template(family, source, config=config)
    built = fast_tokenizer.build(source, family)
    chat_template, origin = _chat_template(family, source, built.dummy_prefix)
    built.tokenizer.chat_template = chat_template
    wrong = fast_tokenizer.mismatches(built.tokenizer, source, fast_tokenizer.SAMPLE_TEXTS)
    if wrong:
        raise ModelError("the converted tokenizer does not reproduce the model's own", [Problem(
            f"text {text!r}", f"model's ids {want[:12]}, converted {got[:12]}") for text, want, got in wrong[:5]]
            + [Problem("glmport", "this is a bug in glmport convert", "report it with the model's tokenizer")])
    return _Tokenizer(family, template, built, chat_template, origin,
                      fast_tokenizer.differences(built.tokenizer, source),
                      verify_chat_template(built.tokenizer, source, template, family))


def convert_to_native(src: Path, out: Path, *, backend, patch_sets, consent, dtype: str | None = None,
                      force: bool = False) -> Converted:
    """Convert ``src`` into a new native folder ``out`` (see the module docs for the steps)."""
    from glmport.modeling import inspect_model_dir, preflight
    from glmport.patching.session import patch_session

    src, out = Path(src).resolve(), Path(out).resolve()
    check_out_dir(out, force, [src])
    _check_source(src)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    check_convertible(src, config)
    info = inspect_model_dir(src)
    preflight(info, backend, "infer", patch_sets, consent)
    session = patch_session(info, backend, "infer", registry=patch_sets, allow_unverified=consent.allow_unverified)
    try:
        tokenizer_cls = session.remote_classes[2]
        if tokenizer_cls is None:
            raise ModelError(f"{src}: no tokenizer (tokenizer_config.json with an auto_map AutoTokenizer entry)",
                             [Problem(str(src), "the converted folder needs the model's tokenizer",
                                      "copy the tokenizer files of the model download into the folder")])
        source = tokenizer_cls.from_pretrained(str(src))
        checked = _tokenizer(source, config)
        dtype_name = DTYPES[dtype] if dtype else config.get("torch_dtype") or "float32"
        native, rope_note = native_config(config, template=checked.template, dtype_name=dtype_name,
                                          modeling_text=(src / "modeling_chatglm.py").read_text(encoding="utf-8"))
        record = {
            "converted_from": str(src), "family": checked.family, "architecture": "GlmForCausalLM",
            "source_code": {k: f.revision for k, f in session.plan.files.items() if f.sha256},
            "rope": rope_note, "dtype": dtype_name,
            "tokenizer": {"built_from": checked.built.vocabulary, "differences": checked.differences,
                          "original": ORIGINAL_TOKENIZER if checked.differences else None},
            "chat_template": {"from": checked.origin, "verified_conversations": checked.conversations,
                              "differences": known_differences(checked.family, checked.built.dummy_prefix)},
        }
        _write(src, out, config, native, checked, record, dtype,
               lambda staging: _keep_original_tokenizer(src, staging, session, source))
    finally:
        session.undo()
    notes = []
    if checked.differences:
        notes.append(f"the fast tokenizer differs from the model's own only on text that spells a special token "
                     f"(see {CONVERT_FILE}); {ORIGINAL_TOKENIZER}/ keeps the original (trust_remote_code) for that")
    return Converted(out, checked.family, record, notes)


def _write(src: Path, out: Path, config: dict, native, checked: _Tokenizer, record: dict, dtype: str | None,
           keep_original) -> None:
    """Step 4: everything into OUT.partial, renamed to OUT when complete; a failed write leaves nothing."""
    import torch

    try:
        staging = staging_dir(out)
    except OSError as exc:
        raise write_failed(exc, out) from exc
    try:
        dropped = convert_weights(src, staging, config, native, getattr(torch, DTYPES[dtype]) if dtype else None)
        record["dropped_tensors"] = sorted(set(dropped))
        native.save_pretrained(str(staging))
        generation = {"eos_token_id": list(checked.template.stop_token_ids),
                      "pad_token_id": checked.template.pad_token_id}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        checked.built.tokenizer.save_pretrained(str(staging))
        _tokenizer_config(staging, checked.chat_template, config["seq_length"])
        if checked.differences:
            keep_original(staging)
        (staging / CONVERT_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        publish(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_failed(exc, out) from exc
        raise
