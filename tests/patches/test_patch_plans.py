"""``glmport patch plan``: which patches a folder gets for each backend and mode, and why.

The expected plans are written out below from the rules of patches/__init__.py and patches/compat.py:
compat-checkpointing-hook only for the 2023 ChatGLM3 files (release, Nov, Dec), compat-gradient-checkpointing
for the 2024 ChatGLM3 files and GLM-4, compat-prefix-tokens for ChatGLM3 only, compat-cache-input for GLM-4 only,
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
    manager,
    model_info,
    plan_rows,
    source_params,
)

from glmport.patching.manifest import REMOTE_FILES, FileIdentity, known_revisions, load_manifest
from glmport.testing import ok, run_cli

A, S = "apply", "skip"

# compat rows per upstream revision of the modeling file (a fixture imitates one of these). The rows are
# the same for every revision but for the checkpointing pair: the 2023 files (the release of 2023-10-27, the
# type-hint fix of 2023-11-01, the 2023-12-07 file) still have the old `_set_gradient_checkpointing(module,
# value)` hook, the 2024 files the no-op `gradient_checkpointing_enable`. Every modeling revision the
# manifest knows has a row (test_every_known_modeling_revision_has_a_golden_plan).
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
CHATGLM3_2023 = SHARED_COMPAT + [
    ("compat", "compat-prefix-tokens", A),
    ("compat", "compat-gradient-checkpointing", S),
    ("compat", "compat-checkpointing-hook", A),
]
# ChatGLM2: ChatGLM3's 2023 hook throughout; the files before Oct 2023 also cut generation inputs without a
# cache, and their tokenizer (used up to 2023-10-07) initializes its base class too early
CHATGLM2_BEFORE_OCT = SHARED_COMPAT + [
    ("compat", "compat-prefix-tokens", A),
    ("compat", "compat-checkpointing-hook", A),
    ("compat", "compat-generation-use-cache", A),
    ("compat", "compat-rotary-fp32", A),
    ("compat", "compat-tokenizer-init", A),
]
COMPAT = {
    "chatglm2-6b-2023-07": CHATGLM2_BEFORE_OCT,
    "chatglm2-6b-2023-09": CHATGLM2_BEFORE_OCT,
    "chatglm2-6b-2023-10": SHARED_COMPAT + [
        ("compat", "compat-prefix-tokens", A),
        ("compat", "compat-checkpointing-hook", A),
        ("compat", "compat-generation-use-cache", S),
        ("compat", "compat-rotary-fp32", A),
        ("compat", "compat-tokenizer-init", S),
    ],
    "chatglm3-6b-2023-10": CHATGLM3_2023,
    "chatglm3-6b-2023-11": CHATGLM3_2023,
    "chatglm3-6b-2023-12": CHATGLM3_2023,
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

TOKENIZER_PATCHES = {"compat-tokenizer-pad", "compat-tokenizer-batch-encode-plus", "compat-tokenizer-init"}
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
        elif entry.patch.id in TOKENIZER_PATCHES and not source.has_tokenizer:
            # the tokenizer code is not used, unless a revision rule skipped the patch first
            assert "tokenization" in entry.reason or entry.reason == f"not needed for {source.imitated}"
        else:
            assert entry.reason == f"not needed for {source.imitated}"

    from glmport.cli import main  # the same plan through the command line (in this process)

    assert main(["patch", "plan", str(folder), "--backend", backend, "--mode", mode, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(p["set"], p["id"], p["status"]) for p in data["patches"]] == expected_rows(source, backend, mode)
    assert data["problems"] == [] and data["files"]["modeling"]["revision"] == modeling.revision


FAMILIES = ("chatglm3", "glm4", "chatglm2")  # the remote-code families whose plans the tables above hold


def manifest_revisions(key: str | None = None) -> list[str]:
    """Revisions of :data:`FAMILIES` in patches/manifest.json (only those with a ``key`` file, if given)."""
    manifest = load_manifest()
    names = [REMOTE_FILES[key]] if key else list(REMOTE_FILES.values())
    listed = {entry["revision"] for name in names for entry in manifest["files"].get(name, {}).values()}
    return sorted(r for r, meta in manifest["revisions"].items() if meta["family"] in FAMILIES and r in listed)


def test_every_known_modeling_revision_has_a_golden_plan():
    """A revision added to the manifest needs its expected plan here (and a patch rule that produces it)."""
    assert set(COMPAT) == set(manifest_revisions("modeling"))


@pytest.mark.parametrize("backend, mode", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("revision", manifest_revisions())
def test_plan_rules_for_every_manifest_revision(revision, backend, mode, model_dir, monkeypatch):
    """The patch rules over every revision the manifest knows, without the upstream files: the family's fixture
    folder, its files identified as ``revision`` where the manifest lists a file of that revision (a
    tokenizer-only revision keeps the fixture's modeling file, and with it that file's plan). The real files
    get the same table through test_plan_table when GLMPORT_UPSTREAM_DIR holds them."""
    from glmport.patching import session
    from glmport.patching.session import make_plan as engine_plan

    family = load_manifest()["revisions"][revision]["family"]
    folder = model_dir(next(s for s in fixture_sources() if s.family == family))
    real = session.identify_remote_folder(folder)
    listed = {key for key, name in REMOTE_FILES.items()
              if any(e["revision"] == revision for e in load_manifest()["files"].get(name, {}).values())}
    assert listed, revision
    files = {key: FileIdentity(key, f.path, f.sha256, revision) if key in listed else f for key, f in real.items()}
    monkeypatch.setattr(session, "identify_remote_folder", lambda path: dict(files))

    plugins = manager()
    plan = engine_plan(model_info(folder), plugins.backends.get(backend), mode, plugins.patch_sets)
    assert plan.problems == []
    modeling = files["modeling"].effective_revision
    assert plan_rows(plan) == COMPAT[modeling] + BACKEND_SETS[(backend, mode)]
    skipped = {e.reason for e in plan.entries if e.status == S}
    assert skipped <= {f"not needed for {modeling}"}, skipped


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
    assert f"known revisions of this file: {', '.join(known_revisions('modeling'))}" in out.stdout
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
