"""Apply then undo, per source and backend/mode: exactly the declared targets change (replaces + adds),
each replacement is verified by identity, and undo puts back the very same objects everywhere (module
names, class attributes, class bases, TorchScript flags), also after a model was built and trained."""

from __future__ import annotations

import functools

import pytest
import torch
from patchkit import (
    NATIVE_MODULE,
    SESSION_ATTR,
    Variant,
    backend,
    capture_state,
    changes,
    declared_targets,
    imported_modules,
    manager,
    model_info,
    on_device,
    patched_model,
    snapshot,
    source_params,
    token_batch,
    variant_params,
)

from glmport.errors import PatchError
from glmport.patching.session import patch_session

# compat-generation makes the model class a GenerationMixin by extending its __bases__ (none of the
# upstream revisions inherit it); that change is not an attribute, so it is not among the declared targets.
BASES_CHANGE = "modeling:ChatGLMForConditionalGeneration.__bases__"
# Caches that building a model adds to classes by itself (copyreg while deep-copying a config, transformers'
# per-class answer about expert implementations); they have nothing to do with patching.
BUILD_CACHES = {"__slotnames__", "_can_set_experts_implementation_cached_value"}


def without_build_caches(changed: set[str]) -> set[str]:
    return {c for c in changed if c.rsplit(".", 1)[-1] not in BUILD_CACHES}


def expected_changes(session, variant: Variant) -> set[str]:
    applied = {e.patch.id for e in session.plan.to_apply}
    expected = declared_targets(session.plan) | {f"{key}:{SESSION_ATTR}" for key in session.modules}
    if "attention-varlen" in applied and not variant.varlen:
        # without a variable-length kernel the patch keeps get_masks (dense masks for SDPA)
        expected.discard("modeling:ChatGLMModel.get_masks")
    if "compat-generation" in applied:
        expected.add(BASES_CHANGE)
    return expected


def apply_and_check(info, variant: Variant, modules: dict):
    plugins = manager()
    session = patch_session(info, plugins.backends.get(variant.backend), variant.mode, registry=plugins.patch_sets)
    assert set(session.modules) == set(modules) and all(session.modules[k] is modules[k] for k in modules)
    assert all(vars(module)[SESSION_ATTR] is session for module in modules.values())
    # verified by identity: what the recorder put is what the owners hold
    assert session.recorder.verify() == []
    for replacement in session.recorder.replacements:
        assert vars(replacement.owner)[replacement.name] is replacement.new, replacement.label
    assert {r.patch_id for r in session.recorder.replacements} == {e.patch.id for e in session.plan.to_apply}
    return session


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("source", source_params())
def test_apply_changes_exactly_the_declared_targets_and_undo_restores_them(source, variant, model_dir):
    info = model_info(model_dir(source))
    with on_device(variant.emulate):
        modules = imported_modules(info)
        assert set(modules) == ({"modeling", "configuration", "tokenization"} if source.has_tokenizer
                                else {"modeling", "configuration"})
        before, flags = snapshot(modules), capture_state()
        session = apply_and_check(info, variant, modules)
        try:
            assert changes(before, modules) == expected_changes(session, variant)
            modeling = modules["modeling"]
            if "compat-generation" in {e.patch.id for e in session.plan.to_apply}:
                from transformers import GenerationMixin

                assert issubclass(modeling.ChatGLMForConditionalGeneration, GenerationMixin)
            # the process state a session leaves is the state before the remote import (this process imported
            # the module earlier, so that is the current state; see test_patch_engine for a fresh process)
            assert capture_state() == flags
            with pytest.raises(PatchError, match="already patched"):
                patch_session(info, backend(variant.backend), variant.mode, registry=manager().patch_sets)
            assert changes(before, modules) == expected_changes(session, variant)  # the refusal changed nothing
        finally:
            session.undo()
        assert changes(before, modules) == set()
        assert capture_state() == flags
        assert "get_position_ids" not in vars(modules["modeling"].ChatGLMModel)  # no copy left on the subclass

        again = apply_and_check(info, variant, modules)  # after undo it can be applied again
        try:
            assert changes(before, modules) == expected_changes(again, variant)
        finally:
            again.undo()
        assert changes(before, modules) == set()


