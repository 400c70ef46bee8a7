"""ChatGLM2-6B end to end on the real data of ../shared/data: AdvertiseGen (content/summary) as it is and
converted to ChatGLM3 conversations by ``glmport data convert``, the ChatGLM-6B tutorial's context/target
records; ``glmport train`` from the command line, then ``glmport infer`` on the result with the ChatGLM2
prompt (``[gMASK] sop`` + the tokenizer's own ``build_prompt``), on cpu and emulated mlu."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from e2e_cli import summary, write_config

from glmport.testing import ok, run_cli

pytestmark = pytest.mark.slow


def _first_lines(source: Path, target: Path, count: int) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:count]), encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def real_data(shared_data, tmp_path_factory) -> Path:
    """train.jsonl: AdvertiseGen records converted to ChatGLM3 conversations; dev.jsonl: AdvertiseGen as it is."""
    folder = tmp_path_factory.mktemp("chatglm2-data")
    ads = _first_lines(shared_data / "advertisegen" / "dev.jsonl", folder / "raw" / "ads.jsonl", 24)
    ok(run_cli("data", "convert", ads, folder / "train.jsonl"))
    assert json.loads((folder / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])["conversations"]
    lines = (shared_data / "advertisegen" / "dev.jsonl").read_text(encoding="utf-8").splitlines()[100:108]
    (folder / "dev.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_lora_on_real_data_then_infer_with_the_chatglm2_prompt(models, real_data, tmp_path):
    config = write_config(tmp_path, "lora", max_input_length=96, max_output_length=96)
    ok(run_cli("train", real_data, models["remote-chatglm2"], config, "-q", in_process=False))
    s = summary(tmp_path)
    assert (s["model_family"], s["steps"]) == ("chatglm2", 4) and math.isfinite(s["eval"]["loss"])
    final = tmp_path / "out" / "final"
    for backend, env in (("cpu", {}), ("mlu", {"GLMPORT_EMULATE": "mlu"})):
        out = ok(run_cli("infer", final, "--prompt", "类型#裙*颜色#红色", "--max-new-tokens", "4", "--json",
                         "--backend", backend, env=env, in_process=False))
        reply = json.loads(out.stdout.strip().splitlines()[-1])
        assert reply["backend"] == backend and isinstance(reply["reply"], str)
        assert reply["model"].startswith("remote chatglm2 model") and "compat/compat-rotary-fp32" in reply["patches"]

    # the prompt glmport infer generates from: ChatGLM2's, built by the model's own tokenizer
    from glmport.data.records import Message
    from glmport.infer import load_for_inference
    from glmport.plugins import PluginManager

    plugins = PluginManager(autoload=False)
    bundle = load_for_inference(final, plugins.backends.get("cpu"), patch_sets=plugins.patch_sets)
    try:
        tokenizer = bundle.tokenizer
        expected = tokenizer.encode(tokenizer.build_prompt("类型#裙"), add_special_tokens=True)
        assert bundle.template.name == "chatglm2" and expected[:2] == [64790, 64792]
        assert bundle.template.prompt_ids([Message("user", "类型#裙")]) == expected
    finally:
        bundle.loaded.patches.undo()


def test_context_target_records_with_ptuning_on_emulated_mlu(models, shared_data, tmp_path):
    data = tmp_path / "data"
    _first_lines(shared_data / "context-target" / "mixed_train_dataset.jsonl", data / "train.jsonl", 16)
    _first_lines(shared_data / "context-target" / "mixed_dev_dataset.jsonl", data / "dev.jsonl", 4)
    config = write_config(tmp_path, "ptuning", max_input_length=96, max_output_length=64)
    ok(run_cli("train", data, models["remote-chatglm2"], config, "--backend", "mlu", "-q",
               env={"GLMPORT_EMULATE": "mlu"}, in_process=False))
    s = summary(tmp_path)
    assert (s["model_family"], s["method"], s["steps"]) == ("chatglm2", "ptuning", 4)
    assert s["guard_64bit"]["leaks"] == [] and math.isfinite(s["last_loss"])
    assert (tmp_path / "out" / "final" / "prefix_encoder.safetensors").is_file()
