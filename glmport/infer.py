"""Generation with a base model or a ``glmport train`` result, on any backend, with the infer-mode patch set.

* :func:`load_for_inference` - a model folder, a result (``OUTPUT_DIR/final``: LoRA or prefix-tuning adapter,
  ChatGLM3 prefix encoder, full model), a bare peft adapter folder or an adapter checkpoint; ``base`` points an
  adapter at its base model when the base has moved (adapters pin an absolute path).
* :func:`generate_reply` - the next reply after a conversation, streamed token by token through
  ``on_text`` when given; :func:`generate_ids` - many prompts in one left-padded batch.
* :func:`read_reply` - generated ids as a :class:`Reply`: the answer text, the assistant turns for the history,
  the tool call if the model made one (the family's format, :mod:`glmport.toolcalls`).

Generation is transformers' ``generate`` (greedy unless a temperature is given), stopped by the family's stop
tokens: the template's (read from the tokenizer: ``</s>``/``<|endoftext|>``, ``<|user|>``, ``<|observation|>``)
and any the model's generation config adds. Every forward runs through the backend (inputs narrowed, compute
context, and the 64-bit guard when asked: see :mod:`glmport.train.guarded`). Streaming is a
``BaseStreamer`` fed by ``generate`` in this thread, so the guard and ``no_grad`` cover it as they cover the rest,
and the streamed text is by construction a prefix of what :func:`read_reply` makes of the finished ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmport.errors import ModelError, Problem
from glmport.train.outputs import CHECKPOINT, CHECKPOINT_MARKER, RESULT_DIR, RESULT_FILE, WRITING_MARKER

log = logging.getLogger("glmport")
INCOMPLETE = ".incomplete"  # the suffix glmport gives a checkpoint cut short
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class InferenceModel:
    model: Any
    tokenizer: Any
    template: Any
    backend: Any
    loaded: Any  # glmport.modeling.LoadedModel of the base
    description: str
    path: Path | None = None  # what was asked for (model folder or result)
    result: dict | None = None  # its glmport_result.json (or what a bare adapter implies)
    # what the 64-bit guard saw over every generation with this model (glmport.guard.GuardReport)
    guard: Any = field(default_factory=lambda: _new_guard_report())

    @property
    def family(self) -> str:
        return self.template.name

    def context_length(self) -> int | None:
        """How many positions the model takes (prompt and reply together), from its config."""
        config = getattr(self.model, "config", None)
        for name in ("seq_length", "max_position_embeddings", "max_sequence_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def guard_summary(self, mode: str | None) -> dict:
        return {"mode": mode, "ops_checked": self.guard.ops_checked, "leaks": [str(leak) for leak in self.guard.leaks]}

    def close(self) -> None:
        """Put the foreign code back as it was (an in-process caller may load another model afterwards)."""
        if self.loaded.patches is not None:
            self.loaded.patches.undo()


def _new_guard_report():
    from glmport.guard import GuardReport

    return GuardReport()


def _merge_guard(into, report) -> None:
    into.ops_checked += report.ops_checked
    known = {(leak.op, leak.site) for leak in into.leaks}
    into.leaks.extend(leak for leak in report.leaks if (leak.op, leak.site) not in known)


# --- what a folder holds --------------------------------------------------------------------------------------

def _read_json(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{file}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{file}: expected a JSON object")
    return value


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


def _adapter_base(path: Path) -> str | None:
    try:
        return json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def _from_checkpoint(path: Path, step: int, base: Path | None) -> dict:
    """A LoRA / prefix-tuning checkpoint loads like a result when its base model is still where it was
    trained from (or ``base`` says where it is now); anything else is explained: how to resume from it, or
    where the result is."""
    run = path.parent
    shown = f"step {step}" if step >= 0 else "step unknown"
    head = f"{path}: a training checkpoint ({shown}) of {run}, not a model folder or a training result"
    use = (f"to continue training from it: glmport train CONFIG --resume {step if step >= 0 else 'N'} "
           f"(with the run's config); to generate: glmport infer {run / RESULT_DIR}"
           + ("" if (run / RESULT_DIR / RESULT_FILE).is_file() else " once the run has finished"))
    if path.name.endswith(INCOMPLETE) or (path / WRITING_MARKER).exists():
        raise ModelError(head, [Problem(str(path), "it was cut short while being written: its files may be partial",
                                        f"use a complete checkpoint-N of {run}, or {run / RESULT_DIR}")])
    adapter_config = path / ADAPTER_CONFIG
    if not adapter_config.is_file():
        raise ModelError(head, [Problem(str(path), "it holds the Trainer's state, not a result glmport infer can load",
                                        use)])
    named = _adapter_base(path)
    if base is None and (not named or not (Path(named) / "config.json").is_file()):
        said = f"names the base model {named}, which is not a model folder here" if named else "names no base model"
        raise ModelError(head, [Problem(str(adapter_config), f"its adapter_config.json {said}",
                                        f"{use}; or pass --base DIR with the base model's folder")])
    log.info("%s is a training checkpoint (step %s) holding an adapter of %s: loading it like a result "
             "(for the run's final result: glmport infer %s)", path, shown.split()[-1], base or named,
             run / RESULT_DIR)
    return {"content": "adapter", "base_model": named}


@dataclass
class _Source:
    """What ``path`` is: a model folder (``result`` None) or something trained on a base model."""

    result: dict | None
    base_dir: Path
    named_by: str = ""  # the file that names the base model, for messages


def _resolve(path: Path, base: Path | None) -> _Source:
    result = _read_result(path)
    if result is None and (path / "config.json").is_file():
        if base is not None:
            raise ModelError("--base applies to adapters only", [Problem(
                "--base", f"{path} is a model folder (config.json), not an adapter", "leave out --base")])
        return _Source(None, path)
    if result is None and (path / ADAPTER_CONFIG).is_file() and _checkpoint_step(path) is None:
        # a bare peft adapter (PeftModel.save_pretrained, or an upstream finetune_hf.py LoRA output)
        result = {"content": "adapter", "base_model": _adapter_base(path)}
    if result is None:
        step = _checkpoint_step(path)
        if step is None:
            raise ModelError(f"{path}: not a model folder (no config.json), a glmport train result (no {RESULT_FILE}), "
                             f"a peft adapter (no {ADAPTER_CONFIG}) or a training checkpoint; give a model folder or "
                             "OUTPUT_DIR/final")
        result = _from_checkpoint(path, step, base)
    if result.get("content") == "full-model":
        if base is not None:
            raise ModelError("--base applies to adapters only", [Problem(
                "--base", f"{path} holds a full model (trained with SFT): it needs no base model", "leave out --base")])
        return _Source(result, path)
    adapter = path / ADAPTER_CONFIG
    named_by = str(adapter) if adapter.is_file() else str(path / RESULT_FILE)
    if base is not None:
        return _Source(result, Path(base).resolve(), "--base")
    named = result.get("base_model") or (_adapter_base(path) if adapter.is_file() else None)
    if not named or not (Path(named) / "config.json").is_file():
        key = "base_model_name_or_path" if adapter.is_file() else "base_model"
        said = f"its base model {named} is not there (no config.json)" if named else "it names no base model"
        raise ModelError(f"{path}: cannot find the base model of this adapter", [Problem(
            named_by, f"{key}: {said}; adapters pin the folder they were trained on",
            "pass --base DIR with the base model's folder (the same model the adapter was trained on)")])
    return _Source(result, Path(named), named_by)


def _read_result(path: Path) -> dict | None:
    return _read_json(path / RESULT_FILE)


def _check_base(path: Path, source: _Source, info) -> None:
    """A base given with --base must be the kind and family the result was trained on."""
    result = source.result or {}
    for key, have in (("model_kind", info.kind), ("model_family", info.family)):
        trained = result.get(key)
        if trained and trained != have:
            raise ModelError(f"--base {source.base_dir} does not fit {path}", [Problem(
                "--base", f"the result was trained on a {trained} model ({key} in {path / RESULT_FILE}), "
                          f"{source.base_dir} is {have}", f"give the {trained} base model the result was trained on")])


def load_for_inference(path: Path, backend, *, patch_sets, allow_unverified: bool = False,
                       dtype: str = "auto", consent=None, base: Path | None = None,
                       quantization: str | None = None) -> InferenceModel:
    """``path``: a model folder, the ``final`` folder of a training run (adapter, prefix encoder or
    full model; the base model is found through its glmport_result.json), a peft adapter folder, or a
    checkpoint of a run that holds an adapter. ``base`` replaces the base model the result names (it moved).
    ``patch_sets`` is the caller's ``manager.patch_sets``; ``consent``
    (:class:`glmport.modeling.RemoteCodeConsent`) says which remote code may run. ``quantization``: None loads
    a QLoRA result's base as it trained (:func:`_quantization`); ``"none"`` in full precision (export merges)."""

    from glmport.data.templates import get_template
    from glmport.modeling import inspect_model_dir, load_model, resolve_dtype
    from glmport.train.methods import prefix_config_overrides
    from glmport.train.quantization import bitsandbytes_config

    path = Path(path).resolve()
    if not path.is_dir():
        raise ModelError(f"{path}: no such folder" if not path.exists() else
                         f"{path}: a file; glmport takes a model folder or OUTPUT_DIR/final")
    if base is not None and not (Path(base) / "config.json").is_file():
        raise ModelError("--base is not a model folder", [Problem("--base", f"{base}: no config.json there",
                                                                   "give the folder of the adapter's base model")])
    source = _resolve(path, base)
    result = source.result
    content = result["content"] if result else "model"
    info = inspect_model_dir(source.base_dir, (result or {}).get("model_family", "auto")
                             if base is None else "auto")
    if base is not None:
        _check_base(path, source, info)
    torch_dtype, _ = resolve_dtype(dtype, backend, info.family, "lora")
    overrides = prefix_config_overrides(info, result.get("peft_config")) if content == "prefix-encoder" else {}
    if overrides:
        overrides["use_cache"] = True
    bits = _quantization(path, result, backend) if quantization is None else quantization
    loaded = load_model(info, backend, mode="infer", dtype=torch_dtype, patch_sets=patch_sets,
                        allow_unverified=allow_unverified, config_overrides=overrides, consent=consent,
                        quantization_config=bitsandbytes_config(bits, torch_dtype))
    try:
        model = _with_result(loaded.model, content, path, backend, source)
        template = get_template((result or {}).get("template", "auto"), loaded.tokenizer,
                                combine=bool((result or {}).get("combine", False)), config=info.config)
    except Exception:
        if loaded.patches is not None:
            loaded.patches.undo()
        raise
    described = f"{info.kind} {info.family} model {source.base_dir}" + (f" + {content} {path}" if result else "")
    return InferenceModel(model, loaded.tokenizer, template, backend, loaded, described, path, result)


