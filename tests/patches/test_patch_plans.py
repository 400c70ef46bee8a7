"""``glmport patch plan``: which patches a folder gets for each backend and mode, and why.

The expected plans are written out below from the rules of patches/__init__.py and patches/compat.py:
compat-checkpointing-hook only for ChatGLM3 2023-12, compat-gradient-checkpointing for the 2024 ChatGLM3
files and GLM-4, compat-prefix-tokens for ChatGLM3 only, compat-cache-input for GLM-4 only,
and then the capability sets: no-torchscript on cpu and mlu (cuda runs TorchScript), int32 on mlu (no
64-bit kernels; for native folders too), accelerator on mlu and cuda (attention and rotary table in both
modes, label-row loss when training).
"""

from __future__ import annotations

import json

import pytest
from patchkit import (
    copy_folder_linking_weights,
    fixture_sources,
    make_plan,
    plan_rows,
    source_params,
)

from glmport.testing import ok, run_cli

A, S = "apply", "skip"

# compat rows per upstream revision of the modeling file (a fixture imitates one of these). The rows are
# the same for every revision but for the checkpointing pair: the 2023-12 file still has the old
# `_set_gradient_checkpointing(module, value)` hook, the 2024 files the no-op `gradient_checkpointing_enable`.
SHARED_COMPAT = [
    ("compat", "compat-config-use-cache", A),
    ("compat", "compat-generation", A),
    ("compat", "compat-model-init", A),
    ("compat", "compat-init-missing-weights", A),
    ("compat", "compat-tokenizer-pad", A),
    ("compat", "compat-tokenizer-batch-encode-plus", A),
]
CHATGLM3_2024 = SHARED_COMPAT + [
    ("compat", "compat-prefix-tokens", A),
    ("compat", "compat-gradient-checkpointing", A),
    ("compat", "compat-checkpointing-hook", S),
]
COMPAT = {
    "chatglm3-6b-2023-12": SHARED_COMPAT + [
        ("compat", "compat-prefix-tokens", A),
        ("compat", "compat-gradient-checkpointing", S),
        ("compat", "compat-checkpointing-hook", A),
    ],
    "chatglm3-6b-2024-06": CHATGLM3_2024,
    "chatglm3-6b-2024-08": CHATGLM3_2024,
    "glm-4-9b-chat-2024-07": SHARED_COMPAT + [
        ("compat", "compat-gradient-checkpointing", A),
        ("compat", "compat-cache-input", A),
    ],
}

ACCELERATOR_INFER = [("accelerator", "attention-varlen", A), ("accelerator", "rotary-cache", A)]
ACCELERATOR_TRAIN = ACCELERATOR_INFER + [("accelerator", "label-row-loss", A)]
BACKEND_SETS = {
    ("cpu", "infer"): [("no-torchscript", "torchscript-off", A)],
    ("cpu", "train"): [("no-torchscript", "torchscript-off", A)],
    ("cuda", "infer"): ACCELERATOR_INFER,
    ("cuda", "train"): ACCELERATOR_TRAIN,
    ("mlu", "infer"): [("no-torchscript", "torchscript-off", A), ("int32", "int32-positions", A)] + ACCELERATOR_INFER,
    ("mlu", "train"): [("no-torchscript", "torchscript-off", A), ("int32", "int32-positions", A)] + ACCELERATOR_TRAIN,
}

NATIVE_INT32 = [("int32", "native-mask32", A), ("int32", "native-positions32", A)]
NATIVE = {
    ("cpu", "infer"): [], ("cpu", "train"): [],
    ("cuda", "infer"): [], ("cuda", "train"): [],
    ("mlu", "infer"): NATIVE_INT32,
    ("mlu", "train"): NATIVE_INT32,
}

TOKENIZER_PATCHES = {"compat-tokenizer-pad", "compat-tokenizer-batch-encode-plus"}
COMBOS = [(b, m) for b in ("cpu", "cuda", "mlu") for m in ("infer", "train")]
COMBO_IDS = [f"{b}-{m}" for b, m in COMBOS]


def expected_rows(source, backend: str, mode: str) -> list[tuple[str, str, str]]:
    compat = COMPAT[source.imitated]
    if not source.has_tokenizer:  # upstream folders are built without tokenizer_config.json
        compat = [(s, pid, S if pid in TOKENIZER_PATCHES else status) for s, pid, status in compat]
    return compat + BACKEND_SETS[(backend, mode)]


