"""Which generation a model is, from its own evidence: config.json, the tokenizer's special tokens (read from
the tokenizer, never assumed) and its chat template. ChatGLM2-6B keeps [gMASK] at ChatGLM3's id but has no
role tokens: it gets its own template, never the ChatGLM3 one, and evidence that disagrees is refused.
"""

from __future__ import annotations

import json

import pytest

from glmport.data.templates import TEMPLATES, detect_family, get_template
from glmport.errors import ConfigError, ModelError
from glmport.modeling import config_evidence, inspect_model_dir
from glmport.testing import run_cli
from glmport.tiny import build_tiny_model
from glmport.tiny.tokenizer import CHATGLM, CHATGLM2, CHATGLM3, build_fast_tokenizer

CHATGLM3_TOKENS = ("tokenizer has [gMASK] 64790, sop 64792, "
                   "<|system|>/<|user|>/<|assistant|>/<|observation|> 64794/64795/64796/64797; no <sop>, <|endoftext|>")
CHATGLM2_TOKENS = "tokenizer has [gMASK] 64790, sop 64792; no role tokens (<|user|>...), <sop>, <|endoftext|>"
GLM4_TOKENS = ("tokenizer has [gMASK] 151331, <sop> 151333, <|endoftext|> 151329, "
               "<|system|>/<|user|>/<|assistant|>/<|observation|> 151335/151336/151337/151338; no sop")

# config.json of the real downloads, as far as family detection reads them
CHATGLM3_CONFIG = {"model_type": "chatglm", "padded_vocab_size": 65024}
CHATGLM3_32K_CONFIG = {"model_type": "chatglm", "padded_vocab_size": 65024, "rope_ratio": 50}
GLM4_CONFIG = {"model_type": "chatglm", "padded_vocab_size": 151552, "rope_ratio": 500}
CHATGLM6B_CONFIG = {"model_type": "chatglm", "vocab_size": 130528, "position_encoding_2d": True}


def _tiny_tokenizer(kind: str, folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=kind == "tiny-remote")


# --- golden detection on the tiny models -------------------------------------------------------------------


@pytest.mark.parametrize("kind, family, config_facts", [
    ("tiny-native", "chatglm3", "config.json model_type glm, vocab_size 65024"),
    ("tiny-native", "glm4", "config.json model_type glm, vocab_size 151552"),
    ("tiny-remote", "chatglm3", "config.json model_type chatglm, padded_vocab_size 65024, no rope_ratio"),
    ("tiny-remote", "glm4", "config.json model_type chatglm, padded_vocab_size 151552, rope_ratio 1.0"),
    ("tiny-remote", "chatglm2", "config.json model_type chatglm, padded_vocab_size 65024, no rope_ratio"),
], ids=["native-chatglm3", "native-glm4", "remote-chatglm3", "remote-glm4", "remote-chatglm2"])
def test_tiny_models_golden(tmp_path, kind, family, config_facts):
    folder = build_tiny_model(kind, tmp_path / "model", family=family, num_layers=1)
    info = inspect_model_dir(folder)
    assert info.family == family
    detection = detect_family(_tiny_tokenizer(kind, folder), info.config)
    assert (detection.family, detection.template, detection.chosen_by) == (family, family, "detected")
    tokens = {"chatglm3": CHATGLM3_TOKENS, "glm4": GLM4_TOKENS, "chatglm2": CHATGLM2_TOKENS}[family]
    chat = ("chat_template writes [gMASK]<sop>" if kind == "tiny-remote" and family == "glm4" else "no chat_template")
    assert detection.describe() == f"template {family}: {tokens}; {chat}; {config_facts}"


# --- ChatGLM2-6B: its own template, never ChatGLM3's; ChatGLM-6B: its own too ---------------------------------


def test_a_chatglm2_tokenizer_gets_the_chatglm2_template_not_the_chatglm3_one(tok2):
    template = get_template("auto", tok2)
    assert (template.name, template.detection.family, template.detection.chosen_by) == ("chatglm2", "chatglm2",
                                                                                       "detected")
    assert template.detection.describe() == f"template chatglm2: {CHATGLM2_TOKENS}; no chat_template"


def test_a_chatglm2_folder_config_agrees_but_cannot_decide(tok2, tok3):
    # ChatGLM2-6B's config.json is ChatGLM3's (model_type chatglm, padded_vocab_size 65024): the tokenizer decides
    assert detect_family(tok2, CHATGLM3_CONFIG).family == "chatglm2"
    assert detect_family(tok3, CHATGLM3_CONFIG).family == "chatglm3"
    assert detect_family(tok2, CHATGLM3_CONFIG).describe().endswith(
        "config.json model_type chatglm, padded_vocab_size 65024, no rope_ratio")


