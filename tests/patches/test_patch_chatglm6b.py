"""ChatGLM-6B's patch sets (``glmport.patches.chatglm6b``) on glmport's fixture and, when ``GLMPORT_UPSTREAM_DIR``
holds them, on the real THUDM/chatglm-6b files of every manifest revision (folders named after the revisions).

* plans: compat on every backend; TorchScript off on cpu and mlu; int32 ids on mlu; SDPA attention (and the
  label-row loss in training) on accelerators;
* apply/undo: exactly the declared targets change, and undo puts back the very same objects;
* numerics: the compat-only model, the cpu, emulated-cuda and emulated-mlu sets give the same logits on a
  padded batch, and every row equals that row alone; the real files give the fixture's logits, to fp32
  rounding, from the same weights;
* the 64-bit guard: training steps (with gradient checkpointing and P-Tuning v2) and generation on emulated
  mlu are clean with the mlu sets, and the compat set alone is not;
* the real tokenizer (with a synthetic SentencePiece model of ChatGLM-6B's layout): fails on transformers 5
  unpatched, and with the compat set loads, encodes ChatGLM-6B's layout and pads.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from functools import cache

import pytest
import torch
from patchkit import (
    ATOL,
    SESSION_ATTR,
    Source,
    backend,
    capture_state,
    changes,
    declared_targets,
    imported_modules,
    make_plan,
    manager,
    model_info,
    on_device,
    patched_model,
    plan_rows,
    restore_state,
    snapshot,
    source_params,
)

from glmport.errors import SixtyFourBitError
from glmport.guard import sixty_four_bit_guard
from glmport.patching import PatchSet
from glmport.patching.registry import PatchRegistry
from glmport.patching.session import apply_patches, patch_session
from glmport.train.guarded import guarded_forward

SOURCES = source_params(families=("chatglm",))
UPSTREAM = source_params(fixtures=False, families=("chatglm",))
GMASK, SOP = 130001, 130004
COMPAT = {"compat-tokenizer-init", "compat-tokenizer-pad", "compat-model-init", "compat-init-missing-weights",
          "compat-rotary-bf16", "compat-prefix-tokens", "compat-checkpointing-hook", "compat-transformers-inputs",
          "compat-generation"}
DEVICE = {  # (backend, mode) -> the device patches on top of compat
    ("cpu", "infer"): {"no-torchscript/torchscript-off"},
    ("cpu", "train"): {"no-torchscript/torchscript-off"},
    ("cuda", "infer"): {"accelerator/attention-sdpa"},
    ("cuda", "train"): {"accelerator/attention-sdpa", "accelerator/label-row-loss"},
    ("mlu", "infer"): {"no-torchscript/torchscript-off", "int32/int32-positions", "accelerator/attention-sdpa"},
    ("mlu", "train"): {"no-torchscript/torchscript-off", "int32/int32-positions", "accelerator/attention-sdpa",
                       "accelerator/label-row-loss"},
}


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """``folder(source)``: a tiny ChatGLM-6B folder; for upstream sources the real .py files of the revision
    around the fixture's config.json and weights (no tokenizer: that is tested with its own model below)."""
    built = {}

    def get(source: Source):
        if source.kind == "broken":
            pytest.fail(source.problem)
        if "fixture" not in built:
            from glmport.tiny import build_tiny_model

            built["fixture"] = build_tiny_model("tiny-remote", tmp_path_factory.mktemp("chatglm6b") / "fixture",
                                                family="chatglm", seq_length=64)
        if source.kind == "fixture":
            return built["fixture"]
        if source.name not in built:
            target = tmp_path_factory.mktemp("chatglm6b") / source.name
            target.mkdir()
            for name in ("modeling_chatglm.py", "configuration_chatglm.py", "quantization.py"):
                shutil.copyfile(source.folder / name, target / name)
            for name in ("config.json", "model.safetensors"):
                shutil.copyfile(built["fixture"] / name, target / name)
            built[source.name] = target
        return built[source.name]

    return get


def padded_batch():
    """Three rows of different lengths, left-padded, each [text] [gMASK] <sop> [answer so far]."""
    rows = [[40, 41, GMASK, SOP, 42], [50, 51, 52, 53, GMASK, SOP, 54, 55], [60, GMASK, SOP]]
    width = max(len(row) for row in rows)
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return rows, ids, mask