@pytest.mark.parametrize("source", source_params())
def test_undo_after_building_and_training_restores_everything(source, model_dir):
    """The heaviest set (mlu-train, emulated): build the model, train a step, generate; undo must still
    restore every attribute, and the model's classes must be the originals again."""
    folder = model_dir(source)
    variant = Variant("mlu", "train", "mlu")
    with on_device("mlu"):
        modules = imported_modules(model_info(folder))
        before, flags = snapshot(modules), capture_state()
        with patched_model(folder, "mlu", "train") as (model, session):
            ids = token_batch(source.family)
            model.train()
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
            model.eval()
            with torch.no_grad():
                model.generate(input_ids=ids[:1], max_new_tokens=2, do_sample=False)
            assert without_build_caches(changes(before, modules)) == expected_changes(session, variant)
        assert without_build_caches(changes(before, modules)) == set()
        assert capture_state() == flags
        assert type(model).forward is vars(modules["modeling"].ChatGLMForConditionalGeneration)["forward"]


@pytest.mark.parametrize("backend_name", ["cpu", "mlu"])
def test_native_apply_and_undo(backend_name, native_dir):
    import importlib

    module = importlib.import_module(NATIVE_MODULE)
    modules = {"transformers": module}
    before = snapshot(modules)
    info = model_info(native_dir("chatglm3"))
    session = patch_session(info, backend(backend_name), "infer", registry=manager().patch_sets)
    try:
        expected = {f"transformers:{SESSION_ATTR}"}
        if backend_name == "mlu":
            expected |= {"transformers:create_causal_mask", "transformers:GlmModel.forward"}
        assert changes(before, modules) == expected
        assert session.recorder.verify() == []
        assert "none needed" in session.summary() if backend_name == "cpu" else "2 applied" in session.summary()
    finally:
        session.undo()
    assert changes(before, modules) == set()


def _single_patches():
    from glmport.patches import builtin_patch_sets

    params = []
    for source in source_params(upstream=False):
        family = source.values[0].family
        for patch_set in builtin_patch_sets():
            for patch in patch_set.patches:
                if patch.family == family:
                    params.append(pytest.param(source.values[0], patch_set.name, patch.id,
                                               id=f"{source.id}-{patch_set.name}-{patch.id}"))
    return params


@functools.cache
def _cached_fixture_hashes(original):
    return functools.cache(original)


@pytest.fixture
def fixture_hashes_once(monkeypatch):
    """The fixture-file hash table is a pure function of glmport's fixture sources, rendered anew on every
    identification (about 0.2 s per plan); remember it for these many small sessions."""
    from glmport.patching import manifest

    monkeypatch.setattr(manifest, "_fixture_hashes", _cached_fixture_hashes(manifest._fixture_hashes))


@pytest.mark.parametrize("source, set_name, patch_id", _single_patches())
def test_each_patch_alone_changes_its_targets_and_undo_restores_them(source, set_name, patch_id, model_dir,
                                                                     fixture_hashes_once):
    """Per patch: a set holding just this patch, applied for a backend and mode it is for."""
    from glmport.patches import builtin_patch_sets

    from glmport.patching import PatchSet
    from glmport.patching.registry import PatchRegistry

    patch = next(p for s in builtin_patch_sets() if s.name == set_name for p in s.patches
                 if p.id == patch_id and p.family == source.family)
    registry = PatchRegistry()
    registry.add(PatchSet(set_name, "one patch", [patch]))
    # the first backend of the matrix whose capabilities the patch requires (emulated where not cpu)
    variant = next(v for v in (Variant("cpu", patch.modes[0]), Variant("mlu", patch.modes[0], "mlu"),
                               Variant("cuda", patch.modes[0], "cuda"))
                   if patch.applies_to(manager().backends.with_emulation([v.emulate] if v.emulate else [])
                                       .get(v.backend), v.mode))
    backend_name = variant.backend
    info = model_info(model_dir(source))
    with on_device(variant.emulate):
        modules = imported_modules(info)
        before, flags = snapshot(modules), capture_state()
        session = patch_session(info, backend(backend_name), variant.mode, registry=registry)
        try:
            if patch.revisions and source.imitated not in patch.revisions:
                assert session.plan.to_apply == [] and session.plan.entries[0].status == "skip"
                assert changes(before, modules) == {f"{key}:{SESSION_ATTR}" for key in modules}
            else:
                assert [e.patch for e in session.plan.to_apply] == [patch]
                assert changes(before, modules) == expected_changes(session, variant)
                assert session.recorder.verify() == [] and session.recorder.replacements
        finally:
            session.undo()
        assert changes(before, modules) == set()
        assert capture_state() == flags
