"""Model shapes for the benchmark, and model folders with seeded random weights at those shapes.

Speed and memory do not depend on the weights' values, so a folder of random weights at the real shape
measures what a real download would. The folders are ChatGLM remote-code folders (the layout of the
ChatGLM3-6B / GLM-4-9B-chat downloads, glmport's own fixture code) built by :mod:`glmport.tiny`, so they
load through the same patch session as a user's model.

``mini`` keeps what makes ChatGLM's step expensive in a way a small model would hide (the 65k vocabulary,
128-wide heads, 2 key/value groups, the FFN/hidden ratio) and has fewer, narrower layers, so it runs on a
laptop CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from glmport.errors import ConfigError, Problem


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # chatglm3 (vocabulary 65,024) or glm4 (151,552)
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    kv_groups: int
    ffn_hidden_size: int
    seq_length: int = 8192

    @property
    def vocab(self) -> int:
        from glmport.tiny.tokenizer import LAYOUTS

        return LAYOUTS[self.family].padded_vocab_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tiny_options(self) -> dict:
        return {"hidden_size": self.hidden_size, "ffn_hidden_size": self.ffn_hidden_size,
                "num_layers": self.num_layers, "num_attention_heads": self.num_attention_heads,
                "kv_groups": self.kv_groups, "seq_length": self.seq_length}


SHAPES = {
    "chatglm3-6b": Shape("chatglm3-6b", "chatglm3", 28, 4096, 32, 2, 13696),
    "glm-4-9b": Shape("glm-4-9b", "glm4", 40, 4096, 32, 2, 13696),
    # 4 heads of 128 (2 key/value groups), FFN 3.34x hidden as in the real models, real vocabulary
    "mini": Shape("mini", "chatglm3", 2, 512, 4, 2, 1712),
    # for smoke tests only: the real vocabulary around a model small enough for CI
    "tiny": Shape("tiny", "chatglm3", 2, 64, 4, 2, 128),
}


def resolve_shape(value: str) -> Shape:
    """A shape name, or the path of a ChatGLM/GLM ``config.json`` (or of the folder holding it)."""
    if value in SHAPES:
        return SHAPES[value]
    path = Path(value)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"--shape {value}: neither a known shape nor a config.json", [Problem(
            "--shape", f"{value!r} is not one of {', '.join(SHAPES)} and no such file exists",
            "name a shape, or the path of a model's config.json")])
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it as JSON ({exc})") from None
    vocab = config.get("padded_vocab_size") or config.get("vocab_size")
    family = {65024: "chatglm3", 151552: "glm4"}.get(vocab)
    keys = {"num_layers": ("num_layers", "num_hidden_layers"), "hidden_size": ("hidden_size",),
            "num_attention_heads": ("num_attention_heads",),
            "kv_groups": ("multi_query_group_num", "num_key_value_heads"),
            "ffn_hidden_size": ("ffn_hidden_size", "intermediate_size")}
    found = {field: next((config[k] for k in names if k in config), None) for field, names in keys.items()}
    missing = [field for field, v in found.items() if v is None]
    if family is None or missing:
        what = f"vocabulary {vocab} is neither ChatGLM3's 65024 nor GLM-4's 151552" if family is None else \
            f"no value for {', '.join(missing)}"
        raise ConfigError(f"{path}: not a ChatGLM3 / GLM-4 configuration the benchmark can build", [Problem(
            str(path), what, "use a config.json of a ChatGLM3-6B or GLM-4-9B model (remote or native)")])
    return Shape(path.parent.name or "config", family, seq_length=int(config.get("seq_length", 8192)),
                 **{k: int(v) for k, v in found.items()})


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glmport" / "bench-models"


def model_folder(shape: Shape, seed: int, cache: Path | None = None) -> Path:
    """A remote-code model folder with seeded random weights at ``shape``, built once per shape and seed
    (the folder's name is a hash of both; :func:`glmport.tiny.build_tiny_model` publishes it atomically)."""
    from glmport.tiny import build_tiny_model

    cache = Path(cache) if cache is not None else default_cache()
    key = hashlib.sha256(json.dumps([asdict(shape), seed, "v1"], sort_keys=True).encode()).hexdigest()[:12]
    target = cache / f"{shape.name}-{key}"
    if not (target / "glmport_tiny.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        build_tiny_model("tiny-remote", target, family=shape.family, seed=seed, **shape.tiny_options())
    return target
