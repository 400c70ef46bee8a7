"""`glmport train` and `glmport infer` on a native GLM-4-0414 folder (``model_type: glm4``, Glm4ForCausalLM)."""

from __future__ import annotations

import json
import math

import pytest
from e2e_cli import summary, write_config

from glmport.testing import ok, run_cli


@pytest.fixture(scope="module")
def glm4_0414(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-native-glm4"
    ok(run_cli("init-model", "tiny-native", folder, "--arch", "glm4"))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "mlu"])
def test_lora_train_then_infer(backend, glm4_0414, data_dir, tmp_path):
    env = {"GLMPORT_EMULATE": "mlu"} if backend == "mlu" else {}
    config = write_config(tmp_path, "lora")
    ok(run_cli("train", data_dir, glm4_0414, config, "--backend", backend, "-q", env=env, in_process=False))
    s = summary(tmp_path)
    assert s["steps"] == 4 and s["backend"] == backend and s["model_family"] == "glm4"
    assert math.isfinite(s["first_loss"]) and math.isfinite(s["last_loss"])
    assert "eval" in s and math.isfinite(s["eval"]["loss"])
    final = tmp_path / "out" / "final"
    result = json.loads((final / "glmport_result.json").read_text())
    assert result["content"] == "adapter" and result["family_detection"]["family"] == "glm4"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    if backend == "mlu":
        assert s["emulated"] and s["guard_64bit"]["mode"] == "error" and s["guard_64bit"]["leaks"] == []
        assert s["patches"].startswith("patches for glm4-native/mlu/train"), s["patches"]
        assert "int32/native-mask32" in s["patches"] and "int32/native-positions32" in s["patches"]

    out = ok(run_cli("infer", final, "--prompt", "Sort these words alphabetically: b a", "--max-new-tokens", "4",
                     "--json", "--backend", backend, env=env, in_process=False))
    reply = json.loads(out.stdout.strip().splitlines()[-1])
    assert reply["backend"] == backend and isinstance(reply["reply"], str)
    assert " + adapter " in reply["model"] and "native glm4" in reply["model"]
    if backend == "mlu":
        assert "int32/native-positions32" in reply["patches"]
