"""``glmport data check --model DIR`` on remote-code folders: the folder's own tokenizer, loaded as training
loads it (through the patch session), so that its ``_pad`` and friends work on transformers 5.

Regression: the command used to load the tokenizer with ``AutoTokenizer.from_pretrained(trust_remote_code=
True)``, without the compat patches, and every remote folder ended in an internal error (``_pad() got an
unexpected keyword argument 'padding_side'``; ChatGLM-6B's tokenizer did not even build).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmport.testing import ok, run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
CHAT = FIXTURES / "chat.jsonl"  # single turn, multi-turn with system, tools + tool call
FAMILIES = ("chatglm3", "glm4", "chatglm2", "chatglm")


@pytest.fixture(scope="module")
def remote_models(tmp_path_factory):
    """family -> a tiny remote-code folder of it, built through the CLI on first use."""
    root, built = tmp_path_factory.mktemp("remote-models"), {}

    def get(family: str) -> Path:
        if family not in built:
            kind = ["tiny-native"] if family == "native" else ["tiny-remote", "--family", family]
            ok(run_cli("init-model", *kind, root / family))
            built[family] = root / family
        return built[family]

    return get


@pytest.fixture
def alpaca(tmp_path) -> Path:
    """Single-turn ASCII records: every generation's template takes them (ChatGLM-6B/ChatGLM2 have no tools),
    and the tiny tokenizers spell ASCII one character a token, so the exact counts are known."""
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (
        {"instruction": "Say hello", "input": "", "output": "Hello there!"},
        {"instruction": "Translate", "input": "good morning", "output": "Guten Morgen"},
    )), encoding="utf-8")
    return path


def _check(data: Path, *argv: str, env=None) -> dict:
    return json.loads(ok(run_cli("data", "check", data, "--json", *argv, env=env)).stdout)


@pytest.mark.parametrize("family", FAMILIES)
def test_check_counts_with_the_remote_tokenizer(remote_models, alpaca, family):
    model = remote_models(family)
    report = _check(alpaca, "--model", model)
    assert (report["template"], report["tokenizer"]) == (family, str(model))
    assert (report["records"], report["valid"], report["trimmed"]["samples"]) == (2, 2, 0)
    # The folder's own tokenizer gives the counts the character-level estimate of the same layout gives
    # for ASCII text; ChatGLM3: [gMASK] sop <|user|> \n "Say hello" <|assistant|> \n "Hello there!" </s>.
    assert report["train_tokens"] == _check(alpaca, "--template", family)["train_tokens"]
    if family == "chatglm3":
        assert report["train_tokens"]["p50"] == 2 + (2 + len("Say hello")) + (2 + len("Hello there!")) + 1


def test_check_with_a_native_folder_still_counts(remote_models, alpaca):
    """Native folders go through the same session (their patches target transformers' classes, not the
    tokenizer): transformers' own tokenizer, the ChatGLM3 layout of the tiny native model."""
    model = remote_models("native")
    report = _check(alpaca, "--model", model)
    assert (report["template"], report["tokenizer"]) == ("chatglm3", str(model))
    assert report["train_tokens"] == _check(alpaca, "--template", "chatglm3")["train_tokens"]


def test_check_shows_the_remote_tokenizers_tokens(remote_models, alpaca):
    """--show goes through the tokenizer's decode/convert_ids_to_tokens as well, not only its encode."""
    result = ok(run_cli("data", "check", alpaca, "--model", remote_models("chatglm3"), "--show", "1"))
    assert "Sample 1:" in result.stdout and "<|assistant|>" in result.stdout


def test_check_on_emulated_mlu(remote_models, alpaca):
    """The tokenizer is patched for the backend the command runs on, as training would patch it."""
    model = remote_models("glm4")
    report = _check(alpaca, "--model", model, "--backend", "mlu", env={"GLMPORT_EMULATE": "mlu"})
    assert report["template"] == "glm4"
    assert report == _check(alpaca, "--model", model)  # the device does not change a token count


def test_check_leaves_no_patches_behind(remote_models, alpaca):
    """The patch session ends with the command: the folder's tokenizer class is as imported afterwards."""
    import sys

    model = remote_models("chatglm3")
    _check(alpaca, "--model", model)
    patched = [name for name, module in sys.modules.items()
               if name.startswith("transformers_modules") and getattr(module, "_glmport_patch_session", None)]
    assert patched == []


def test_check_refuses_untrusted_remote_code(remote_models, alpaca):
    result = ok(run_cli("data", "check", alpaca, "--model", remote_models("chatglm3"), "--no-trust-remote-code"),
                exit_code=2)
    assert "the model's remote code is not trusted" in result.stderr
