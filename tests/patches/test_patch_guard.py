"""The patched tiny remote-code model on an emulated MLU (``emulating("mlu")``) with the 64-bit guard on.

* train: forward, backward and optimizer steps with gradient checkpointing, inside the backend's compute
  context and ``sixty_four_bit_guard`` on a batch narrowed by ``backend.coerce``;
* infer: ``generate`` on a left-padded batch inside ``guarded_forward(model, backend, "error")``, token for
  token equal to the native model's greedy generation;
* negative: with the compat set only, the guard does catch the 64-bit position and prefix ids, so the mlu
  sets are what makes those paths clean.

These run in this process: they use patch sessions, direct model calls and generate, never Trainer or
accelerate's device selection, and the emulation leaves no trace afterwards.
"""

from __future__ import annotations

import math

import pytest
import torch
from patchkit import (
    backend,
    labels_for,
    native_reference,
    on_device,
    padding_masks,
    patched_model,
    source_params,
    token_batch,
)

from glmport.errors import SixtyFourBitError
from glmport.guard import sixty_four_bit_guard
from glmport.train.guarded import guarded_forward


def _guard(mlu):
    return sixty_four_bit_guard(mlu.sixty_four_bit_policy().narrow.keys(), label="mlu", mode="error")


def _left_padded(family: str, seed: int):
    ids = token_batch(family, rows=3, length=8, seed=seed)
    return ids, padding_masks(ids)[2][1]


@pytest.mark.parametrize("source", source_params())
def test_training_steps_are_64bit_clean(source, model_dir):
    ids, mask = _left_padded(source.family, seed=2)
    with on_device("mlu"):
        mlu = backend("mlu")
        assert mlu.emulated and mlu.sixty_four_bit_policy().lacks_64bit
        batch = mlu.coerce({"input_ids": ids, "attention_mask": mask, "labels": labels_for(ids, mask)})
        assert {v.dtype for v in batch.values()} == {torch.int32}
        with patched_model(model_dir(source), "mlu", "train") as (model, session):
            assert {"int32-positions", "attention-varlen", "label-row-loss"} <= {e.patch.id for e in session.plan.to_apply}
            model.gradient_checkpointing_enable()
            assert model.transformer.encoder.gradient_checkpointing is True
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            losses = []
            for _ in range(3):
                with mlu.compute_context(), _guard(mlu) as report:
                    loss = model(**batch, use_cache=False).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                assert report.clean and report.ops_checked > 100
                losses.append(loss.item())
            with mlu.compute_context(), _guard(mlu), torch.no_grad():
                losses.append(model(**batch, use_cache=False).loss.item())
    assert all(math.isfinite(value) for value in losses), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("source", source_params())
def test_generation_is_64bit_clean_and_equals_native_greedy(source, model_dir):
    ids, mask = _left_padded(source.family, seed=3)
    expected = native_reference(source.family).generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                                        do_sample=False)
    reports = []
    with on_device("mlu"):
        mlu = backend("mlu")
        with patched_model(model_dir(source), "mlu", "infer") as (model, _):
            model.eval()
            with guarded_forward(model, mlu, "error", on_report=reports.append):
                generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert len(reports) == 4 and all(r.clean for r in reports)  # one guarded forward per new token
    assert generated.tolist() == expected.tolist()


def _prepared_generation_inputs(model, mlu, ids, mask):
    """What generate hands the forward for the prompt, built by the model's own hook, inputs narrowed."""
    batch = mlu.coerce({"input_ids": ids, "attention_mask": mask})
    return model.prepare_inputs_for_generation(batch["input_ids"], attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("source", source_params())
def test_guard_catches_int64_positions_with_the_compat_set_only(source, model_dir):
    ids, mask = _left_padded(source.family, seed=4)
    with on_device("mlu"):
        mlu = backend("mlu")
        with patched_model(model_dir(source), "cpu", "infer") as (model, session):
            assert "int32-positions" not in {e.patch.id for e in session.plan.to_apply}
            prepared = _prepared_generation_inputs(model, mlu, ids, mask)
            assert prepared["position_ids"].dtype == torch.int64
            leak = r"aten\.index\.Tensor got a int64 tensor .*modeling_chatglm\.py"
            with pytest.raises(SixtyFourBitError, match=leak), mlu.compute_context(), _guard(mlu), torch.no_grad():
                model(**prepared)


@pytest.mark.parametrize("source", source_params())
def test_mlu_set_makes_the_same_inputs_clean(source, model_dir):
    ids, mask = _left_padded(source.family, seed=4)
    with on_device("mlu"):
        mlu = backend("mlu")
        with patched_model(model_dir(source), "mlu", "infer") as (model, _):
            prepared = _prepared_generation_inputs(model, mlu, ids, mask)
            with mlu.compute_context(), _guard(mlu) as report, torch.no_grad():
                model(**prepared)
    assert report.clean


@pytest.mark.parametrize("source", source_params(families=("chatglm3", "chatglm2")))
@pytest.mark.parametrize("plan_backend", ["cpu", "mlu"])
def test_ptuning_prefix_ids_are_caught_without_and_clean_with_the_mlu_set(source, plan_backend, model_dir):
    """P-Tuning v2 (pre_seq_len): the prefix ids are int64 upstream; mlu-train builds them in int32."""
    ids, mask = _left_padded(source.family, seed=5)
    with on_device("mlu"):
        mlu = backend("mlu")
        batch = mlu.coerce({"input_ids": ids, "attention_mask": mask, "labels": labels_for(ids, mask)})
        with patched_model(model_dir(source), plan_backend, "train", config_overrides={"pre_seq_len": 4}) \
                as (model, _):
            # what glmport's ptuning method does (transformers 5 loading re-enables the gradients the upstream
            # __init__ switched off, so the method freezes the model itself)
            model.requires_grad_(False)
            model.transformer.prefix_encoder.requires_grad_(True)
            model.train()

            def step():
                with mlu.compute_context(), _guard(mlu):
                    loss = model(**batch, use_cache=False).loss
                    loss.backward()
                return loss

            if plan_backend == "cpu":
                with pytest.raises(SixtyFourBitError, match=r"aten\.embedding\.default got a int64 tensor of shape \[3, 4\]"):
                    step()
            else:
                assert math.isfinite(step().item())
                assert model.transformer.prefix_encoder.embedding.weight.grad is not None


@pytest.mark.parametrize("plan_backend", ["cpu", "mlu"])
def test_native_glm_on_emulated_mlu(plan_backend, native_dir):
    """Native folders: transformers' own mask and position building is 64-bit; native-mlu makes it clean."""
    ids, mask = _left_padded("chatglm3", seed=6)
    expected = native_reference("chatglm3").generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                                                     do_sample=False)
    with on_device("mlu"):
        mlu = backend("mlu")
        batch = mlu.coerce({"input_ids": ids, "attention_mask": mask})
        with patched_model(native_dir("chatglm3"), plan_backend, "infer") as (model, _):
            model.eval()
            if plan_backend == "cpu":
                with pytest.raises(SixtyFourBitError, match="int64"), mlu.compute_context(), _guard(mlu), \
                        torch.no_grad():
                    model(**batch)
                return
            with mlu.compute_context(), _guard(mlu) as report, torch.no_grad():
                model(**batch)
            assert report.clean
            with guarded_forward(model, mlu, "error"):
                generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert generated.tolist() == expected.tolist()
