"""glmport's from-scratch remote-code modules for tiny test models (see :mod:`glmport.tiny`).

The ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat downloads carry their model code as "remote code" written for
transformers 4.3x-4.4x. glmport adapts that code with patch sets, and its tests need model folders that
contain such code without shipping the third-party files. The modules under ``chatglm3/``, ``glm4/`` and
``chatglm2/`` (its tokenizer; the rest is rendered from ``chatglm3/``) are glmport's own, written from scratch; they keep the public structure of the upstream files (class and
method names, signatures, attribute names, tensor layouts) and the constructs the patches target, and
compute the same function as transformers' native ``GlmForCausalLM``.

Fixture revisions
-----------------
Each family has one source folder. A family whose upstream code is another's with few changes renders
those files from the other family's folder (:data:`SHARED_SOURCES`: ChatGLM2-6B's modeling and
configuration files are ChatGLM3-6B's ancestors, and only its tokenizer is its own). A file with several
fixture revisions marks the differences inline, as line blocks the renderer resolves (every rendered file
is written out, so its hash identifies it):

* ``#? REV[, REV...]`` opens a block. The lines that follow, up to ``#? else`` or ``#? end``, belong
  to the named revisions only; each is written as ``#|`` + the line exactly as it will appear (so the
  source stays valid Python in which those lines are comments).
* ``#? else`` starts the lines every other revision gets: ordinary, live source lines.
* ``#? end`` closes the block. Blocks do not nest.

Rendering drops the directive lines, keeps or drops the branches and removes the ``#|`` prefix from the
kept revision-only lines. It checks that directives are well formed, that they only name revisions of
the families that render the file and that the result compiles. The rendered files go to a cache folder named after the hash of
the sources (``<tmp>/glmport-fixtures-<hash>``); their content depends only on the sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# family -> fixture revisions, oldest first. The newest is the default for new tiny-remote folders.
FIXTURE_REVISIONS: dict[str, list[str]] = {
    "chatglm3": ["chatglm3-2023-12", "chatglm3-2024-06"],
    "chatglm2": ["chatglm2-2023-07", "chatglm2-2023-10"],
    "glm4": ["glm4-2024-07"],
    "chatglm": ["chatglm-2023-05"],  # ChatGLM-6B
}

# fixture revision -> the upstream revision whose constructs it reproduces (names as in glmport's manifest)
_IMITATES = {
    "chatglm3-2023-12": "chatglm3-6b-2023-12",
    "chatglm3-2024-06": "chatglm3-6b-2024-06",
    "glm4-2024-07": "glm-4-9b-chat-2024-07",
    "chatglm2-2023-07": "chatglm2-6b-2023-07",
    "chatglm2-2023-10": "chatglm2-6b-2023-10",
    "chatglm-2023-05": "chatglm-6b-2023-05",
}

# family -> {file name: the family whose source folder holds that file}; files not named here are the
# family's own. ChatGLM2-6B's model and configuration code is ChatGLM3-6B's with a few changes, marked
# in the chatglm3 sources as chatglm2 revision blocks.
SHARED_SOURCES: dict[str, dict[str, str]] = {
    "chatglm2": {"modeling_chatglm.py": "chatglm3", "configuration_chatglm.py": "chatglm3"},
}

REMOTE_FILE_NAMES = ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py")
VOCAB_FILE_NAME = "tiny_vocab.json"
VOCAB_FORMAT = "glmport-tiny-vocab"

# Bump when the rendering rules change, so cached renderings of the old rules are not reused.
_RENDER_VERSION = "1"
_DIRECTIVE = "#?"
_ONLY_PREFIX = "#|"


class FixtureSourceError(ValueError):
    """A fixture source whose variant directives are malformed, or whose rendering does not compile."""


def source_dir(family: str) -> Path:
    if family not in FIXTURE_REVISIONS:
        raise KeyError(f"no fixture for family {family!r}; known: {sorted(FIXTURE_REVISIONS)}")
    return HERE / family


def imitated_revision(revision: str) -> str:
    """The upstream revision a fixture revision stands in for: ``chatglm3-2024-06`` -> ``chatglm3-6b-2024-06``."""
    return _IMITATES[revision]


def render_source(text: str, revision: str, known_revisions: list[str], name: str = "<fixture>") -> str:
    """The text of ``revision`` from a source with variant blocks (rules in the module docstring)."""
    out: list[str] = []
    state = "plain"  # plain | only (revision-only lines) | other (lines for the remaining revisions)
    selected = False
    opened_at = 0
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        stripped = line.strip()
        where = f"{name}:{number}"
        if stripped.startswith(_DIRECTIVE):
            if not line.startswith(_DIRECTIVE):
                raise FixtureSourceError(f"{where}: variant directives start in column 1")
            word = stripped[len(_DIRECTIVE):].strip()
            if word == "else":
                if state != "only":
                    raise FixtureSourceError(f"{where}: '#? else' outside a block, or twice in one")
                state = "other"
            elif word == "end":
                if state == "plain":
                    raise FixtureSourceError(f"{where}: '#? end' without an open block")
                state = "plain"
            else:
                if state != "plain":
                    raise FixtureSourceError(f"{where}: blocks do not nest (block opened at line {opened_at})")
                names = [part.strip() for part in word.split(",") if part.strip()]
                unknown = [n for n in names if n not in known_revisions]
                if not names or unknown:
                    raise FixtureSourceError(f"{where}: block names unknown revisions {unknown or word!r}; "
                                             f"known: {known_revisions}")
                selected = revision in names
                state, opened_at = "only", number
            continue
        if state == "only":
            if not line.startswith(_ONLY_PREFIX):
                raise FixtureSourceError(f"{where}: revision-only lines start with '{_ONLY_PREFIX}'")
            if selected:
                out.append(line[len(_ONLY_PREFIX):])
        elif line.startswith(_ONLY_PREFIX):
            raise FixtureSourceError(f"{where}: '{_ONLY_PREFIX}' line outside a revision block")
        elif state == "plain" or not selected:
            out.append(line)
    if state != "plain":
        raise FixtureSourceError(f"{name}: block opened at line {opened_at} is never closed")
    rendered = "".join(out)
    try:
        compile(rendered, f"{name} [{revision}]", "exec")
    except SyntaxError as exc:
        raise FixtureSourceError(f"{name}: the {revision} rendering does not compile: {exc}") from exc
    return rendered


def _source_owner(family: str, name: str) -> str:
    """The family whose source folder holds ``name`` for ``family``."""
    return SHARED_SOURCES.get(family, {}).get(name, family)


def rendered_sources(family: str, revision: str) -> dict[str, str]:
    """{file name: text} of a fixture revision, rendered in memory."""
    revisions = FIXTURE_REVISIONS.get(family, [])
    if revision not in revisions:
        raise KeyError(f"no fixture for {family}/{revision}; known: {revisions or sorted(FIXTURE_REVISIONS)}")
    texts = {}
    for name in REMOTE_FILE_NAMES:
        owner = _source_owner(family, name)
        # blocks in a shared file may name the revisions of every family rendered from it
        known = [rev for other, revs in FIXTURE_REVISIONS.items() if _source_owner(other, name) == owner for rev in revs]
        text = (source_dir(owner) / name).read_text(encoding="utf-8")
        texts[name] = render_source(text, revision, known, name=f"{owner}/{name}")
    return texts


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    # Written beside and moved into place, so a concurrent reader never sees half a file.
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def fixture_files(family: str, revision: str) -> dict[str, Path]:
    """The three remote-code files of a fixture revision, as real files with deterministic content."""
    texts = {name: text.encode("utf-8") for name, text in rendered_sources(family, revision).items()}
    digest = hashlib.sha256(f"{_RENDER_VERSION}\0{family}\0{revision}".encode())
    for name in REMOTE_FILE_NAMES:
        digest.update(b"\0" + name.encode() + b"\0" + texts[name])
    folder = Path(tempfile.gettempdir()) / f"glmport-fixtures-{digest.hexdigest()[:20]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in texts.items():
            _write_if_changed(folder / name, data)
    except OSError:
        # A shared temp folder owned by someone else: use a private one (same content).
        folder = Path(tempfile.mkdtemp(prefix="glmport-fixtures-"))
        for name, data in texts.items():
            (folder / name).write_bytes(data)
    return {name: folder / name for name in REMOTE_FILE_NAMES}


# ---------------------------------------------------------------------------------------------- tokenizer

# GLM-4's template: "[gMASK]<sop>", then "<|role|>metadata\ncontent" for every message with content; a
# message carrying tools first adds a system turn that lists them as JSON.
_GLM4_TOOLS_INTRO = "Tools you can call are listed below. To call one, reply with its name and JSON arguments."
GLM4_CHAT_TEMPLATE = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['tools'] is defined and message['tools'] -%}"
    "{{- '<|system|>\n" + _GLM4_TOOLS_INTRO + "' -}}"
    "{%- for tool in message['tools'] -%}"
    "{%- if tool['type'] == 'function' -%}"
    "{{- '\n\n## ' + tool['function']['name'] + '\n\n' + (tool['function'] | tojson(indent=4)) -}}"
    "{%- else -%}"
    "{{- '\n\n## ' + tool['type'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['content'] -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['metadata'] is defined and message['metadata'] -%}{{- message['metadata'] -}}{%- endif -%}"
    "{{- '\n' + message['content'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

_TOKENIZER_CLASSES = {"chatglm3": "ChatGLMTokenizer", "glm4": "ChatGLM4Tokenizer", "chatglm2": "ChatGLMTokenizer",
                      "chatglm": "ChatGLMTokenizer"}


def vocabulary_pieces(layout, seed_text: str = "") -> list[str]:
    """The named pieces of the tiny vocabulary in id order (ids 0..n-1); filler and specials follow.

    Same ids as :func:`glmport.tiny.tokenizer.base_vocabulary`, so remote and native tiny tokenizers
    encode text identically.
    """
    from glmport.tiny.tokenizer import base_vocabulary

    vocab = base_vocabulary(layout, seed_text)
    by_id = sorted((index, token) for token, index in vocab.items() if index < layout.first_special)
    pieces = [token for _, token in by_id if not token.startswith("<unused_")]
    for index, (vocab_id, token) in enumerate(by_id):
        expected = pieces[index] if index < len(pieces) else f"<unused_{index - len(pieces)}>"
        if vocab_id != index or token != expected:
            raise ValueError(f"tiny vocabulary is not contiguous at id {index}: {token!r}")
    return pieces


def write_remote_tokenizer(target: Path, layout, seed_text: str = "") -> None:
    """Write the vocabulary and ``tokenizer_config.json`` of the fixture tokenizer into a tiny model folder."""
    target = Path(target)
    if layout.family not in _TOKENIZER_CLASSES:
        raise ValueError(f"no remote tokenizer for family {layout.family!r}")
    vocab = {"format": VOCAB_FORMAT, "version": 1, "size": layout.first_special,
             "pieces": vocabulary_pieces(layout, seed_text)}
    (target / VOCAB_FILE_NAME).write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    tokenizer_class = _TOKENIZER_CLASSES[layout.family]
    config: dict = {
        "name_or_path": f"glmport/tiny-remote-{layout.family}",
        "tokenizer_class": tokenizer_class,
        "auto_map": {"AutoTokenizer": [f"tokenization_chatglm.{tokenizer_class}", None]},
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "remove_space": False,
    }
    if layout.family == "glm4":
        # GLM-4's tokenizer knows its special tokens only from here (as added tokens).
        config["added_tokens_decoder"] = {
            str(index): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
            for token, index in sorted(layout.specials.items(), key=lambda item: item[1])
        }
        config["additional_special_tokens"] = [t for t in layout.specials if t != layout.eos]
        config["eos_token"] = layout.eos
        config["pad_token"] = layout.pad
        config["model_max_length"] = 128000
        config["chat_template"] = GLM4_CHAT_TEMPLATE
    if layout.family == "chatglm":
        # ChatGLM-6B's tokenizer_config.json names its tokens; ids follow 0 image tokens since April 2023.
        config.update(bos_token="<sop>", eos_token="<eop>", end_token="</s>", gmask_token="[gMASK]",
                      mask_token="[MASK]", pad_token="<pad>", unk_token="<unk>", num_image_tokens=0)
    (target / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                  encoding="utf-8")