def test_naming_the_chatglm3_template_cannot_make_a_chatglm2_tokenizer_speak_it(tok2):
    with pytest.raises(ModelError) as refused:
        get_template("chatglm3", tok2)
    text = str(refused.value)
    assert text.startswith("glmport.template (--template) chatglm3 contradicts the tokenizer")
    assert CHATGLM2_TOKENS + " (chatglm2)" in text
    assert "remove glmport.template (--template) (glmport detects the family), or use a ChatGLM3-6B tokenizer" in text


def test_evidence_against_a_chatglm2_tokenizer_is_refused(tok2, tok3):
    with pytest.raises(ModelError) as refused:
        detect_family(tok2, GLM4_CONFIG)
    assert str(refused.value).startswith("the model's config.json and its tokenizer are of different generations")
    assert CHATGLM2_TOKENS + " (chatglm2)" in str(refused.value)
    with pytest.raises(ModelError, match="glmport.model_family chatglm2 contradicts the tokenizer"):
        detect_family(tok3, CHATGLM3_CONFIG, model_family="chatglm2")
    with pytest.raises(ModelError, match="glmport.template chatglm3 contradicts glmport.model_family chatglm2"):
        detect_family(tok2, template="chatglm3", model_family="chatglm2", template_key="glmport.template")
    tok2_with_roles = build_fast_tokenizer(CHATGLM2)
    tok2_with_roles.chat_template = "[gMASK]sop{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    with pytest.raises(ModelError, match="the tokenizer's special tokens and its chat_template are of different"):
        detect_family(tok2_with_roles)


def test_a_chatglm2_remote_folder_is_chatglm2_before_its_tokenizer_loads(tmp_path):
    folder = build_tiny_model("tiny-remote", tmp_path / "chatglm2", family="chatglm2", num_layers=1)
    info = inspect_model_dir(folder)
    assert (info.kind, info.family) == ("remote", "chatglm2")  # the patches are chosen from this
    assert info.family_from == "remote code (modeling_chatglm.py glmport-fixture-chatglm2-2023-10)"
    assert inspect_model_dir(folder, "chatglm2").family_from == "glmport.model_family"
    chatglm3 = build_tiny_model("tiny-remote", tmp_path / "chatglm3", num_layers=1)
    assert inspect_model_dir(chatglm3).family == "chatglm3"


def test_a_chatglm6b_tokenizer_gets_the_chatglm6b_template():
    detection = detect_family(build_fast_tokenizer(CHATGLM), CHATGLM6B_CONFIG)
    assert (detection.family, detection.template, detection.chosen_by) == ("chatglm", "chatglm", "detected")
    assert detection.describe() == (
        "template chatglm: tokenizer has [gMASK] 130001, <sop> 130004; no role tokens (<|user|>...), sop, "
        "<|endoftext|>; no chat_template; config.json model_type chatglm, vocab_size 130528, no rope_ratio, "
        "position_encoding_2d")
    assert get_template("auto", build_fast_tokenizer(CHATGLM)).name == "chatglm"
    with pytest.raises(ModelError, match="glmport.template .--template. chatglm3 contradicts the tokenizer"):
        get_template("chatglm3", build_fast_tokenizer(CHATGLM))


def test_a_chatglm6b_folder_is_told_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CHATGLM6B_CONFIG))
    (tmp_path / "modeling_chatglm.py").write_text("")
    info = inspect_model_dir(tmp_path)
    assert (info.kind, info.family, info.family_from) == ("remote", "chatglm", "config.json")
    with pytest.raises(ModelError, match="glmport.model_family chatglm3 contradicts the model folder"):
        inspect_model_dir(tmp_path, "chatglm3")


# --- config evidence ------------------------------------------------------------------------------------------


def test_rope_ratio_alone_does_not_make_a_glm4():
    # chatglm3-6b-32k has rope_ratio 50: the vocabulary, not rope_ratio, tells the generations apart
    assert config_evidence(CHATGLM3_32K_CONFIG).families == {"chatglm2", "chatglm3"}
    assert config_evidence(GLM4_CONFIG).families == {"glm4"}
    assert config_evidence({"model_type": "glm", "vocab_size": 100}).families is None


def test_a_chatglm3_32k_folder_is_chatglm3(tmp_path, tok3):
    (tmp_path / "config.json").write_text(json.dumps(CHATGLM3_32K_CONFIG))
    (tmp_path / "modeling_chatglm.py").write_text("")
    info = inspect_model_dir(tmp_path)
    assert info.family == "chatglm3"
    assert detect_family(tok3, info.config).describe().endswith(
        "config.json model_type chatglm, padded_vocab_size 65024, rope_ratio 50")


def test_a_model_family_override_that_contradicts_config_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GLM4_CONFIG))
    (tmp_path / "modeling_chatglm.py").write_text("")
    with pytest.raises(ModelError) as refused:
        inspect_model_dir(tmp_path, "chatglm3")
    text = str(refused.value)
    assert "glmport.model_family chatglm3 contradicts the model folder" in text
    assert "config.json model_type chatglm, padded_vocab_size 151552, rope_ratio 500 (glm4)" in text


# --- disagreements --------------------------------------------------------------------------------------------