def _quantization(path: Path, result: dict | None, backend) -> str:
    """A QLoRA result's base loads in the bits it trained in (the weights its adapter saw, in the memory its
    user has) where the backend and bitsandbytes allow; elsewhere in full precision, with a warning."""
    from glmport.train.quantization import support_problem

    trained = (result or {}).get("quantization", "none")
    problem = support_problem(trained, backend, str(path / RESULT_FILE), key="quantization")
    if problem is None:
        if trained != "none":
            log.info("loading the base model in %s, as the result trained on it (QLoRA)", trained)
        return trained
    log.warning("%s was trained on a %s base (QLoRA); loading the base in full precision instead: %s",
                path, trained, problem.what)
    return "none"


def _with_result(model, content: str, path: Path, backend, source: _Source):
    """The base model with the trained part of a result on top, on the backend's device, in eval mode."""
    try:
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
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or module names of another model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: the trained {content} does not fit the base model {source.base_dir}", [Problem(
            source.named_by or str(path), first,
            "give the base model the result was trained on" + (" (--base)" if source.named_by == "--base" else
                                                               ", with --base DIR if it moved"))]) from None
    if getattr(model, "hf_quantizer", None) is not None:  # bitsandbytes placed it when it loaded; 8-bit cannot move
        return model.eval()
    return model.to(backend.device(0)).eval()


