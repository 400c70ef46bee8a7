"""Tiny GLM model folders built offline: random weights and a tokenizer made on the spot.

* ``tiny-native``: a transformers ``GlmForCausalLM`` folder (``model_type: glm``).
* ``tiny-remote``: a remote-code folder in the layout of the ChatGLM3-6B / GLM-4-9B-chat downloads
  (``modeling_chatglm.py`` + ``configuration_chatglm.py`` + ``tokenization_chatglm.py``, loaded with
  ``trust_remote_code``). The code is glmport's own from-scratch module with the public structure of the
  upstream files (class names, signatures, tensor layouts, and the constructs the patch sets target); the
  weights are the tiny-native ones under the remote parameter names, so both folders compute the same
  function from the same seed.

Both use the ChatGLM3 special-token layout by default (``family="glm4"`` gives the GLM-4 one; ``tiny-remote``
also builds ChatGLM2-6B folders, ``family="chatglm2"``: its tokenizer has no role tokens).
"""

from __future__ import annotations

from pathlib import Path

from glmport.errors import GlmportError

KINDS = ("tiny-native", "tiny-remote")


def build_tiny_model(kind: str, target, **options) -> Path:
    """Build a tiny model folder of ``kind`` in ``target`` (created; must be empty or absent)."""
    target = Path(target)
    if kind not in KINDS:
        raise GlmportError(f"unknown tiny model kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if target.exists() and any(target.iterdir()):
        raise GlmportError(f"{target}: folder is not empty; choose a new folder for the tiny model")
    from glmport.tiny.build import build_native, build_remote

    staging = target.with_name(f".{target.name}.partial")
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (build_native if kind == "tiny-native" else build_remote)(staging, **options)
    # Published in one step: a crash while building never leaves a folder that looks like a model.
    if target.exists():
        target.rmdir()
    staging.rename(target)
    return target
