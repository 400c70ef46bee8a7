"""Patched versus unpatched numbers.

The unpatched remote code cannot run on transformers 5 at all, so the reference is the tiny NATIVE
``GlmForCausalLM`` with the same weights (transformers' implementation of the same math), plus the
compat-only (cpu) patched remote model. Tolerance: 1e-5 absolute in fp32 (``patchkit.ATOL``); with padding
only real-token positions are compared. The variable-length attention path (cuda sets and mlu-train under
emulation, through the emulator's CPU reference kernel) is checked to have really run.

Golden values where a patch changes numbers on purpose: int32 positions (same values, 32-bit), and the
label-row loss (fp32 loss where upstream returns it in the model's dtype).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from patchkit import (
    ATOL,
    Variant,
    labels_for,
    native_reference,
    on_device,
    padding_masks,
    patched_model,
    source_params,
    token_batch,
    variant_params,
)


@pytest.fixture
def varlen_calls(monkeypatch):
    """Count calls of the variable-length attention kernel the backends hand out (Backend.varlen_attention)."""
    calls = []

    def counting(kernel):
        def run(q, k, v, cu_seqlens_q, *args, **kwargs):
            calls.append(cu_seqlens_q.dtype)
            return kernel(q, k, v, cu_seqlens_q, *args, **kwargs)

        return run

    from glmport.backends._device import DeviceModuleBackend  # the mlu and cuda backends' shared base

    original = DeviceModuleBackend.varlen_attention
    monkeypatch.setattr(DeviceModuleBackend, "varlen_attention",
                        lambda self: None if original(self) is None else counting(original(self)))
    return calls


@pytest.fixture(scope="module")
def compat_outputs(model_dir):
    """Logits of the compat-only (cpu) patched remote model per source and padding, computed once."""
    cache = {}

    def get(source):
        if source.name not in cache:
            ids = token_batch(source.family)
            with patched_model(model_dir(source), "cpu", "infer") as (model, _), torch.no_grad():
                cache[source.name] = {name: model(input_ids=ids, attention_mask=mask).logits
                                      for name, mask in padding_masks(ids)}
        return cache[source.name]

    return get


def _mapped_grads(remote, native) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, remote grad, native grad) for parameters stored under different names."""
    r = dict(remote.named_parameters())
    n = dict(native.named_parameters())
    qkv = torch.cat([n[f"model.layers.0.self_attn.{p}_proj.weight"].grad for p in "qkv"], dim=0)
    return [
        ("output layer", r["transformer.output_layer.weight"].grad, n["lm_head.weight"].grad),
        ("embedding", r["transformer.embedding.word_embeddings.weight"].grad, n["model.embed_tokens.weight"].grad),
        ("layer 0 qkv", r["transformer.encoder.layers.0.self_attention.query_key_value.weight"].grad, qkv),
        ("layer 1 mlp", r["transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"].grad,
         n["model.layers.1.mlp.gate_up_proj.weight"].grad),
    ]


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("source", source_params())
def test_logits_and_loss_match_native(source, variant, model_dir, compat_outputs, varlen_calls):
    native = native_reference(source.family)
    ids = token_batch(source.family)
    compat = compat_outputs(source)
    with on_device(variant.emulate), patched_model(model_dir(source), variant.backend, variant.mode) \
            as (model, session):
        applied = {e.patch.id for e in session.plan.to_apply}
        assert ("label-row-loss" in applied) == (variant.mode == "train" and variant.backend != "cpu")
        model.eval()
        for name, mask in padding_masks(ids):
            keep = mask.bool()
            labels = labels_for(ids, mask)
            with torch.no_grad():
                ours = model(input_ids=ids, attention_mask=mask, labels=labels)
                theirs = native(input_ids=ids, attention_mask=mask, labels=labels)
            assert ours.logits.dtype == torch.float32
            check = lambda m, name=name: f"{name}: {m}"  # noqa: E731
            torch.testing.assert_close(ours.logits[keep], theirs.logits[keep], atol=ATOL, rtol=0, msg=check)
            torch.testing.assert_close(ours.logits[keep], compat[name][keep], atol=ATOL, rtol=0, msg=check)
            torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0, msg=check)
    if variant.varlen:  # the padded batches went through the kernel, with int32 cu_seqlens
        assert varlen_calls and set(varlen_calls) == {torch.int32}
    else:
        assert not varlen_calls


TRAIN_VARIANTS = [v for v in variant_params() if v.values[0].mode == "train"]


