"""glmport convert's chat templates give, token for token, the ids of glmport's template module.

Conversations with a system message, several turns, tools (declared on the system message or through the
``tools`` argument), tool calls and their results, and the real data sets as dialogues. The SentencePiece
and tiktoken stand-ins come from convertkit; the tiny fixtures' own tokenizers are checked in
test_convert_tokenizer.py and, end to end, in tests/e2e/test_export_convert.py.
"""

from __future__ import annotations

import json

import pytest
from convertkit import (
    CHATGLM2_SPECIALS,
    SHARED_DATA,
    SentencePieceSource,
    TiktokenSource,
    glm4_pattern,
    real_texts,
    train_sentencepiece,
    train_tiktoken_ranks,
)

from glmport.convert import chat_template
from glmport.convert.tokenizer import build
from glmport.data.formats import read_record
from glmport.data.records import TOOLS_PREAMBLE, Message
from glmport.data.templates import get_template
from glmport.errors import ModelError

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data sets not found at {SHARED_DATA}")


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), real_texts())


@pytest.fixture(scope="module")
def ranks_file(tmp_path_factory):
    return train_tiktoken_ranks(tmp_path_factory.mktemp("tiktoken"), real_texts(), glm4_pattern())


def real_dialogues(family: str, count: int = 150) -> list[list[Message]]:
    """Dialogues from the real data: AdvertiseGen pairs, huanhuan role-play (system, two rounds)."""
    ads = [json.loads(line) for line in (SHARED_DATA / "advertisegen" / "dev.jsonl").read_text().splitlines()[:count]]
    roles = json.loads((SHARED_DATA / "huanhuan" / "huanhuan.json").read_text(encoding="utf-8"))[: 2 * count]
    out = [[Message("user", r["content"]), Message("assistant", r["summary"])] for r in ads]
    for first, second in zip(roles[::2], roles[1::2]):
        system = [Message("system", "现在你要扮演皇帝身边的女人--甄嬛")]
        out.append(system + [Message("user", first["instruction"] + first["input"]), Message("assistant", first["output"]),
                             Message("user", second["instruction"])])
    return out


def assert_same_ids(fast, template, conversations, **template_kwargs) -> int:
    for messages in conversations:
        want, prompt = chat_template.expected_ids(template, messages)
        got = fast.apply_chat_template(chat_template.as_dicts(messages), add_generation_prompt=prompt, tokenize=True,
                                       return_dict=False, **template_kwargs)
        assert list(got) == want, (messages, fast.decode(got), fast.decode(want))
    return len(conversations)


def sentencepiece_family(sp_file, family):
    specials = CHATGLM2_SPECIALS if family == "chatglm2" else None
    source = SentencePieceSource(sp_file, *([specials] if specials else []))
    template_text = getattr(chat_template, family)(dummy_prefix=True)
    return build(source, family, template_text).tokenizer, get_template(family, source)


@pytest.mark.parametrize("family", ["chatglm3", "chatglm2"])
def test_sentencepiece_chat_templates_reproduce_the_template_module(sp_file, family):
    """The dummy prefix of each encode call comes out right: sample conversations and 300 real dialogues,
    with the generation prompt and without it (a dialogue ending in a reply)."""
    fast, template = sentencepiece_family(sp_file, family)
    samples = [messages for _, messages in chat_template.sample_conversations(family)]
    assert assert_same_ids(fast, template, samples + real_dialogues(family)) > 300
    # the prompt part of each dialogue too
    assert assert_same_ids(fast, template, [d[:-1] for d in real_dialogues(family)[:50]])


def test_chatglm3_tools_argument_reads_as_a_conversations_record_with_tools(sp_file):
    """``apply_chat_template(..., tools=...)`` writes the system message glmport makes of a ChatGLM3
    ``conversations`` record's ``tools``: the README's preamble, then the tools as indented JSON."""
    fast, template = sentencepiece_family(sp_file, "chatglm3")
    tools = [{"name": "track", "description": "追踪指定股票的实时价格",
              "parameters": {"type": "object", "properties": {"symbol": {"description": "需要追踪的股票代码"}},
                             "required": ["symbol"]}}]
    record = {"tools": tools, "conversations": [
        {"role": "user", "content": "帮我看看 10111 的价格"},
        {"role": "tool", "name": "track", "parameters": {"symbol": "10111"}, "observation": {"price": 12412}},
        {"role": "assistant", "content": "当前价格为 12412。"},
    ]}
    messages = read_record("conversations", record)
    assert messages[0] == Message("system", TOOLS_PREAMBLE, tools=tools)
    want, _ = chat_template.expected_ids(template, messages)
    got = fast.apply_chat_template(chat_template.as_dicts(messages[1:]), tools=tools, tokenize=True,
                                   return_dict=False)
    assert list(got) == want
    assert assert_same_ids(fast, template, [messages])  # tools on the system message itself: the same