# --- generation -----------------------------------------------------------------------------------------------

@dataclass
class GenerationSettings:
    """How replies are generated. Greedy unless ``temperature`` > 0; ``top_p``/``top_k`` apply to sampling."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def as_dict(self) -> dict:
        shown = {"max_new_tokens": self.max_new_tokens, "decoding": "sampling" if self.sampling else "greedy",
                 "repetition_penalty": self.repetition_penalty}
        if self.sampling:
            shown.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)
        return shown


def stop_token_ids(bundle: InferenceModel) -> list[int]:
    """The family's stop tokens (the template reads them from the tokenizer) and any more the model's
    generation config names: a reply ends at the first of them."""
    ids = list(bundle.template.stop_token_ids)
    configured = getattr(getattr(bundle.model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, list) else [configured]:
        if isinstance(token, int) and token not in ids:
            ids.append(token)
    return ids


def generation_config(bundle: InferenceModel, settings: GenerationSettings):
    from transformers import GenerationConfig

    options = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=stop_token_ids(bundle),
                   pad_token_id=bundle.template.pad_token_id, repetition_penalty=settings.repetition_penalty,
                   do_sample=settings.sampling)
    if settings.sampling:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
    return GenerationConfig(**options)


def generate_ids(bundle: InferenceModel, prompts: list[list[int]], settings: GenerationSettings, *,
                 guard_mode: str | None = None, streamer=None) -> list[list[int]]:
    """Generate after each prompt, all in one batch; return each row's new ids up to and including its stop
    token (or ``max_new_tokens`` of them).

    Prompts are left-padded with the family's pad id, with an attention mask and position ids that start at 0
    at each prompt's first real token, as the ChatGLM tokenizers pad for generation: a prompt gets the same
    positions in a batch as on its own."""
    import torch

    from glmport.train.guarded import guarded_forward

    width = max(len(p) for p in prompts)
    prefix = peft_prefix_length(bundle.model, bundle.loaded.info.kind)
    batch = generation_batch(prompts, bundle.template.pad_token_id, prefix)
    device = bundle.backend.device(0)
    batch = {k: v.to(device) for k, v in bundle.backend.coerce(batch).items()}  # narrowed before it is moved
    if settings.seed is not None:
        bundle.backend.seed(settings.seed)
    stops = set(stop_token_ids(bundle))
    model = bundle.model
    if prefix:
        model, batch = with_prefix_cache(bundle.model, bundle.backend, batch)
    with torch.no_grad(), guarded_forward(bundle.model, bundle.backend, guard_mode,
                                          lambda report: _merge_guard(bundle.guard, report)):
        output = model.generate(**batch, generation_config=generation_config(bundle, settings), streamer=streamer)
    rows = []
    for row in output[:, prefix + width:].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), None)
        rows.append(row if end is None else row[: end + 1])
    return rows


def generation_batch(prompts: list[list[int]], pad: int, prefix: int = 0) -> dict:
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` (CPU tensors) for ``prompts``: each
    prompt's positions start at 0 at its first real token, as the ChatGLM tokenizers pad for generation, so
    a prompt gets the same positions in a batch as on its own. With a peft prefix of ``prefix`` virtual
    tokens the rows start with that many attended placeholders and the real tokens' positions start after
    them, as peft's forward places them (:func:`with_prefix_cache` puts the prefix there)."""
    import torch

    width = max(len(p) for p in prompts)
    return {
        "input_ids": torch.tensor([[pad] * (prefix + width - len(p)) + list(p) for p in prompts]),
        "attention_mask": torch.tensor([[1] * prefix + [0] * (width - len(p)) + [1] * len(p) for p in prompts]),
        "position_ids": torch.tensor([[0] * (prefix + width - len(p)) + list(range(prefix, prefix + len(p)))
                                      for p in prompts]),
    }