def labels_of(ids, mask):
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100
    return labels


def compat_only():
    registry = PatchRegistry()
    compat = manager().patch_sets.sets["compat"]
    registry.add(PatchSet("compat", "compat only", [p for p in compat.patches if p.family == "chatglm"]))
    return registry


def _guard(mlu):
    return sixty_four_bit_guard(mlu.sixty_four_bit_policy().narrow.keys(), label="mlu", mode="error")


# ------------------------------------------------------------------------------------------------ plans


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("backend_name, mode", sorted(DEVICE))
def test_plan(source, backend_name, mode, folder):
    emulate = None if backend_name == "cpu" else backend_name
    with on_device(emulate):
        plan = make_plan(folder(source), backend_name, mode)
    assert not plan.problems and plan.family == "chatglm"
    applied = {f"{set_name}/{patch_id}" for set_name, patch_id, status in plan_rows(plan) if status == "apply"}
    compat = COMPAT if source.has_tokenizer else COMPAT - {"compat-tokenizer-init", "compat-tokenizer-pad"}
    assert applied == {f"compat/{patch_id}" for patch_id in compat} | DEVICE[(backend_name, mode)]
    if source.kind == "upstream":
        assert plan.files["modeling"].revision == source.revision and plan.files["modeling"].imitates is None


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("backend_name, mode", [("cpu", "infer"), ("mlu", "train")])
def test_apply_changes_exactly_the_targets_and_undo_restores_them(source, backend_name, mode, folder):
    info = model_info(folder(source))
    emulate = None if backend_name == "cpu" else backend_name
    with on_device(emulate):
        modules = imported_modules(info)
        before, flags = snapshot(modules), capture_state()
        session = patch_session(info, backend(backend_name), mode, registry=manager().patch_sets)
        try:
            sessions = {f"{key}:{SESSION_ATTR}" for key in session.modules}  # the engine's mark on each module
            assert changes(before, modules) == declared_targets(session.plan) | sessions
            assert "modeling:ChatGLMForConditionalGeneration.__bases__" in declared_targets(session.plan)
            if backend_name == "mlu":  # TorchScript fuser flags back to what they were before the import
                assert capture_state() == modules["modeling"].__dict__["_glmport_state_before_import"]
        finally:
            session.undo()
        assert changes(before, modules) == set()
        restore_state(flags)


# --------------------------------------------------------------------------------------------- numerics


@cache
def _logits(path, backend_name: str, emulate: str | None, compat: bool = False):
    rows, ids, mask = padded_batch()
    with on_device(emulate):
        device = backend(backend_name)
        inputs = device.coerce({"input_ids": ids, "attention_mask": mask})
        registry = compat_only() if compat else None
        with patched_model(path, backend_name, "infer", registry=registry) as (model, _), torch.no_grad():
            padded = model(**inputs).logits
            alone = [model(input_ids=torch.tensor([row])).logits[0] for row in rows]
    return padded, alone


