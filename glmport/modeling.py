"""Model folders: what they are, and loading them with the right patch set for a backend and mode.

Two kinds of folders:

* **native**: ``model_type: glm`` (transformers' ``GlmForCausalLM``, e.g. glm-4-9b-chat-hf, or a converted
  ChatGLM3) or ``model_type: glm4`` (``Glm4ForCausalLM``, GLM-4-0414, e.g. GLM-4-9B-0414: family glm4);
* **remote**: ``model_type: chatglm`` with ``modeling_chatglm.py`` and friends in the folder (the ChatGLM-6B,
  ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat downloads), loaded with ``trust_remote_code``.

Family (``chatglm``, ``chatglm2``, ``chatglm3`` or ``glm4``) decides the chat template, LoRA targets, patches and dtype rules.
config.json tells it from the vocabulary size (:func:`config_evidence`); ChatGLM2-6B and ChatGLM3-6B share a
config, so for their remote-code folders the revision of the code itself decides (the manifest knows each
file's family), and the tokenizer's own special tokens confirm it (:func:`glmport.data.templates.detect_family`).
ChatGLM-6B (family ``chatglm``: vocabulary 130528, ``position_encoding_2d``) is told apart by its config alone. Patch sets are
applied after the dynamic modules are imported and before the model is built; the user's folder is never
written to.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmport.errors import ModelError, PatchError, Problem

log = logging.getLogger("glmport")

NATIVE_MODEL_TYPES = ("glm", "glm4")  # GlmForCausalLM, Glm4ForCausalLM (GLM-4-0414)
GLM4_VOCAB = 151552  # GLM-4-9B: 151329 tiktoken ranks + specials, padded
SENTENCEPIECE_VOCAB = 65024  # ChatGLM2-6B and ChatGLM3-6B: the same SentencePiece model, padded
CHATGLM6B_VOCAB = 130528  # ChatGLM-6B (v1): icetk

SUPPORTED_FAMILIES = ("chatglm3", "glm4", "chatglm2", "chatglm")
FAMILY_TITLES = {"chatglm": "ChatGLM-6B", "chatglm2": "ChatGLM2-6B", "chatglm3": "ChatGLM3-6B", "glm4": "GLM-4-9B-chat"}


@dataclass(frozen=True)
class ConfigEvidence:
    """What ``config.json`` says about the generation: ``families`` it allows (None: it does not say) and the
    ``facts`` it was read from, for messages and the run's log."""

    families: frozenset[str] | None
    facts: str


def config_evidence(config: dict[str, Any]) -> ConfigEvidence:
    """The families a ``config.json`` allows, from its vocabulary size.

    The vocabulary is what the generations do not share: 130528 (ChatGLM-6B, which also has
    ``position_encoding_2d``), 65024 (ChatGLM2-6B and ChatGLM3-6B: the same SentencePiece model, so the config
    cannot tell these two apart; their tokenizers can), 151552 or more (GLM-4). ``rope_ratio`` is only
    reported: chatglm3-6b-32k has one (50) as GLM-4 does (500), so it proves nothing.
    """
    model_type = config.get("model_type")
    key = "padded_vocab_size" if model_type == "chatglm" and "padded_vocab_size" in config else "vocab_size"
    vocab = config.get(key)
    facts = [f"config.json model_type {model_type}", f"{key} {vocab}"]
    if model_type == "chatglm":
        facts.append(f"rope_ratio {config['rope_ratio']}" if "rope_ratio" in config else "no rope_ratio")
    if config.get("position_encoding_2d"):
        facts.append("position_encoding_2d")
    families = None
    if isinstance(vocab, int):
        if config.get("position_encoding_2d") or vocab == CHATGLM6B_VOCAB:
            families = frozenset({"chatglm"})
        elif vocab >= GLM4_VOCAB:
            families = frozenset({"glm4"})
        elif vocab == SENTENCEPIECE_VOCAB:
            families = frozenset({"chatglm2", "chatglm3"})
    return ConfigEvidence(families, ", ".join(facts))


def family_names(families) -> str:
    return " or ".join(sorted(families))


# the prompt formats of the generations before role tokens (their chat() methods), as they read in a message
ROUND_PROMPTS = {"chatglm": "\"[Round N]\\n问：...\\n答：\"", "chatglm2": "\"[Round N]\\n\\n问：...\\n\\n答：\""}


