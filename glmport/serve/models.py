"""What one server serves: a base model, or a training result, plus any number of adapters on the same base.

Adapters share one copy of the base weights: they are loaded into one peft model (``load_adapter``) and
the one a request names is switched on with ``set_adapter`` (the base itself runs with the adapters
disabled). Switching is safe because only the generation thread (:mod:`glmport.serve.worker`) touches
the model. Every adapter must have been trained on this base: one whose recorded base model is another
model (a different config.json) is refused rather than served with silently wrong weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from glmport.errors import ModelError, Problem
from glmport.train.outputs import RESULT_DIR, RESULT_FILE

log = logging.getLogger("glmport")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class ServedModel:
    """One entry of ``GET /v1/models``: ``adapter`` is the peft adapter switched on for it, or None for
    the model as loaded (the base, a full fine-tune, or a ChatGLM3 prefix-encoder result)."""

    name: str
    adapter: str | None
    parent: str | None  # the base model's name, for an adapter
    source: str  # the folder, for the server's log (never sent to clients)


class ModelSet:
    """The loaded model (:class:`glmport.infer.InferenceModel`) and the names it answers to."""

    def __init__(self, bundle, entries: list[ServedModel]):
        self.bundle = bundle
        self.entries = {entry.name: entry for entry in entries}

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def context_length(self) -> int:
        """Positions the model has, prompt and reply together (its config)."""
        length = self.bundle.context_length()
        if length is None:
            raise ModelError(f"{self.bundle.loaded.info.path / 'config.json'}: no context length", [Problem(
                "config.json", "none of max_position_embeddings, seq_length is set",
                "pass --context-length N (the positions the model was trained for)")])
        return length

    @contextlib.contextmanager
    def selected(self, name: str):
        """The model with ``name``'s adapter switched on (or all adapters off, for the base)."""
        entry = self.entries[name]
        model = self.bundle.model
        if entry.adapter is not None:
            model.set_adapter(entry.adapter)
            yield model
        elif hasattr(model, "disable_adapter") and any(e.adapter for e in self.entries.values()):
            with model.disable_adapter():
                yield model
        else:
            yield model


def load_models(path: Path, adapters: list[tuple[str, Path]], backend, *, patch_sets, consent, dtype: str = "auto",
                base: Path | None = None, name: str | None = None) -> ModelSet:
    """Load ``path`` (a model folder, a ``glmport train`` result or a peft adapter; ``base`` as in
    :func:`glmport.infer.load_for_inference`) and put ``adapters`` (name, folder) on its base model. The
    patches applied while loading stay until ``bundle.close()``."""
    from glmport.infer import load_for_inference

    bundle = load_for_inference(path, backend, patch_sets=patch_sets, consent=consent, dtype=dtype, base=base)
    try:
        return _with_adapters(bundle, adapters, backend, name)
    except BaseException:
        bundle.close()
        raise


def _with_adapters(bundle, adapters, backend, name: str | None) -> ModelSet:
    path, base_dir = bundle.path, bundle.loaded.info.path
    content = (bundle.result or {}).get("content", "model")
    own = name or default_name(path)
    _check_name(own, set(), "--name")
    entries: list[ServedModel] = []
    if content == "adapter":
        base_name = base_dir.name if base_dir.name != own else base_dir.name + "-base"
        entries.append(ServedModel(base_name, None, None, str(base_dir)))
        entries.append(ServedModel(own, "default", base_name, str(path)))  # peft's name for the first adapter
    else:
        entries.append(ServedModel(own, None, None, str(path)))
        if adapters and content == "prefix-encoder":
            raise ModelError(f"{path}: a P-Tuning v2 result (ChatGLM3's own prefix encoder) cannot carry adapters",
                             [Problem("--adapter", "the prefix encoder is part of the model, so every adapter would "
                                      "run with it", f"serve the base model {base_dir} with --adapter for each result")])
    taken = {entry.name for entry in entries}
    loaded = []
    for index, (adapter_name, folder) in enumerate(adapters, 1):
        _check_name(adapter_name, taken, "--adapter")
        taken.add(adapter_name)
        # peft keys modules by adapter name, where "." is not allowed: an internal name of its own
        loaded.append((f"adapter_{index}", adapter_name, Path(folder).resolve()))
        entries.append(ServedModel(adapter_name, f"adapter_{index}", entries[0].name, str(Path(folder).resolve())))
    if loaded:
        bundle.model = _load_adapters(bundle, path if content == "full-model" else base_dir, loaded, backend)
    for entry in entries:
        log.info("serving %s: %s", entry.name, f"adapter {entry.source} on {entry.parent}" if entry.parent else entry.source)
    return ModelSet(bundle, entries)