def test_config_says_glm4_tokenizer_says_chatglm3(tok3):
    with pytest.raises(ModelError) as refused:
        detect_family(tok3, GLM4_CONFIG)
    text = str(refused.value)
    assert text.startswith("the model's config.json and its tokenizer are of different generations")
    assert "config.json model_type chatglm, padded_vocab_size 151552, rope_ratio 500 (glm4)" in text
    assert CHATGLM3_TOKENS + " (chatglm3)" in text


def test_a_model_family_override_that_contradicts_the_tokenizer_is_refused(tok3):
    with pytest.raises(ModelError) as refused:
        detect_family(tok3, CHATGLM3_CONFIG, model_family="glm4")
    text = str(refused.value)
    assert "glmport.model_family glm4 contradicts the tokenizer" in text
    assert CHATGLM3_TOKENS + " (chatglm3)" in text
    assert "remove glmport.model_family" in text


def test_a_template_override_that_contradicts_the_tokenizer_is_refused(tok3, tok4):
    with pytest.raises(ModelError) as refused:
        get_template("glm4", tok3)
    assert "glmport.template (--template) glm4 contradicts the tokenizer" in str(refused.value)
    with pytest.raises(ModelError, match="glmport.template glm4 contradicts the tokenizer"):
        detect_family(tok3, template="glm4", template_key="glmport.template")
    with pytest.raises(ModelError, match="glmport.template chatglm3 contradicts glmport.model_family glm4"):
        detect_family(tok4, template="chatglm3", model_family="glm4", template_key="glmport.template")


def test_a_template_override_that_agrees_with_the_tokenizer_wins(tok3):
    detection = detect_family(tok3, CHATGLM3_CONFIG, template="chatglm3", template_key="glmport.template")
    assert (detection.template, detection.chosen_by) == ("chatglm3", "glmport.template")
    assert detection.describe().startswith("template chatglm3 (glmport.template, agrees with the evidence): ")
    assert get_template("chatglm3", tok3).detection.chosen_by == "glmport.template (--template)"


def test_a_template_override_decides_for_a_tokenizer_of_no_known_layout():
    tok = build_fast_tokenizer(CHATGLM3)
    tok.add_special_tokens({"additional_special_tokens": ["<sop>"]})  # both sop and <sop>: no known layout
    with pytest.raises(ModelError, match="cannot tell which model family the tokenizer belongs to"):
        get_template("auto", tok)
    assert get_template("chatglm3", tok).name == "chatglm3"


def test_tokens_and_chat_template_that_disagree_are_refused():
    tok = build_fast_tokenizer(CHATGLM3)
    tok.chat_template = "{% for m in messages %}[Round {{ loop.index }}]\n\n问：{{ m.content }}\n\n答：{% endfor %}"
    with pytest.raises(ModelError) as refused:
        get_template("auto", tok)
    text = str(refused.value)
    assert "the tokenizer's special tokens and its chat_template are of different generations" in text
    assert "chat_template writes [Round N] 问/答 prompts (chatglm or chatglm2)" in text


def test_a_tokenizer_without_gmask_is_named_with_what_it_has():
    class Plain:
        unk_token_id = 0
        chat_template = None

        def convert_tokens_to_ids(self, token):
            return 0

    with pytest.raises(ModelError) as refused:
        detect_family(Plain())
    text = str(refused.value)
    assert "cannot tell which model family the tokenizer belongs to" in text
    assert "tokenizer has no role tokens (<|user|>...), [gMASK], sop, <sop>, <|endoftext|>" in text
    assert f"name the template (glmport.template / --template {'|'.join(TEMPLATES)})" in text


def test_an_unknown_template_name_is_a_config_error(tok3):
    with pytest.raises(ConfigError, match="unknown template 'glm5'"):
        get_template("glm5", tok3)


# --- the run says what it detected ----------------------------------------------------------------------------


def test_glmport_train_logs_the_detection(tmp_path):
    model = build_tiny_model("tiny-native", tmp_path / "model", family="glm4", num_layers=1)
    # combine mode learns only the last reply, which says "loss": false: the run stops while building the data,
    # after the detection (the record itself is valid, so reading the data file lets it through)
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                           {"role": "user", "content": "go"}, {"role": "assistant", "content": "no", "loss": False}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "config.yaml").write_text(
        "data_config: {train_file: train.jsonl}\nmax_input_length: 16\nmax_output_length: 16\ncombine: true\n"
        f"training_args: {{output_dir: {tmp_path / 'out'}, max_steps: 1, report_to: none}}\n"
        "peft_config: {peft_type: LORA, task_type: CAUSAL_LM, r: 2}\n"
        f"glmport: {{model_dir: {model}, dtype: fp32}}\n")
    result = run_cli("train", tmp_path / "config.yaml")
    assert result.exit_code == 2, result
    assert f"[glmport] template glm4: {GLM4_TOKENS}; no chat_template; " \
           "config.json model_type glm, vocab_size 151552\n" in result.stderr
    assert "learns only the last assistant message" in result.stderr