def test_chatglm2_difference_is_real_and_documented(sp_file):
    """What a single text cannot express (known_differences) really differs, so the report is not a guess;
    whitespace where two parts meet does not."""
    fast, template = sentencepiece_family(sp_file, "chatglm2")

    def same(messages):
        want, prompt = chat_template.expected_ids(template, messages)
        return fast.apply_chat_template(chat_template.as_dicts(messages), add_generation_prompt=prompt,
                                        tokenize=True, return_dict=False) == want

    assert not same([Message("system", "  indented system"), Message("user", "你好")])
    assert same([Message("system", "system  "), Message("user", "  q1  "), Message("assistant", "  ok  "),
                 Message("user", "q2")])
    known = chat_template.known_differences("chatglm2", dummy_prefix=True)
    assert len(known) == 1 and "begins with whitespace" in known[0]
    assert chat_template.known_differences("chatglm3", dummy_prefix=True) == []


def test_chatglm2_refuses_what_its_format_cannot_say(sp_file):
    fast, _ = sentencepiece_family(sp_file, "chatglm2")
    with pytest.raises(Exception, match="no observation message"):
        fast.apply_chat_template([{"role": "user", "content": "x"}, {"role": "observation", "content": "{}"}],
                                 tokenize=False)


def test_glm4_keeps_the_model_template_and_it_reproduces_the_template_module(ranks_file):
    from glmport.tiny.remote import GLM4_CHAT_TEMPLATE

    source = TiktokenSource(ranks_file, glm4_pattern(), chat_template=GLM4_CHAT_TEMPLATE)
    fast = build(source, "glm4", GLM4_CHAT_TEMPLATE).tokenizer
    template = get_template("glm4", source)
    samples = [messages for _, messages in chat_template.sample_conversations("glm4")]
    assert assert_same_ids(fast, template, samples + real_dialogues("glm4")) > 300


# --- GLM-4's July 2024 tokenizer: the layout is learned from its Python renderer --------------------------------

class PythonRenderingGLM4(TiktokenSource):
    """A GLM-4 tokenizer that renders chats in Python, as glm-4-9b-chat's did in July 2024 (its texts are
    made up here: glm4_from_python must read them from the renderer, whatever they say)."""

    INTRO = "你是一个测试助手。\n\n# 工具"
    BUILTIN = {"python": "\n\n## python\n\n运行 Python 代码。", "simple_browser": "\n\n## simple_browser\n\n浏览网页 `【{id}†{text}】`。"}

    def __init__(self, ranks_file, pattern, *, broken=False):
        super().__init__(ranks_file, pattern)
        self.broken = broken

    def apply_chat_template(self, conversation, tokenize=True, add_generation_prompt=False, **_):
        text = "[gMASK]<sop>"
        for item in conversation:
            if item.get("tools"):
                content = self.INTRO
                for tool in item["tools"]:
                    if tool["type"] == "function":
                        function = tool["function"]
                        content += f"\n\n## {function['name']}\n\n{json.dumps(function, ensure_ascii=False, indent=4)}"
                        content += "\n调用时请用 JSON。" if not self.broken else f"\n{function['name']}"
                    elif tool["type"] in self.BUILTIN:
                        content += self.BUILTIN[tool["type"]]
                    else:
                        raise NotImplementedError(tool["type"])
                text += f"<|system|>\n{content}"
            if item["content"]:
                text += f"<|{item['role']}|>{item.get('metadata', '')}\n{item['content']}"
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text) if tokenize else text


def test_glm4_python_renderer_is_learned_into_an_equal_jinja_template(ranks_file):
    source = PythonRenderingGLM4(ranks_file, glm4_pattern())
    jinja = chat_template.glm4_from_python(source)
    fast = build(source, "glm4", jinja).tokenizer
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                               "parameters": {"type": "object", "properties": {}}}},
             {"type": "python"}, {"type": "simple_browser"},
             {"type": "function", "function": {"name": "second", "description": "x", "parameters": {}}}]
    conversations = [
        [{"role": "system", "content": "", "tools": tools}, {"role": "user", "content": "北京天气"}],
        [{"role": "system", "content": "你好", "tools": tools[:1]}, {"role": "user", "content": "q"},
         {"role": "assistant", "metadata": "get_weather", "content": "{\"city\": \"北京\"}"},
         {"role": "observation", "content": "{\"t\": 21}"}, {"role": "assistant", "content": ""}],
        [{"role": "user", "content": "  spaced\n\n"}],
    ]
    for conversation in conversations:
        for prompt in (True, False):
            assert fast.apply_chat_template(conversation, add_generation_prompt=prompt, tokenize=False) == \
                source.apply_chat_template(conversation, add_generation_prompt=prompt, tokenize=False)
    template = get_template("glm4", source)
    samples = [messages for _, messages in chat_template.sample_conversations("glm4")]
    assert assert_same_ids(fast, template, samples)


def test_a_renderer_of_another_shape_is_refused(ranks_file):
    with pytest.raises(ModelError, match="cannot learn the chat layout"):
        chat_template.glm4_from_python(PythonRenderingGLM4(ranks_file, glm4_pattern(), broken=True))
    with pytest.raises(ModelError, match="has no chat template"):
        chat_template.glm4_from_python(type("NoTemplate", (), {"chat_template": None})())