def default_name(path: Path) -> str:
    """``output/quickstart/final`` is served as ``quickstart``; any other folder by its name."""
    path = Path(path).resolve()
    return path.parent.name if path.name == RESULT_DIR and path.parent.name else path.name


def _check_name(name: str, taken: set[str], flag: str) -> None:
    if not NAME.match(name):
        raise ModelError(f"{flag}: {name!r} is not a model name", [Problem(
            flag, "names are what clients send as `model`",
            f"use letters, digits and . _ : / - (up to 128), starting with a letter or digit; set it with {flag}")])
    if name in taken:
        raise ModelError(f"{flag}: the name {name!r} is taken", [Problem(
            flag, f"already served: {', '.join(sorted(taken))}", "give each adapter its own name")])


def _result(folder: Path) -> dict | None:
    file = folder / RESULT_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{file}: not readable as JSON ({exc})") from None


def _adapter_base(folder: Path) -> tuple[str | None, str]:
    """(the base model the adapter in ``folder`` was trained on, the file that says so)."""
    result = _result(folder)
    if result is not None:
        if result.get("content") != "adapter":
            raise ModelError(f"--adapter {folder}: a {result.get('content')} result, not an adapter", [Problem(
                str(folder / RESULT_FILE), f"holds {result.get('content')}",
                "serve it as the model (glmport serve FOLDER), or give an adapter (a LoRA or prefix-tuning result)")])
        return result.get("base_model"), str(folder / RESULT_FILE)
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise ModelError(f"--adapter {folder}: not an adapter folder", [Problem(
            str(folder), f"no adapter_config.json (nor {RESULT_FILE})",
            f"give a peft adapter folder or the {RESULT_DIR}/ of a LoRA / prefix-tuning run")])
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path"), str(config)
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{config}: not readable as JSON ({exc})") from None


def _same_model(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _load_adapters(bundle, base_dir: Path, adapters, backend):
    from peft import PeftModel

    from glmport.train.methods import narrow_prompt_tokens, quiet_peft

    model = bundle.model
    for peft_name, adapter_name, folder in adapters:
        if not folder.is_dir():
            raise ModelError(f"--adapter {adapter_name}={folder}: no such folder")
        recorded, where = _adapter_base(folder)
        if recorded and Path(recorded).is_dir() and not _same_model(Path(recorded), base_dir):
            raise ModelError(f"--adapter {adapter_name}={folder}: trained on another model", [Problem(
                where, f"its base model is {recorded}, whose config.json differs from {base_dir}'s",
                f"serve {recorded} with this adapter, or give adapters trained on {base_dir}")])
        if recorded and not Path(recorded).is_dir():
            log.warning("--adapter %s: its base model %s is not here; assuming it was %s", adapter_name, recorded, base_dir)
        # Read on the host and moved with the model below, as glmport infer loads a result.
        with quiet_peft():
            try:
                if isinstance(model, PeftModel):
                    model.load_adapter(str(folder), adapter_name=peft_name, torch_device="cpu")
                else:
                    model = PeftModel.from_pretrained(model, str(folder), adapter_name=peft_name, torch_device="cpu")
            except (ValueError, TypeError, KeyError, RuntimeError) as exc:
                raise ModelError(f"--adapter {adapter_name}={folder}: peft cannot load it next to the others",
                                 [Problem(str(folder), str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                          "serve adapters of one kind (all LoRA, or all prefix tuning) together")]) from None
        narrow_prompt_tokens(model, backend)
    return model.to(backend.device(0)).eval()
