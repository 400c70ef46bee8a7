"""``glmport chat`` with tools, in each family's tool format, through the real command line.

A tiny random model does not call tools, so the model's replies are scripted: ``glmport.infer.generate_ids``
(the one place generation happens) hands over the scripted tokens, through the streamer as generate() does.
Everything else is the real path: the model folder loaded with its patches, the tools declared on the system
message, the call parsed from the family's format and shown, the result read from --tool-results or from
stdin, and the conversation continued. Each prompt the command builds must be the token stream training
renders for the same conversation written as a data record (so the model sees what it was trained on).
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

import glmport.infer
from glmport.data.formats import read_record
from glmport.data.records import Conversation, Message
from glmport.serve.prompt import prompt_messages
from glmport.serve.protocol import parse_chat_request
from glmport.testing import ok, run_cli
from glmport.toolcalls import parse_tool_call

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
QUESTION, ANSWER, THANKS, WELCOME = "Weather in Paris?", "It is sunny in Paris.", "Thanks", "You are welcome."
RESULT = {"weather": "sunny"}
# how each family's model writes the call, and the same conversation as training data in the family's format
CALLS = {
    "chatglm3": "get_weather\n```python\ntool_call(city='Paris')\n```",
    "glm4": 'get_weather\n{"city": "Paris"}',
}
RECORDS = {
    "chatglm3": ("conversations", {"tools": [WEATHER["function"]], "conversations": [
        {"role": "user", "content": QUESTION},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "Paris"}, "observation": RESULT},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": THANKS},
        {"role": "assistant", "content": WELCOME}]}),
    "glm4": ("messages", {"messages": [
        {"role": "system", "content": "", "tools": [WEATHER]},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": json.dumps(RESULT)},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": THANKS},
        {"role": "assistant", "content": WELCOME}]}),
}
MODELS = {"chatglm3": "remote", "glm4": "remote-glm4", "glm4-native": "native-glm4"}
# The same tool call as OpenAI training data: one record for every family, each rendering it its own way.
OPENAI_TOOL_MESSAGES = [
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(RESULT)}]
OPENAI_RECORD = ("openai", {"tools": [WEATHER], "messages": [*OPENAI_TOOL_MESSAGES,
                                                             {"role": "assistant", "content": ANSWER}]})


class ScriptedModel:
    """Stands in for ``generate_ids``: replies with the next scripted text (plus the stop token named), streamed
    token by token as generate() streams; records every prompt, and what training makes of the same chat."""

    def __init__(self, family: str, replies: list[tuple[str, str]], record: tuple[str, dict] | None = None,
                 inspect=None):
        self.family = family
        self.record = record or RECORDS[family]
        self.inspect = inspect  # called with the bundle once, while its tokenizer is as loaded
        self.inspected = None
        self.replies = list(replies)
        self.prompts: list[list[int]] = []
        self.training_ids: list[int] = []
        self.assistant_id = None

    def __call__(self, bundle, prompts, settings, *, guard_mode=None, streamer=None):
        assert len(prompts) == 1 and bundle.template.tool_format == self.family
        self.tokenizer = bundle.tokenizer
        if not self.training_ids:  # the tokenizer as loaded, its patches still applied
            fmt, record = self.record
            sample = bundle.template.untruncated_sample(Conversation(read_record(fmt, record), "record"))
            self.training_ids = sample.input_ids
            self.assistant_id = bundle.template.role_ids["assistant"]
            self.inspected = self.inspect(bundle) if self.inspect else None
        self.prompts.append(list(prompts[0]))
        text, stop = self.replies.pop(0)
        ids = bundle.tokenizer.encode(text, add_special_tokens=False) + [bundle.template.role_ids[stop] if stop != "eos"
                                                                        else bundle.template.stop_token_ids[0]]
        if streamer is not None:
            streamer.put(torch.tensor([prompts[0]]))
            for token in ids:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return [ids]

    def assert_prompts_are_the_training_stream(self):
        """Each prompt is the training sample's tokens up to a reply, followed by <|assistant|>."""
        for prompt in self.prompts:
            assert prompt[-1] == self.assistant_id
            assert prompt == self.training_ids[: len(prompt)], (prompt, self.training_ids)