@pytest.mark.parametrize("backend, mode", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("source", source_params())
def test_plan_table(source, backend, mode, model_dir, fresh_plugin_manager, capsys):
    folder = model_dir(source)
    plan = make_plan(folder, backend, mode)
    assert plan.problems == []
    assert plan_rows(plan) == expected_rows(source, backend, mode)
    assert (plan.kind, plan.family, plan.backend, plan.mode) == ("remote", source.family, backend, mode)
    modeling = plan.files["modeling"]
    if source.kind == "fixture":
        assert (modeling.revision, modeling.imitates) == (f"glmport-fixture-{source.name}", source.imitated)
    else:
        assert (modeling.revision, modeling.imitates) == (source.revision, None)
    for entry in plan.entries:
        if entry.status == "apply":
            assert entry.reason == entry.patch.why
        elif entry.patch.id in TOKENIZER_PATCHES:
            assert "tokenization" in entry.reason
        else:
            assert entry.reason == f"not needed for {source.imitated}"

    from glmport.cli import main  # the same plan through the command line (in this process)

    assert main(["patch", "plan", str(folder), "--backend", backend, "--mode", mode, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(p["set"], p["id"], p["status"]) for p in data["patches"]] == expected_rows(source, backend, mode)
    assert data["problems"] == [] and data["files"]["modeling"]["revision"] == modeling.revision


@pytest.mark.parametrize("backend, mode", COMBOS, ids=COMBO_IDS)
def test_native_plan_table(backend, mode, native_dir):
    plan = make_plan(native_dir("chatglm3"), backend, mode)
    assert plan.problems == [] and plan.family == "glm-native" and plan.kind == "native"
    assert plan_rows(plan) == NATIVE[(backend, mode)]
    assert plan.files["transformers"].revision == "glm-native-transformers-5"


def test_cli_plan_in_a_subprocess(model_dir):
    source = next(s for s in fixture_sources() if s.family == "glm4")
    folder = model_dir(source)
    out = ok(run_cli("patch", "plan", str(folder), "--backend", "mlu", "--mode", "train", "--json", in_process=False))
    data = json.loads(out.stdout)
    assert [(p["set"], p["id"], p["status"]) for p in data["patches"]] == expected_rows(source, "mlu", "train")
    assert data["files"]["modeling"]["imitates"] == "glm-4-9b-chat-2024-07"
    varlen = next(p for p in data["patches"] if p["id"] == "attention-varlen")
    assert varlen["replaces"] == ["CoreAttention.forward", "SdpaAttention.forward", "ChatGLMModel.get_masks"]
    assert varlen["why"].startswith("attention via the variable-length kernel")
    assert varlen["requires"] == ["accelerator"] and varlen["backends"] == "*"


def test_cli_refused_plan_exits_2_and_says_refused(model_dir, tmp_path):
    source = next(s for s in fixture_sources() if s.name == "chatglm3-2023-12")
    folder = copy_folder_linking_weights(model_dir(source), tmp_path / "edited")
    with open(folder / "modeling_chatglm.py", "a", encoding="utf-8") as handle:
        handle.write("\n# a local edit\n")
    out = run_cli("patch", "plan", str(folder), "--backend", "mlu", "--mode", "train")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "REFUSED:" in out.stdout and "unknown revision" in out.stdout
    assert "known revisions of this file: chatglm3-6b-2023-12, chatglm3-6b-2024-06" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines()
            if line.strip().startswith(("no-torchscript", "int32", "accelerator"))]
    assert rows and all(row[2] == "refused" for row in rows)


def test_cli_plan_human_output_and_argument_errors(model_dir, fresh_plugin_manager, capsys):
    from glmport.cli import main

    source = next(s for s in fixture_sources() if s.name == "chatglm3-2024-06")
    folder = model_dir(source)
    assert main(["patch", "plan", str(folder), "--backend", "cpu", "--mode", "infer"]) == 0
    out = capsys.readouterr().out
    assert "remote chatglm3, backend cpu, mode infer" in out
    assert "glmport test module imitating chatglm3-6b-2024-06" in out
    assert "compat-checkpointing-hook" in out and "not needed for chatglm3-6b-2024-06" in out
    assert f"{len([r for r in expected_rows(source, 'cpu', 'infer') if r[2] == A])} patch(es) will be applied." in out

    assert main(["patch", "plan", str(folder), "--mode", "infer"]) == 2
    assert "--backend is required" in capsys.readouterr().err
    assert main(["patch", "plan", str(folder), "--backend", "tpu", "--mode", "infer"]) == 3
    assert "no such backend. Known backends: mlu, cuda, cpu" in capsys.readouterr().err

    assert main(["patch", "list"]) == 0
    listing = capsys.readouterr().out
    for name in ("compat", "no-torchscript", "int32", "accelerator"):
        assert f"{name}: " in listing and "(from plugin patches)" in listing
    assert "REQUIRES" in listing and "lacks-64bit" in listing