def unsupported_family(family: str, where: str, facts: str) -> ModelError:
    """The refusal for a generation glmport recognises but does not train."""
    title = FAMILY_TITLES[family]
    titles = [FAMILY_TITLES[f] for f in SUPPORTED_FAMILIES]
    supported = ", ".join(titles[:-1]) + " and " + titles[-1]
    prompt = ROUND_PROMPTS.get(family)
    layout = f"the {title} layout" + (f", whose prompts are {prompt}" if prompt else "")
    return ModelError(f"{title} models are not supported by glmport yet", [Problem(
        where, f"{facts}: {layout}",
        f"glmport does not train {title} yet; it trains {supported} (remote-code folders, model_type chatglm, "
        f"or native GLM folders, model_type glm). glmport.template cannot make a {title} tokenizer speak the "
        "ChatGLM3 format: it has no role tokens (<|user|>, <|assistant|>...) to write it with")])


@dataclass
class ModelInfo:
    path: Path
    kind: str  # native | remote
    family: str  # chatglm | chatglm2 | chatglm3 | glm4
    config: dict[str, Any]
    # how ``family`` was chosen: "config.json", "glmport.model_family", "remote code (FILE REVISION)" (config.json
    # allows ChatGLM2 and ChatGLM3; the folder's code is a revision of one of them), or "guess" (config.json did
    # not say; the tokenizer decides once loaded, see glmport.data.templates.detect_family)
    family_from: str = "config.json"

    @property
    def auto_map(self) -> dict[str, str]:
        return self.config.get("auto_map", {})

    @property
    def context(self) -> tuple[str, int] | None:
        """(config.json key, value): the positions the model has. The remote code looks positions up in a
        rotary table of ``seq_length`` rows (ChatGLM-6B: ``max_sequence_length``), so one past it is an
        IndexError; native models were trained to ``max_position_embeddings``. None where config.json
        does not say (the config class's default then applies, which only loading it tells)."""
        if self.kind == "native":
            key = "max_position_embeddings"
        else:
            key = "max_sequence_length" if self.family == "chatglm" else "seq_length"
        value = self.config.get(key)
        return (key, value) if isinstance(value, int) and not isinstance(value, bool) else None