def _script(family: str) -> ScriptedModel:
    return ScriptedModel(family, [(CALLS[family], "observation"), ("\n" + ANSWER, "eos"), ("\n" + WELCOME, "eos")])


def _chat(monkeypatch, model, stdin: str, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))  # not a terminal: no prompts, lines until EOF
    return run_cli("chat", model, "-q", "--max-new-tokens", "16", *args)


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER]))
    return path


@pytest.fixture(scope="module")
def native_glm4(tmp_path_factory):
    """GLM-4-0414 (Glm4ForCausalLM): GLM-4's tokenizer, whose chat template writes the tool prompt."""
    folder = tmp_path_factory.mktemp("models") / "native-glm4"
    ok(run_cli("init-model", "tiny-native", folder, "--arch", "glm4"))
    return folder


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_tool_call_its_result_and_the_conversation_after_it(model, models, native_glm4, tools_file, tmp_path,
                                                              monkeypatch):
    family = model.split("-")[0]
    scripted = _script(family)
    monkeypatch.setattr(glmport.infer, "generate_ids", scripted)
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"name": "get_weather", "result": RESULT}) + "\n")
    folder = native_glm4 if model == "glm4-native" else models[MODELS[model]]
    out = ok(_chat(monkeypatch, folder, f"{QUESTION}\n{THANKS}\n", "--tools", tools_file, "--tool-results", results))
    assert out.stdout == f'[tool call] get_weather {{"city": "Paris"}}\n{ANSWER}\n{WELCOME}\n'
    assert len(scripted.prompts) == 3  # the question, the tool's result, the thanks
    scripted.assert_prompts_are_the_training_stream()


def _serve_and_training_views(bundle) -> dict:
    """What glmport serve builds for the OpenAI conversation, and what training renders of the same record."""
    template = bundle.template
    request = parse_chat_request(json.dumps({"model": "m", "messages": OPENAI_TOOL_MESSAGES, "tools": [WEATHER]}).encode())
    messages = read_record(*OPENAI_RECORD)
    spans = template.render(Conversation(messages, "record")).spans  # one span per message
    call = next(span for message, span in zip(messages, spans) if message.metadata == "get_weather")
    return {"serve_prompt": template.prompt_ids(prompt_messages(request, template)),
            "reply": template.render_message(Message("assistant", ANSWER))[0][1:] + template.suffix,
            "call_text": bundle.tokenizer.decode(call.ids[1:])}  # what the model writes after <|assistant|>


@pytest.mark.parametrize("model", sorted(MODELS))
def test_openai_tool_data_trains_exactly_the_prompt_chat_and_serve_build(model, models, native_glm4, tools_file,
                                                                        tmp_path, monkeypatch):
    """Tools + a call + its result + the reply, as OpenAI training data: the training stream is the prompt
    glmport serve builds for that conversation followed by the reply, chat builds the same prompts on the way,
    and the call as training renders it reads back as the call (one rendering per family, see toolcalls)."""
    family = model.split("-")[0]
    scripted = ScriptedModel(family, [(CALLS[family], "observation"), ("\n" + ANSWER, "eos")], record=OPENAI_RECORD,
                             inspect=_serve_and_training_views)
    monkeypatch.setattr(glmport.infer, "generate_ids", scripted)
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"name": "get_weather", "result": RESULT}) + "\n")
    folder = native_glm4 if model == "glm4-native" else models[MODELS[model]]
    out = ok(_chat(monkeypatch, folder, f"{QUESTION}\n", "--tools", tools_file, "--tool-results", results))
    assert out.stdout == f'[tool call] get_weather {{"city": "Paris"}}\n{ANSWER}\n'
    views = scripted.inspected
    assert scripted.training_ids == views["serve_prompt"] + views["reply"]
    assert scripted.prompts[-1] == views["serve_prompt"]  # chat, after the tool's result: the same prompt
    scripted.assert_prompts_are_the_training_stream()
    assert views["call_text"] == CALLS[family]  # the family's own call syntax, as the model writes it
    call = parse_tool_call(family, views["call_text"])
    assert (call.name, call.arguments) == ("get_weather", {"city": "Paris"})