def peft_prefix_length(model, model_kind: str) -> int:
    """The virtual tokens of a peft prefix-tuning adapter on a native (transformers) model, else 0.

    peft 0.21 hands its prefix to generate() as ``past_key_values`` while transformers 5 generation carries the
    cache as ``cache``: the model then uses generate()'s empty cache and drops the prefix (with a FutureWarning),
    and the prefix's extra attention-mask columns shift a left-padded batch. Such adapters generate here from
    their prefix as a cache filled beforehand, which the base model's own generate() continues. (Remote-code
    models take their cache under the old name and generate through peft as they are.)"""
    config = getattr(model, "active_peft_config", None)
    kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "")))
    if kind != "PREFIX_TUNING" or model_kind != "native":
        return 0
    return int(config.num_virtual_tokens)


def with_prefix_cache(model, backend, batch: dict):
    """(the base model under the peft ``model``, ``batch`` with the prefix as its cache): the cache covers the
    first :func:`peft_prefix_length` positions of ``input_ids`` (placeholders, attended, positions 0), so
    generation starts at the prompt, whose positions start after the prefix."""
    import inspect

    from glmport.train.guarded import innermost_model

    base = innermost_model(model)
    with backend.compute_context():
        cache = model.get_prompt(batch_size=batch["input_ids"].shape[0])
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return base, dict(batch, **{name: cache})