def inspect_model_dir(path: Path, family: str = "auto") -> ModelInfo:
    """Read ``config.json`` and classify the folder, with errors that say what is wrong with it.

    ``family`` (``glmport.model_family``) must agree with what config.json says; it decides only where
    config.json does not (then the tokenizer has the last word)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path}: not a model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_file}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    model_type = config.get("model_type")
    if model_type in NATIVE_MODEL_TYPES:
        kind = "native"
    elif model_type == "chatglm":
        kind = "remote"
        if not (path / "modeling_chatglm.py").is_file():
            raise ModelError(f"{path}: config.json says model_type chatglm but modeling_chatglm.py is missing "
                             "(remote-code folders ship it next to the weights)")
    else:
        raise ModelError(
            f"{config_file}: model_type {model_type!r} is not a GLM-family model; glmport trains ChatGLM-6B / "
            "ChatGLM2 / ChatGLM3 / GLM-4 remote-code folders (model_type chatglm) and native GLM folders (model_type glm, or glm4 for "
            "GLM-4-0414)"
        )
    evidence = config_evidence(config)
    allowed = evidence.families
    if allowed is not None and not allowed & set(SUPPORTED_FAMILIES):
        raise unsupported_family(next(iter(allowed)), str(config_file), evidence.facts)
    if family not in ("auto", None):
        if allowed is not None and family not in allowed:
            raise ModelError(f"glmport.model_family {family} contradicts the model folder", [Problem(
                "glmport.model_family", f"{family} was asked for, but {evidence.facts} ({family_names(allowed)})",
                f"remove glmport.model_family (glmport detects the family), or use a {family} model folder")])
        return ModelInfo(path, kind, family, config, "glmport.model_family")
    if allowed is not None and kind == "remote" and allowed == {"chatglm2", "chatglm3"}:
        known = _remote_code_family(path)
        if known is not None:
            return ModelInfo(path, kind, known[0], config, known[1])
    if allowed is not None and len(allowed) == 1:  # GLM-4, ChatGLM-6B
        return ModelInfo(path, kind, next(iter(allowed)), config)
    if allowed is not None:  # ChatGLM2 or ChatGLM3: ChatGLM3 until the tokenizer says otherwise
        return ModelInfo(path, kind, "chatglm3", config)
    guess = "glm4" if "rope_ratio" in config else "chatglm3"
    return ModelInfo(path, kind, guess, config, "guess")


def _remote_code_family(path: Path) -> tuple[str, str] | None:
    """(family, how it was found) from the revision of the folder's modeling (else tokenization) file, when
    glmport's manifest or its own test fixtures know it; None for code of an unknown revision. Only hashes
    are read: nothing of the folder runs."""
    from glmport.patching.manifest import identify_remote_folder, load_manifest

    revisions = load_manifest()["revisions"]
    files = identify_remote_folder(path)
    for key in ("modeling", "tokenization"):
        identity = files[key]
        family = revisions.get(identity.effective_revision or "", {}).get("family")
        if family is not None:
            return family, f"remote code ({identity.path.name} {identity.revision})"
    return None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    dtype: Any
    patches: Any = None  # glmport.patching.AppliedPatches, or None
    notes: list[str] = field(default_factory=list)


def resolve_dtype(requested: str, backend, family: str, method: str):
    """The dtype frozen base weights are loaded in (see the module docs of glmport.train.methods)."""
    import torch

    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    supported = backend.supported_dtypes()
    if requested != "auto":
        dtype = names[requested]
        if dtype not in supported:
            shown = ", ".join(str(d).replace("torch.", "") for d in supported)
            raise ModelError(f"glmport.dtype {requested}: backend {backend.name} does not support it (supports {shown})")
        return dtype, None
    if method == "sft":  # every weight trains: fp32 master weights, half precision only through autocast
        return torch.float32, None
    dtype = backend.preferred_dtype()
    if family == "glm4" and dtype == torch.float16:
        return torch.float32, (
            f"GLM-4 overflows in fp16 (NaN losses; zai-org/GLM-4#96) and backend {backend.name} has no bf16: "
            "loading the base weights in fp32. Set glmport.dtype: fp16 to force it anyway."
        )
    return dtype, None


@dataclass(frozen=True)
class RemoteCodeConsent:
    """The user's say on running a remote-code folder's Python files, and how the command takes it.

    ``trust``: None (the default) runs the files only when glmport's manifest knows their revision (sha256);
    True runs any (an unknown revision also needs ``allow_unverified`` to be patched); False runs none.
    ``source`` says where a False came from (a flag, or a config file's line); ``config_keys`` says the
    command also reads ``glmport.*`` keys from a config (``glmport train``), so messages offer them too.
    """

    trust: bool | None = None
    allow_unverified: bool = False
    source: str = "--no-trust-remote-code"
    config_keys: bool = False

    def ask_for(self, *flags: str) -> str:
        """``pass --a --b (or set glmport.a: true and glmport.b: true)``: how to say yes in this command."""
        text = "pass " + " ".join(f"--{flag}" for flag in flags)
        if self.config_keys:
            text += " (or set " + " and ".join(f"glmport.{flag.replace('-', '_')}: true" for flag in flags) + ")"
        return text


def check_remote_code(info: ModelInfo, consent: RemoteCodeConsent):
    """Refuse a remote-code folder whose code the user has not agreed to run, before anything of it is
    imported; return its files' identities (``glmport.patching.manifest.FileIdentity``). Native folders
    run no code of their own: nothing to check."""
    from glmport.patching.manifest import describe_files, identify_remote_folder

    if info.kind != "remote":
        return {}
    files = identify_remote_folder(info.path)
    if consent.trust is False:
        code = f"{info.path} holds remote code ({describe_files(files)}), which runs when the model loads"
        flag = consent.source.startswith("--")
        raise ModelError(f"{info.path}: the model's remote code is not trusted, so it cannot be loaded", [Problem(
            consent.source, code if flag else f"glmport.trust_remote_code is false, and {code}",
            f"{'leave out ' + consent.source if flag else 'remove glmport.trust_remote_code: false'} to run it "
            "(by default glmport runs only revisions its manifest knows), or use a native GLM folder "
            "(model_type glm), which brings no code")])
    unknown = [f for f in files.values() if f.sha256 is not None and not f.known]
    if unknown and consent.trust is not True:
        flags = ("trust-remote-code",) if consent.allow_unverified else ("allow-unverified-patches", "trust-remote-code")
        raise ModelError(
            f"{info.path}: remote code of a revision glmport does not know; it runs only with your consent",
            [Problem(str(f.path), f"sha256 {f.sha256[:12]}... is not a revision glmport knows (the file was edited, "
                                  "or is from a release newer than glmport's manifest)",
                     f"read it, then {consent.ask_for(*flags)} to run and patch it anyway") for f in unknown])
    return files


def preflight(info: ModelInfo, backend, mode: str, patch_sets, consent: RemoteCodeConsent):
    """What can be checked without importing anything from the folder: consent to run its code, and that
    every file's revision can be patched for ``backend``/``mode``. Returns the remote files' identities."""
    from glmport.patching.session import make_plan

    files = check_remote_code(info, consent)
    plan = make_plan(info, backend, mode, patch_sets, allow_unverified=consent.allow_unverified)
    if plan.problems:
        raise PatchError(f"cannot patch {info.path} for backend {backend.name}, mode {mode}", plan.problems)
    return files


def load_model(info: ModelInfo, backend, *, mode: str, dtype, patch_sets, allow_unverified: bool = False,
               config_overrides: dict | None = None, consent: RemoteCodeConsent | None = None,
               check_tokenizer=None, quantization_config=None) -> LoadedModel:
    """Load tokenizer and model from ``info.path`` for ``mode`` (``train``/``infer``) on ``backend``, with
    the patches ``patch_sets`` (the caller's ``manager.patch_sets``) selects.

    Remote code runs only as ``consent`` allows (default: of a revision in glmport's manifest); one log
    line names each file, its sha256 and the revision it matched before it is imported. ``check_tokenizer``
    (a function of the tokenizer) runs before the weights load, so a tokenizer of the wrong generation stops
    the run before gigabytes are read."""
    consent = consent or RemoteCodeConsent(allow_unverified=allow_unverified)
    session = _start_session(info, backend, mode, patch_sets, consent)
    try:
        if info.kind == "native":
            model, tokenizer = _load_native(info, dtype, config_overrides, check_tokenizer, quantization_config)
        else:
            model, tokenizer = _load_remote(info, dtype, session, config_overrides, check_tokenizer,
                                            quantization_config)
        session.verify_after_build(model)
    except Exception:
        session.undo()
        raise
    return LoadedModel(model, tokenizer, info, dtype, session)


@contextmanager
def patched_tokenizer(info: ModelInfo, backend, *, mode: str, patch_sets, consent: RemoteCodeConsent):
    """The folder's tokenizer alone, loaded as :func:`load_model` loads it (same consent, preflight and patch
    session), for commands that tokenize without a model (``glmport data check``). The remote tokenizers need
    the compat patches on transformers 5 (their ``_pad`` takes no ``padding_side``) and those patch the
    tokenizer's class: they stay applied while the block runs, and are undone when it ends."""
    session = _start_session(info, backend, mode, patch_sets, consent)
    try:
        yield _load_tokenizer(info, session)
    finally:
        session.undo()


def _start_session(info: ModelInfo, backend, mode: str, patch_sets, consent: RemoteCodeConsent):
    """Consent and preflight, one log line naming the remote files about to run, then the patch session."""
    from glmport.patching.manifest import describe_files
    from glmport.patching.session import patch_session

    files = preflight(info, backend, mode, patch_sets, consent)
    if files:
        unverified = any(f.sha256 is not None and not f.known for f in files.values())
        (log.warning if unverified else log.info)("running the model's remote code: %s", describe_files(files))
    return patch_session(info, backend, mode, registry=patch_sets, allow_unverified=consent.allow_unverified)


def _load_tokenizer(info: ModelInfo, session):
    """Native folders: transformers' own tokenizer; remote ones: the folder's class, as the session patched it."""
    if info.kind == "native":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(info.path))
    tokenizer_cls = session.remote_classes[2]
    if tokenizer_cls is None:
        raise ModelError(f"{info.path}: no tokenizer_config.json with an auto_map AutoTokenizer entry; copy the "
                         "tokenizer files of the model download into the folder")
    return tokenizer_cls.from_pretrained(str(info.path))


def _load_native(info: ModelInfo, dtype, config_overrides, check_tokenizer=None, quantization_config=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = _load_tokenizer(info, None)
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    config = AutoConfig.from_pretrained(str(info.path))
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(str(info.path), config=config, dtype=dtype,
                                                 **_quantized(quantization_config))
    return model, tokenizer


def _load_remote(info: ModelInfo, dtype, session, config_overrides, check_tokenizer=None, quantization_config=None):
    config_cls, model_cls, _ = session.remote_classes
    tokenizer = _load_tokenizer(info, session)
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    config = config_cls.from_pretrained(str(info.path))
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    config.torch_dtype = dtype  # the remote code builds its layers in config.torch_dtype
    model = model_cls.from_pretrained(str(info.path), config=config, dtype=dtype, empty_init=False,
                                      **_quantized(quantization_config))
    return model, tokenizer


def _quantized(quantization_config) -> dict:
    """``from_pretrained`` arguments of a bitsandbytes load (QLoRA, :mod:`glmport.train.quantization`): transformers
    swaps the linear layers for bitsandbytes ones and quantizes the weights as they are placed on the device."""
    return {} if quantization_config is None else {"quantization_config": quantization_config}
