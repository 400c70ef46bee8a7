"""What each model family's remote code imports beyond torch and transformers.

A remote-code folder (``model_type: chatglm``) is loaded with ``trust_remote_code``; before transformers runs
its ``*.py`` files it scans their imports (``transformers.dynamic_module_utils.check_imports``) and stops with
"This modeling file requires the following packages that were not found in your environment: ..." when
one is missing. The tokenizers are the files that need more than torch and transformers: ChatGLM, ChatGLM2
and ChatGLM3 wrap SentencePiece, GLM-4 builds a tiktoken ``Encoding``. glmport declares every distribution
below in its install requirements so that ``pip install glmport`` can load a downloaded folder;
``tests/meta/test_install_requirements.py`` keeps this table and ``pyproject.toml`` in step.

Adding a family: read its remote code (modeling, configuration, tokenization and every file they import
relatively, e.g. ``quantization.py``), list each third-party top-level import that transformers' check
would demand here, and add the distribution to ``dependencies`` in ``pyproject.toml`` (and the MLU image).
Imports under ``try:`` or ``if is_..._available():`` are skipped by that check (``cpm_kernels`` in
``quantization.py``, ``flash_attn`` in GLM-4's modeling file) and do not belong here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteImport:
    """One third-party module that a family's remote code imports at the top of a file."""

    module: str  # top-level import name, as transformers' import check sees it
    distribution: str  # what pip installs (often, not always, the same name)
    file: str  # the upstream file that imports it


@dataclass(frozen=True)
class Family:
    name: str
    upstream: str  # the Hugging Face repository whose remote code was read
    imports: tuple[RemoteImport, ...]

    @property
    def distributions(self) -> frozenset[str]:
        return frozenset(imp.distribution for imp in self.imports)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        # ChatGLM-6B's first (March 2023) tokenizer imported icetk; the HF folder has used plain
        # sentencepiece (plus numpy for its 2-D attention mask) since.
        Family("chatglm", "THUDM/chatglm-6b", (
            RemoteImport("sentencepiece", "sentencepiece", "tokenization_chatglm.py"),
            RemoteImport("numpy", "numpy", "tokenization_chatglm.py"),
        )),
        Family("chatglm2", "THUDM/chatglm2-6b", (
            RemoteImport("sentencepiece", "sentencepiece", "tokenization_chatglm.py"),
        )),
        Family("chatglm3", "THUDM/chatglm3-6b", (
            RemoteImport("sentencepiece", "sentencepiece", "tokenization_chatglm.py"),
        )),
        Family("glm4", "THUDM/glm-4-9b-chat", (
            RemoteImport("tiktoken", "tiktoken", "tokenization_chatglm.py"),
            RemoteImport("regex", "regex", "tokenization_chatglm.py"),  # `import regex as re`
        )),
    )
}


def remote_code_distributions() -> frozenset[str]:
    """Every distribution some family's remote code needs: what ``pip install glmport`` must bring."""
    return frozenset().union(*(family.distributions for family in FAMILIES.values()))