@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
@pytest.mark.parametrize("source", source_params())
def test_training_gradients_match_native(source, variant, model_dir, varlen_calls):
    native = copy.deepcopy(native_reference(source.family)).train()
    ids = token_batch(source.family, seed=1)
    mask = padding_masks(ids)[2][1]  # left padded
    labels = labels_for(ids, mask)
    native(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    with on_device(variant.emulate), patched_model(model_dir(source), variant.backend, variant.mode) as (model, _):
        model.train()
        model.gradient_checkpointing_enable()
        assert model.transformer.encoder.gradient_checkpointing is True
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        for name, ours, theirs in _mapped_grads(model, native):
            assert ours is not None, name
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert bool(varlen_calls) == variant.varlen


# ------------------------------------------------------------------------------------------ golden


@pytest.mark.parametrize("source", source_params())
def test_int32_positions_golden(source, model_dir):
    ids = token_batch(source.family, rows=2, length=7)
    with patched_model(model_dir(source), "mlu", "infer") as (model, session):
        assert "int32-positions" in {e.patch.id for e in session.plan.to_apply}
        positions = model.transformer.get_position_ids(ids, ids.device)
    assert positions.dtype == torch.int32
    assert positions.tolist() == torch.arange(7).expand(2, 7).tolist()


@pytest.mark.parametrize("source", source_params())
def test_int32_positions_reach_generation(source, model_dir):
    ids = token_batch(source.family, rows=2, length=7)
    with patched_model(model_dir(source), "mlu", "infer") as (model, _):
        positions = model.get_position_ids(ids, ids.device)
        prepared = model.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids))
    assert positions.tolist() == torch.arange(7).expand(2, 7).tolist()
    assert positions.dtype == torch.int32 and prepared["position_ids"].dtype == torch.int32


@pytest.mark.parametrize("source", source_params(upstream=False, families=("glm4",)) +
                         source_params(fixtures=False))
def test_label_row_loss_golden_in_bf16(source, model_dir):
    """Upstream upcasts every logit to fp32 and returns the loss in the model's dtype; the label-row loss
    returns it in fp32, equal to cross-entropy over the label rows computed in fp32."""
    ids = token_batch(source.family)
    mask = padding_masks(ids)[1][1]
    labels = labels_for(ids, mask)
    folder = model_dir(source)
    with patched_model(folder, "cpu", "train", dtype=torch.bfloat16) as (model, _), torch.no_grad():
        upstream = model(input_ids=ids, attention_mask=mask, labels=labels)
    with patched_model(folder, "cuda", "train", dtype=torch.bfloat16) as (model, _), torch.no_grad():
        patched = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert patched.logits.dtype == upstream.logits.dtype == torch.bfloat16
    assert upstream.loss.dtype == torch.bfloat16 and patched.loss.dtype == torch.float32
    vocab = patched.logits.shape[-1]
    golden = F.cross_entropy(patched.logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1),
                             ignore_index=-100)
    torch.testing.assert_close(patched.loss, golden, atol=1e-6, rtol=0)
    torch.testing.assert_close(patched.loss, upstream.loss.float(), atol=0, rtol=2 ** -7)  # bf16 rounding only


# (label-row-loss once set output["loss"] after the fact, which made the loss the LAST field)
LOSS_FIRST = [pytest.param(Variant("cpu", "train"), id="cpu-train (upstream forward)"),
              pytest.param(Variant("cuda", "train"), id="cuda-train (label-row-loss)")]


@pytest.mark.parametrize("variant", LOSS_FIRST)
@pytest.mark.parametrize("source", source_params(upstream=False, families=("chatglm3",))[-1:])
def test_loss_is_the_first_output_field(source, variant, model_dir):
    ids = token_batch(source.family)
    with patched_model(model_dir(source), variant.backend, variant.mode) as (model, _), torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert list(out.keys())[0] == "loss"
    assert out[0] is out.loss and out.to_tuple()[0] is out.loss


ROTARY = [pytest.param(Variant("cpu", "train"), id="cpu-train (no rotary cache)"),
          pytest.param(Variant("mlu", "train", "mlu"), id="mlu-train-emulated (rotary cache)")]


@pytest.mark.parametrize("variant", ROTARY)
@pytest.mark.parametrize("source", source_params(upstream=False))
def test_training_after_an_inference_mode_forward(source, variant, model_dir):
    ids = token_batch(source.family)
    with on_device(variant.emulate), patched_model(model_dir(source), variant.backend, variant.mode) as (model, _):
        model.eval()
        with torch.inference_mode():
            model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        assert model.transformer.output_layer.weight.grad is not None


# ------------------------------------------------------------------------------------------- native


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager: no causal flag, the mask must be built
def test_native_mlu_patches_keep_the_numbers(attention, native_dir):
    reference = copy.deepcopy(native_reference("chatglm3"))
    reference.config._attn_implementation = attention
    ids = token_batch("chatglm3")
    expected = {}
    with torch.no_grad():  # before patching: the patches change transformers' own GLM classes
        for name, mask in padding_masks(ids):
            out = reference(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
            expected[name] = (out.logits, out.loss)
    with patched_model(native_dir("chatglm3"), "mlu", "infer",
                       config_overrides={"_attn_implementation": attention}) as (model, session):
        assert [e.patch.id for e in session.plan.to_apply] == ["native-mask32", "native-positions32"]
        assert model.config._attn_implementation == attention
        with torch.no_grad():
            for name, mask in padding_masks(ids):
                out = model(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
                keep = mask.bool()
                check = lambda m, name=name: f"{name}: {m}"  # noqa: E731
                torch.testing.assert_close(out.logits[keep], expected[name][0][keep], atol=ATOL, rtol=0, msg=check)
                torch.testing.assert_close(out.loss, expected[name][1], atol=ATOL, rtol=0, msg=check)