@dataclass
class Reply:
    """What the model said. ``text`` is the answer as shown (its plain turns, stripped); ``messages`` are the
    assistant turns as they go into the history (a tool call keeps its metadata line and content exactly as
    written); ``ids`` are the generated ids without the stop token, which is ``stop`` (None: the reply was cut
    at ``max_new_tokens``)."""

    text: str
    messages: list = field(default_factory=list)
    tool_call: Any = None  # glmport.toolcalls.ToolCall
    ids: list[int] = field(default_factory=list)
    stop: int | None = None

    @property
    def finish_reason(self) -> str:
        if self.tool_call is not None:
            return "tool_call"
        return "stop" if self.stop is not None else "length"


def read_reply(bundle: InferenceModel, ids: list[int], *, final: bool = True) -> Reply:
    """The :class:`Reply` in generated ``ids`` (a stop token at the end is taken off).

    ChatGLM3 and GLM-4 write each assistant turn as ``metadata \\n content`` and may start another with
    ``<|assistant|>``: an empty metadata line is an answer (its content stripped, as upstream's
    ``process_response`` does), a name is a tool call (:func:`glmport.toolcalls.parse_tool_call`). A family
    without metadata lines answers in plain text. With ``final=False`` (while streaming) a turn whose metadata
    line is not complete yet shows nothing, and trailing white space and incomplete characters are held back,
    so that what is shown never has to be taken back."""
    from glmport.data.records import Message
    from glmport.toolcalls import parse_tool_call, split_metadata

    template, tokenizer = bundle.template, bundle.tokenizer
    ids = list(ids)
    stop = ids.pop() if ids and ids[-1] in stop_token_ids(bundle) else None
    assistant = template.role_ids.get("assistant") if template.reply_metadata else None
    turns: list[list[int]] = [[]]
    for token in ids:
        if token == assistant:
            turns.append([])
        else:
            turns[-1].append(token)
    texts, messages, call = [], [], None
    for index, turn in enumerate(turns):
        last = index == len(turns) - 1
        decoded = _decode_complete(tokenizer, turn) if last and not final else \
            tokenizer.decode(turn, skip_special_tokens=True)
        content = decoded
        if template.reply_metadata:
            if not final and last and "\n" not in decoded:
                break  # the metadata line is not complete yet: an answer or a call?
            metadata, content = split_metadata(decoded)
            parsed = parse_tool_call(template.tool_format, decoded) if metadata and template.tool_format else None
            if parsed is not None:
                messages.append(parsed.message())
                call = parsed  # a call is the reply's outcome only as its last turn, as upstream reads it
                continue
        call = None
        messages.append(Message("assistant", content.strip()))
        texts.append(content.strip() if final or not last else _settled(content.lstrip()))
    return Reply("\n".join(t for t in texts if t), messages if final else [], call, ids, stop)