def test_the_result_typed_on_stdin_as_json_or_text(models, tools_file, monkeypatch):
    scripted = _script("chatglm3")
    monkeypatch.setattr(glmport.infer, "generate_ids", scripted)
    out = ok(_chat(monkeypatch, models["remote"], f"{QUESTION}\n{json.dumps(RESULT)}\n{THANKS}\n", "--tools",
                   tools_file))
    assert out.stdout == f'[tool call] get_weather {{"city": "Paris"}}\n{ANSWER}\n{WELCOME}\n'
    scripted.assert_prompts_are_the_training_stream()  # the typed JSON became the same observation


def test_reset_keeps_the_tools_and_end_of_input_ends_the_chat(models, tools_file, monkeypatch):
    scripted = ScriptedModel("glm4", [(CALLS["glm4"], "observation"), ("\n" + ANSWER, "eos"),
                                      (CALLS["glm4"], "observation")])
    monkeypatch.setattr(glmport.infer, "generate_ids", scripted)
    out = ok(_chat(monkeypatch, models["remote-glm4"], f"{QUESTION}\nsunny\n/reset\n{QUESTION}\n", "--tools",
                   tools_file))
    assert out.stdout == f'[tool call] get_weather {{"city": "Paris"}}\n{ANSWER}\n' \
                         f'[tool call] get_weather {{"city": "Paris"}}\n'  # the input ended while a result was due
    assert scripted.prompts[2] == scripted.prompts[0]  # after /reset: the tools and the question, nothing else
    assert scripted.replies == []


def test_results_file_must_match_the_calls(models, tools_file, tmp_path, monkeypatch):
    monkeypatch.setattr(glmport.infer, "generate_ids", _script("chatglm3"))
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"name": "get_time", "result": "noon"}) + "\n")
    failed = ok(_chat(monkeypatch, models["remote"], f"{QUESTION}\n", "--tools", tools_file, "--tool-results",
                      results), exit_code=2)
    assert f"{results}:1: the result is for get_time, but the model called get_weather" in failed.stderr

    monkeypatch.setattr(glmport.infer, "generate_ids", _script("chatglm3"))
    results.write_text("")
    failed = ok(_chat(monkeypatch, models["remote"], f"{QUESTION}\n", "--tools", tools_file, "--tool-results",
                      results), exit_code=2)
    assert "no result left for tool call 1 (get_weather)" in failed.stderr


def test_bad_tool_files_fail_before_the_model_loads(tmp_path, monkeypatch):
    tools = tmp_path / "tools.json"
    tools.write_text('[{"description": "nameless"}]')
    failed = ok(_chat(monkeypatch, tmp_path / "no-model", "hi\n", "--tools", tools), exit_code=2)
    assert "tool 0" in failed.stderr and "no function name" in failed.stderr
    tools.write_text(json.dumps([WEATHER]))
    results = tmp_path / "results.jsonl"
    results.write_text('{"name": "get_weather"}\n')
    failed = ok(_chat(monkeypatch, tmp_path / "no-model", "hi\n", "--tools", tools, "--tool-results", results),
                exit_code=2)
    assert f"{results}:1: expected" in failed.stderr


def test_a_long_conversation_drops_its_oldest_turns_whole(models, monkeypatch):
    """The tiny model takes 1024 positions; with 824 kept for the reply, two turns fit (about 155 tokens), three
    (about 250) do not."""
    turns = [f"question {n}: " + "x" * 40 for n in range(3)]
    scripted = ScriptedModel("chatglm3", [("\n" + "y" * 40, "eos")] * 3)
    monkeypatch.setattr(glmport.infer, "generate_ids", scripted)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))
    out = ok(run_cli("chat", models["remote"], "--max-new-tokens", "824"))
    assert out.stdout == ("y" * 40 + "\n") * 3
    assert "the oldest 2 message(s) are left out of the prompt" in out.stderr
    first, second, third = (scripted.tokenizer.decode(p) for p in scripted.prompts)
    assert "question 0" in second and third.startswith("[gMASK]sop<|user|>\nquestion 1: ")  # whole turns
    assert "question 0" not in third and "question 2" in third and len(scripted.prompts[2]) <= 1024 - 824