@pytest.mark.parametrize("source", SOURCES)
def test_every_backend_set_computes_the_same_and_padding_changes_nothing(source, folder):
    rows, ids, mask = padded_batch()
    reference, alone = _logits(folder(source), "cpu", None, compat=True)
    for row, (tokens, single) in enumerate(zip(rows, alone)):
        torch.testing.assert_close(reference[row, -len(tokens):], single, atol=ATOL, rtol=0)
    for backend_name, emulate in (("cpu", None), ("cuda", "cuda"), ("mlu", "mlu")):
        padded, _ = _logits(folder(source), backend_name, emulate)
        real = mask.bool()
        torch.testing.assert_close(padded[real], reference[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("source", UPSTREAM)
def test_real_files_compute_the_fixture_function(source, folder):
    fixture = Source("chatglm-2023-05", "chatglm", "fixture", "chatglm-2023-05")
    for backend_name, emulate in (("cpu", None), ("mlu", "mlu")):
        real, real_alone = _logits(folder(source), backend_name, emulate)
        ours, ours_alone = _logits(folder(fixture), backend_name, emulate)
        torch.testing.assert_close(real, ours, atol=ATOL, rtol=0)
        for a, b in zip(real_alone, ours_alone):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def _rotary_table(path, dtype, registry=None):
    with patched_model(path, "cpu", "infer", dtype=dtype, registry=registry) as (model, _):
        cos, sin = model.transformer.layers[0].attention.rotary_emb(torch.zeros(1), seq_len=300)
    return cos, sin


@pytest.mark.parametrize("source", SOURCES)
def test_bf16_rotary_table_is_the_fp32_one_in_bf16(source, folder):
    """Golden: patched, a bf16 model's table is the fp32 model's, rounded once; without the patch, bf16
    positions above 256 are rounded (257 reads as 256) and so are the frequencies."""
    fp32_cos, fp32_sin = _rotary_table(folder(source), torch.float32)
    cos, sin = _rotary_table(folder(source), torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and cos.shape == fp32_cos.shape == (300, 1, 8)
    assert torch.equal(cos, fp32_cos.bfloat16()) and torch.equal(sin, fp32_sin.bfloat16())
    without = PatchRegistry()
    without.add(PatchSet("compat", "compat without the rotary fix", [
        p for p in manager().patch_sets.sets["compat"].patches if p.family == "chatglm" and p.id != "compat-rotary-bf16"]))
    rounded, _ = _rotary_table(folder(source), torch.bfloat16, without)
    assert torch.equal(rounded[257], rounded[256]) and not torch.equal(fp32_cos[257], fp32_cos[256])


# ------------------------------------------------------------------------------------------- 64-bit guard


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("overrides", [{}, {"pre_seq_len": 2, "use_cache": False}], ids=["full", "p-tuning"])
def test_training_steps_on_emulated_mlu_are_64bit_clean(source, overrides, folder):
    _, ids, mask = padded_batch()
    with on_device("mlu"):
        mlu = backend("mlu")
        batch = mlu.coerce({"input_ids": ids, "attention_mask": mask, "labels": labels_of(ids, mask),
                            "position_ids": torch.arange(ids.shape[1]).expand_as(ids)})  # the collator's
        assert {value.dtype for value in batch.values()} == {torch.int32}
        with patched_model(folder(source), "mlu", "train", config_overrides=overrides) as (model, _):
            if overrides:
                model.requires_grad_(False)
                model.transformer.prefix_encoder.requires_grad_(True)
            else:
                model.gradient_checkpointing_enable()
                assert model.transformer.gradient_checkpointing is True
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            torch.manual_seed(0)  # P-Tuning's prefix dropout

            def evaluated():  # without dropout (P-Tuning's prefix has some), so that the losses compare
                model.eval()
                with mlu.compute_context(), _guard(mlu), torch.no_grad():
                    return model(**batch, use_cache=False).loss.item()

            losses = [evaluated()]
            model.train()
            for _ in range(3):
                with mlu.compute_context(), _guard(mlu) as report:
                    loss = model(**batch, use_cache=False).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                assert report.clean and report.ops_checked > 100
                losses.append(loss.item())
            losses.append(evaluated())
    assert all(math.isfinite(value) for value in losses) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("source", SOURCES)
def test_generation_on_emulated_mlu_is_64bit_clean_and_equals_cpu(source, folder):
    _, ids, mask = padded_batch()
    with patched_model(folder(source), "cpu", "infer") as (model, _):
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    reports = []
    with on_device("mlu"):
        mlu = backend("mlu")
        inputs = mlu.coerce({"input_ids": ids, "attention_mask": mask})
        with patched_model(folder(source), "mlu", "infer") as (model, _), \
                guarded_forward(model, mlu, "error", on_report=reports.append):
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert len(reports) == 4 and all(report.clean for report in reports)
    assert generated.tolist() == expected.tolist()


@pytest.mark.parametrize("source", SOURCES)
def test_the_compat_set_alone_leaks_int64_layer_ids_on_mlu(source, folder):
    _, ids, mask = padded_batch()
    with on_device("mlu"):
        mlu = backend("mlu")
        inputs = mlu.coerce({"input_ids": ids, "attention_mask": mask})
        with patched_model(folder(source), "cpu", "infer", registry=compat_only()) as (model, _), \
                pytest.raises(SixtyFourBitError, match=r"got a int64 tensor .* in attention_fn"), \
                mlu.compute_context(), _guard(mlu), torch.no_grad():
            model(**inputs)


# ----------------------------------------------------------------------------------- the real tokenizer


@cache
def _sentencepiece_model() -> bytes:
    """A small SentencePiece model with ChatGLM-6B's vocabulary layout (no image tokens): <unk> <s> </s> <pad>
    <n>, bytes, some characters, filler up to 130000, then [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC>
    <dBLOCK>, the tab and blank-run pieces."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2", reason="needs protobuf")
    kinds = pb.ModelProto.SentencePiece.Type
    model = pb.ModelProto()

    def add(piece, kind, score=0.0):
        entry = model.pieces.add()
        entry.piece, entry.type, entry.score = piece, kind, score

    for piece, kind in (("<unk>", kinds.UNKNOWN), ("<s>", kinds.CONTROL), ("</s>", kinds.CONTROL),
                        ("<pad>", kinds.CONTROL), ("<n>", kinds.USER_DEFINED)):
        add(piece, kind)
    for byte in range(256):
        add(f"<0x{byte:02X}>", kinds.BYTE)
    add("▁", kinds.NORMAL, -1.0)
    for char in "abcdefghijklmnopqrstuvwxyz问答：":
        add(char, kinds.NORMAL, -2.0)
    filler = 0
    while len(model.pieces) < 130000:
        add(f"<filler_{filler}>", kinds.NORMAL, -100.0)
        filler += 1
    for piece in ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>", "<|tab|>",
                  *(f"<|blank_{n}|>" for n in range(2, 81))):
        add(piece, kinds.USER_DEFINED)
    model.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.vocab_size = len(model.pieces)
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = 3
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.escape_whitespaces = True
    model.normalizer_spec.remove_extra_whitespaces = False
    return model.SerializeToString()


@pytest.mark.parametrize("source", UPSTREAM)
def test_real_tokenizer_loads_and_lays_out_with_the_compat_set(source, tmp_path):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from glmport.data.records import Message
    from glmport.data.templates import get_template

    target = tmp_path / source.name
    target.mkdir()
    shutil.copyfile(source.folder / "tokenization_chatglm.py", target / "tokenization_chatglm.py")
    (target / "ice_text.model").write_bytes(_sentencepiece_model())
    (target / "tokenizer_config.json").write_text(json.dumps({  # as in THUDM/chatglm-6b
        "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "gmask_token": "[gMASK]",
        "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>", "remove_space": False,
        "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer", "num_image_tokens": 0,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    tokenizer_class = get_class_from_dynamic_module("tokenization_chatglm.ChatGLMTokenizer", str(target))
    with pytest.raises(TypeError, match="'property' object cannot be interpreted as an integer"):
        tokenizer_class.from_pretrained(str(target))  # transformers >= 4.34 (zai-org/ChatGLM-6B#1505)
    patches = [p for p in manager().patch_sets.sets["compat"].patches if p.family == "chatglm" and p.file == "tokenization"]
    module = sys.modules[tokenizer_class.__module__]
    recorder = apply_patches(patches, {"tokenization": module}, backend("cpu"), "infer", state=capture_state(),
                             family="chatglm", revisions={})
    try:
        tokenizer = tokenizer_class.from_pretrained(str(target))
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (SOP, 130005, 3)
        text = tokenizer.encode("ab", add_special_tokens=False)
        assert tokenizer.encode("ab") == text + [GMASK, SOP] and tokenizer.decode(text) == "ab"
        template = get_template("auto", tokenizer)
        assert template.name == "chatglm" and template.prompt_ids([Message("user", "ab")]) == tokenizer.encode("ab")
        batch = tokenizer(["a", "abc"], padding=True)  # upstream's numpy masks and positions, left-padded
        assert len(batch["input_ids"][0]) == len(batch["input_ids"][1]) and batch["input_ids"][0][0] == 3
        assert batch["position_ids"][0].shape == (2, len(batch["input_ids"][0]))
    finally:
        recorder.undo()
