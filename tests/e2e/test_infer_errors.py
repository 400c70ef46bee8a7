"""Bad input to ``glmport infer``, ``chat`` and ``eval``: exit status 2, a message naming the flag, file or line,
and (where it can be known before) no model loaded for nothing."""

from __future__ import annotations

import json

import pytest

from glmport.testing import ok, run_cli


def test_prompt_or_file_not_both(tmp_path):
    both = ok(run_cli("infer", tmp_path, "--prompt", "hi", "--file", tmp_path / "p.jsonl"), exit_code=2)
    assert "not allowed with argument" in both.stderr
    neither = ok(run_cli("infer", tmp_path), exit_code=2)
    assert "one of the arguments --prompt --file is required" in neither.stderr
    output = ok(run_cli("infer", tmp_path, "--prompt", "hi", "-o", tmp_path / "out.jsonl"), exit_code=2)
    assert "-o/--output goes with --file" in output.stderr


def test_generation_flags_are_checked_together(tmp_path):
    failed = ok(run_cli("infer", tmp_path, "--prompt", "hi", "--max-new-tokens", "0", "--top-p", "1.5",
                        "--temperature", "-1"), exit_code=2)
    assert "3 bad generation flag(s)" in failed.stderr
    for flag in ("--max-new-tokens", "--top-p", "--temperature"):
        assert f"{flag}:" in failed.stderr


def test_every_bad_prompt_line_is_named(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(['"fine"', "{oops", '{"text": "no prompt key"}', '{"messages": []}',
                                  json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "yo"}]}),
                                  json.dumps({"prompt": "x", "history": [["only a question"]]}),
                                  json.dumps({"messages": [{"role": "robot", "content": "hi"}]})]) + "\n")
    failed = ok(run_cli("infer", tmp_path / "no-model", "--file", prompts, "-q"), exit_code=2)
    assert "6 invalid prompt line(s)" in failed.stderr and "no such folder" not in failed.stderr  # lines first
    for line, what in ((2, "invalid JSON"), (3, "no 'prompt', 'messages' or 'conversations' key"),
                       (4, "messages: expected a non-empty array"), (5, "messages: the last message is assistant"),
                       (6, "history[0]: expected [question, answer]"), (7, "messages[0].role: 'robot' is not system")):
        assert f"{prompts}:{line}: {what}" in failed.stderr, failed.stderr
    assert f"{prompts}:1" not in failed.stderr


def test_base_is_for_adapters(models):
    failed = ok(run_cli("infer", models["native"], "--prompt", "hi", "--base", models["native"]), exit_code=2)
    assert "--base applies to adapters only" in failed.stderr and "is a model folder" in failed.stderr


def test_not_a_model_or_result(tmp_path):
    failed = ok(run_cli("infer", tmp_path, "--prompt", "hi"), exit_code=2)
    assert "not a model folder (no config.json), a glmport train result" in failed.stderr
    assert "a peft adapter (no adapter_config.json)" in failed.stderr


def test_eval_arguments(models, tmp_path):
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "yo"}]}) + "\n")
    two_models = ok(run_cli("eval", models["native"], models["native"].parent), exit_code=2)
    assert "name the data file with --data FILE" in two_models.stderr
    twice = ok(run_cli("eval", models["native"], models["native"], "--data", data), exit_code=2)
    assert "a model is named twice" in twice.stderr
    base = ok(run_cli("eval", models["native"], tmp_path, "--data", data, "--base", models["native"]), exit_code=2)
    assert "--base goes with one model" in base.stderr
    missing = ok(run_cli("eval", tmp_path / "no-model", tmp_path / "missing.jsonl"), exit_code=2)
    assert "data file not found" in missing.stderr and "no such folder" not in missing.stderr  # data first
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n')
    invalid = ok(run_cli("eval", tmp_path / "no-model", bad), exit_code=2)
    assert f"{bad}:1" in invalid.stderr and "no assistant message" in invalid.stderr


@pytest.mark.parametrize("flag", ["--max-input-length", "--max-output-length"])
def test_eval_lengths_must_be_positive(flag, models, tmp_path):
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    failed = ok(run_cli("eval", models["native"], data, flag, "-3"), exit_code=2)
    assert f"{flag}: -3" in failed.stderr


@pytest.mark.parametrize("kind", ["native", "remote"])
def test_a_prompt_longer_than_the_context_is_refused_before_generating(kind, models, tmp_path):
    """The tiny models take 1,024 positions: a prompt that leaves no room for --max-new-tokens is named (the
    flag, or the file and line) instead of failing inside the model's code."""
    long_prompt = " ".join(["word"] * 1100)
    failed = ok(run_cli("infer", models[kind], "--prompt", long_prompt, "-q"), exit_code=2)
    assert "do not fit the model's context of 1024 tokens" in failed.stderr and "--prompt:" in failed.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("short") + "\n" + json.dumps(" ".join(["word"] * 40)) + "\n")
    failed = ok(run_cli("infer", models[kind], "--file", prompts, "--max-new-tokens", "1000", "-q"), exit_code=2)
    assert f"{prompts}:2:" in failed.stderr and f"{prompts}:1" not in failed.stderr
    assert "lower --max-new-tokens" in failed.stderr