def _decode_complete(tokenizer, ids: list[int]) -> str:
    """``ids`` decoded without the byte tokens at the end that do not make a whole character yet (at most 3:
    UTF-8 characters are 4 bytes at most). Byte-fallback decoders turn a whole run of byte tokens into U+FFFD
    while its last character is incomplete, so decoding them early would show text that later changes."""
    for cut in range(min(3, len(ids)) + 1):
        text = tokenizer.decode(ids[: len(ids) - cut], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            return text
    return tokenizer.decode(ids, skip_special_tokens=True)


def _settled(text: str) -> str:
    """``text`` without what may still change: trailing white space (the final text is stripped), and all from
    the first undecodable character on (byte-level tokens that are only part of a character so far decode
    as U+FFFD, and how many of those a tokenizer shows depends on the bytes still to come)."""
    return text.split("\ufffd", 1)[0].rstrip()


class ReplyStream:  # generate() only calls put() and end(): transformers' BaseStreamer need not be imported
    """A ``generate`` streamer that calls ``on_text`` with each new piece of the reply's text, as
    :func:`read_reply` reads it: the answer, never a tool call's raw text or a stop token. The pieces joined are
    the final reply's ``text`` (one prompt at a time, as transformers' streamers are)."""

    def __init__(self, bundle: InferenceModel, on_text: Callable[[str], None]):
        self.bundle = bundle
        self.on_text = on_text
        self.ids: list[int] = []
        self.shown = ""
        self._prompt_seen = False
        self.diverged = False  # the tokenizer decoded a prefix differently from the whole (not seen so far)

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self._show(read_reply(self.bundle, self.ids, final=False).text)

    def end(self) -> None:
        self._show(read_reply(self.bundle, self.ids).text)

    def _show(self, text: str) -> None:
        if text.startswith(self.shown):
            if len(text) > len(self.shown):
                self.on_text(text[len(self.shown):])
                self.shown = text
        elif not self.diverged:
            self.diverged = True
            log.debug("streamed text %r is not a prefix of %r", self.shown, text)


def check_context(bundle: InferenceModel, prompts: list[tuple[str, list[int]]], max_new_tokens: int) -> None:
    """Refuse, before generating, prompts that with ``max_new_tokens`` do not fit the model's context: past it
    the model has no positions (a crash deep in its code, or silent garbage). ``prompts`` are (where, ids)."""
    from glmport.errors import DataError

    context = bundle.context_length()
    if context is None:
        return
    over = [(where, len(ids)) for where, ids in prompts if len(ids) + max_new_tokens > context]
    if over:
        config = bundle.loaded.info.path / "config.json"
        raise DataError(
            f"{len(over)} prompt(s) do not fit the model's context of {context} tokens ({config}) with "
            f"--max-new-tokens {max_new_tokens}",
            [Problem(where, f"{length} prompt tokens + {max_new_tokens} new tokens = {length + max_new_tokens}",
                     f"shorten it to at most {context - max_new_tokens} tokens or lower --max-new-tokens"
                     if length < context else f"shorten it to under {context} tokens")
             for where, length in over])


def generate_reply(bundle: InferenceModel, messages, settings: GenerationSettings | None = None, *,
                   guard_mode: str | None = None, on_text: Callable[[str], None] | None = None) -> Reply:
    """The next assistant reply after ``messages`` (glmport.data.records.Message); with ``on_text``, its text is
    handed over piece by piece while it is generated."""
    settings = settings or GenerationSettings()
    prompt = bundle.template.prompt_ids(messages)
    streamer = ReplyStream(bundle, on_text) if on_text is not None else None
    rows = generate_ids(bundle, [prompt], settings, guard_mode=guard_mode, streamer=streamer)
    return read_reply(bundle, rows[0])


def generate_in_batches(bundle: InferenceModel, prompts: list[list[int]], settings: GenerationSettings, *,
                        batch_size: int, guard_mode: str | None = None,
                        progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """:func:`generate_ids` over many prompts, ``batch_size`` at a time, longest first (the largest batch runs
    first, so a batch too big for the device fails at once, and similar lengths share a batch: less padding);
    the rows come back in the prompts' order. ``progress(n)`` is called after each batch of ``n``."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows: list[list[int] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        for index, row in zip(chunk, generate_ids(bundle, [prompts[i] for i in chunk], settings,
                                                  guard_mode=guard_mode)):
            rows[index] = row
        if progress is not None:
            progress(len(chunk))
    return rows  # type: ignore[return-value]


# --- prompt files (glmport infer --file) ----------------------------------------------------------------------

@dataclass
class PromptRecord:
    """One line of a prompt file: where it is, the record as read (echoed in the output), and what to ask."""

    source: str  # "prompts.jsonl:3"
    record: dict
    messages: list  # glmport.data.records.Message, ending with the user's message (or a tool's result)


PROMPT_FORMS = ('a JSON string (the user\'s message); {"prompt": ..., "system"?: ..., "history"?: [[q, a], ...], '
                '"tools"?: [...]}; or {"messages": [{"role", "content"}, ...], "tools"?: [...]} '
                '("conversations" works too) ending with a user message or a tool result')


def read_prompt_file(path: Path, family: str | None) -> list[PromptRecord]:
    """The prompts of a JSON-lines file, as conversations of ``family``'s format (tools declared and tool calls
    written its way); ``family`` None checks the lines only (before a model is loaded). Every bad line is
    reported at once, with its line number."""
    from glmport.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError("prompt file not found", [Problem("--file", f"no such file: {path}", "give a JSON-lines file")])
    records, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            value = json.loads(line)
            record = {"prompt": value} if isinstance(value, str) else value
            records.append(PromptRecord(source, record, _prompt_messages(record, family)))
        except json.JSONDecodeError as exc:
            problems.append(Problem(source, f"invalid JSON: {exc.msg} (column {exc.colno})"))
        except _PromptError as exc:
            problems.append(Problem(source, str(exc)))
    if problems:
        listed = problems[:20]
        listed[-1] = Problem(listed[-1].where, listed[-1].what, f"write each line as {PROMPT_FORMS}")
        raise DataError(f"{path}: {len(problems)} invalid prompt line(s)", listed)
    if not records:
        raise DataError("prompt file is empty", [Problem(str(path), "no prompts in it", f"write {PROMPT_FORMS}")])
    return records


class _PromptError(Exception):
    pass


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise _PromptError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _prompt_messages(record, family: str) -> list:
    from glmport.data.records import Message
    from glmport.toolcalls import format_tool_call, observation_message, tools_message

    if not isinstance(record, dict):
        raise _PromptError(f"expected a string or an object, got {type(record).__name__}")
    tools = record.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise _PromptError("tools: expected an array of tool objects")
    if tools and family is not None and family not in ("chatglm3", "glm4"):
        raise _PromptError(f"tools: the {family} family has no tool format")
    key = "messages" if "messages" in record else "conversations" if "conversations" in record else None
    messages: list = []
    if key is None:
        if "prompt" not in record:
            raise _PromptError(f"no 'prompt', 'messages' or 'conversations' key (keys: {', '.join(record) or 'none'})")
        system = record.get("system")
        if system is not None:
            messages.append(Message("system", _text(system, "system")))
        for index, pair in enumerate(record.get("history") or []):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise _PromptError(f"history[{index}]: expected [question, answer]")
            messages += [Message("user", _text(pair[0], f"history[{index}][0]")),
                         Message("assistant", _text(pair[1], f"history[{index}][1]"))]
        messages.append(Message("user", _text(record["prompt"], "prompt")))
    else:
        items = record[key]
        if not isinstance(items, list) or not items:
            raise _PromptError(f"{key}: expected a non-empty array of messages")
        for index, item in enumerate(items):
            where = f"{key}[{index}]"
            if not isinstance(item, dict):
                raise _PromptError(f"{where}: expected an object")
            role = item.get("role")
            if role == "tool":  # OpenAI's name for a tool's result
                role = "observation"
            if role not in ("system", "user", "assistant", "observation"):
                raise _PromptError(f"{where}.role: {role!r} is not system, user, assistant, observation or tool")
            calls = item.get("tool_calls") if role == "assistant" else None
            if calls:  # OpenAI tool calls, written as the family writes calls
                for number, call in enumerate(calls):
                    function = call.get("function") if isinstance(call, dict) else None
                    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                        raise _PromptError(f"{where}.tool_calls[{number}]: expected {{\"function\": {{\"name\", \"arguments\"}}}}")
                    try:  # (written as glm4 while only checking: any family with tools reads the same)
                        messages.append(format_tool_call(family or "glm4", function["name"],
                                                         function.get("arguments") or {}))
                    except ValueError as exc:
                        raise _PromptError(f"{where}.tool_calls[{number}].arguments: {exc}") from None
                continue
            content = item.get("content")
            if role == "observation" and not isinstance(content, str):
                messages.append(observation_message(content))
                continue
            message = Message(role, _text(content if content is not None else "", f"{where}.content"),
                              metadata=_text(item.get("metadata") or "", f"{where}.metadata"))
            if role == "system" and isinstance(item.get("tools"), list):
                tools = item["tools"]
                message.tools = None
            messages.append(message)
        if messages[-1].role not in ("user", "observation"):
            raise _PromptError(f"{key}: the last message is {messages[-1].role}; the model answers a user message "
                               "or a tool's result")
    if tools and family is not None:
        system = messages[0] if messages and messages[0].role == "system" else None
        declared = tools_message(family, tools, system.content if system else None)
        messages = [declared] + (messages[1:] if system else messages)
    return messages
