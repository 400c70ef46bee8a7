"""The patching engine: recorder, registry, third-party patch sets through the plugin hook, session rules
(preflight gathers every problem, no double application, rollback, identity verification, one summary)
and the TorchScript process state."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
import types

import pytest
from patchkit import (
    capture_state,
    changes,
    copy_folder_linking_weights,
    fixture_sources,
    imported_modules,
    make_plan,
    model_info,
    patched_model,
    plan_rows,
    restore_state,
    snapshot,
    token_batch,
)

from glmport.backend import Backend, SixtyFourBitPolicy
from glmport.errors import PatchError, PluginError
from glmport.patching import Patch, PatchContext, PatchRecorder, PatchSet
from glmport.patching.model import resolve_owner
from glmport.patching.registry import PatchRegistry
from glmport.plugins import PluginManager
from glmport.testing import ok, run_cli

SOURCES = {s.name: s for s in fixture_sources()}
CHATGLM3 = SOURCES["chatglm3-2024-06"]


# --------------------------------------------------------------------------------------------- recorder


def _classes():
    class Base:
        def inherited(self):
            return "base"

        flag = "base-flag"

    class Child(Base):
        def own(self):
            return "child"

    return Base, Child


def test_recorder_restores_own_attributes_by_identity():
    _, Child = _classes()
    original = vars(Child)["own"]
    recorder = PatchRecorder()
    recorder.current_patch = "p1"
    recorder.setattr(Child, "own", lambda self: "patched")
    assert Child().own() == "patched"
    assert recorder.replacements[0].label.endswith("Child.own") and recorder.replacements[0].patch_id == "p1"
    recorder.undo()
    assert vars(Child)["own"] is original
    assert recorder.replacements == []


def test_recorder_does_not_leave_a_copy_of_an_inherited_attribute_on_the_subclass():
    Base, Child = _classes()
    recorder = PatchRecorder()
    recorder.setattr(Child, "inherited", lambda self: "patched")
    recorder.setattr(Child, "flag", "patched-flag")
    assert Child().inherited() == "patched" and Child.flag == "patched-flag"
    assert Base().inherited() == "base" and Base.flag == "base-flag"  # the base class is untouched
    recorder.undo()
    assert "inherited" not in vars(Child) and "flag" not in vars(Child)
    assert Child.inherited is Base.inherited and Child.flag == "base-flag"


def test_recorder_adds_and_removes_new_attributes():
    _, Child = _classes()
    recorder = PatchRecorder()
    with pytest.raises(AttributeError, match="no attribute 'brand_new'"):
        recorder.setattr(Child, "brand_new", 1)  # must_exist defaults to True
    assert recorder.replacements == [] and not hasattr(Child, "brand_new")
    recorder.setattr(Child, "brand_new", 1, must_exist=False)
    module = types.ModuleType("toy_module")
    recorder.setattr(module, "created", 2, must_exist=False)
    assert Child.brand_new == 1 and module.created == 2
    recorder.undo()
    assert not hasattr(Child, "brand_new") and not hasattr(module, "created")


def test_recorder_runs_undo_actions_in_reverse_and_restores_repeated_replacements():
    _, Child = _classes()
    original = vars(Child)["own"]
    order = []
    recorder = PatchRecorder()
    recorder.setattr(Child, "own", "first")
    recorder.on_undo(lambda: order.append("registered first"), "one")
    recorder.setattr(Child, "own", "second")  # the same attribute twice: undo must end at the original
    recorder.on_undo(lambda: order.append("registered second"), "two")
    recorder.undo()
    assert order == ["registered second", "registered first"]
    assert vars(Child)["own"] is original
    recorder.undo()  # a second undo does nothing
    assert order == ["registered second", "registered first"] and vars(Child)["own"] is original


def test_recorder_verify_detects_overwrites():
    Base, Child = _classes()
    recorder = PatchRecorder()
    recorder.current_patch = "keep-me"
    replacement = lambda self: "patched"  # noqa: E731
    recorder.setattr(Child, "inherited", replacement)
    module = types.ModuleType("toy_module")
    module.value = 1
    recorder.setattr(module, "value", 2)
    assert recorder.verify() == []
    Child.inherited = lambda self: "someone else"
    module.value = 3
    broken = recorder.verify()
    assert len(broken) == 2 and "Child.inherited (patch keep-me)" in broken[0] and "toy_module.value" in broken[1]
    recorder.undo()
    assert "inherited" not in vars(Child) and module.value == 1


def test_context_resolves_dotted_targets():
    _, Child = _classes()
    module = types.ModuleType("toy")
    module.Child = Child
    assert resolve_owner(module, "Child.own") == (Child, "own")
    assert resolve_owner(module, "Child.inherited") == (Child, "inherited")  # inherited counts as present
    with pytest.raises(AttributeError, match="Child.missing not found"):
        resolve_owner(module, "Child.missing")
    recorder = PatchRecorder()
    declares_own = _patch("own", replaces=("Child.own",))
    ctx = PatchContext(module, {"modeling": module}, recorder, None, "infer", None, {}, patch=declares_own)
    original = ctx.original("Child.own")
    ctx.replace("Child.own", "x")
    assert Child.own == "x" and original(None) == "child"
    # only what the patch declares may change (pytest's MonkeyPatch(raising=True) spirit)
    with pytest.raises(AttributeError, match=r"Child.inherited is not among the targets this patch declares \(Child.own\)"):
        ctx.replace("Child.inherited", "y")
    with pytest.raises(AttributeError, match="Child.extra is not among the targets"):
        ctx.add("Child.extra", 1)
    assert "inherited" not in vars(Child) and not hasattr(Child, "extra")
    recorder.undo()
    assert Child.own is original


# --------------------------------------------------------------------------------------------- registry


def _noop(ctx):
    pass


def _patch(pid="p", family="chatglm3", **kw):
    return Patch(pid, family=family, file="modeling", replaces=kw.pop("replaces", ("RMSNorm.forward",)),
                 why="test", apply=kw.pop("apply", _noop), **kw)


def test_registry_rejects_non_patch_sets_and_duplicates():
    registry = PatchRegistry()
    with pytest.raises(PluginError, match="which is not a glmport.patching.model.PatchSet"):
        registry.add({"name": "fake"})
    with pytest.raises(PluginError, match="has two patches chatglm3/dup"):
        registry.add(PatchSet("twice", "", [_patch("dup"), _patch("dup", replaces=("CoreAttention.forward",))]))
    assert "twice" not in registry.sets
    registry.add(PatchSet("per-family", "", [_patch("same"), _patch("same", family="glm4")]))  # ok: two families
    with registry.attributed_to("other"), \
            pytest.raises(PluginError, match="'per-family' is registered twice: by '<direct>' and by 'other'"):
        registry.add(PatchSet("per-family", "", []))


def test_registry_selects_by_family_backend_and_mode_in_registration_order():
    registry = PatchRegistry()
    registry.add(PatchSet("a", "", [_patch("any"), _patch("mlu-train", backends=("mlu",), modes=("train",)),
                                    _patch("glm4-only", family="glm4")]))
    registry.add(PatchSet("b", "", [_patch("cuda", backends=("cuda", "mlu"))]))
    backends = PluginManager(autoload=False).backends
    ids = lambda family, name, mode: [(s.name, p.id) for s, p in registry.select(family, backends.get(name), mode)]  # noqa: E731
    assert ids("chatglm3", "mlu", "train") == [("a", "any"), ("a", "mlu-train"), ("b", "cuda")]
    assert ids("chatglm3", "mlu", "infer") == [("a", "any"), ("b", "cuda")]
    assert ids("chatglm3", "cpu", "infer") == [("a", "any")]
    assert ids("glm4", "cpu", "train") == [("a", "glm4-only")]


class _Declared(Backend):
    """A backend that is nothing but its declared capabilities (name chosen to match no builtin)."""

    def __init__(self, name, *, lacks_64bit=False, device_type="cpu", torchscript=False):
        self.name, self.device_type, self.torchscript, self._lacks = name, device_type, torchscript, lacks_64bit

    def sixty_four_bit_policy(self):
        import torch

        return SixtyFourBitPolicy({torch.int64: torch.int32} if self._lacks else {})


def test_registry_selects_by_capability_not_by_name():
    registry = PatchRegistry()
    registry.add(PatchSet("caps", "", [_patch("int32", requires=("lacks-64bit",)),
                                       _patch("device", requires=("accelerator",)),
                                       _patch("both", requires=("lacks-64bit", "accelerator")),
                                       _patch("no-jit", requires=("no-torchscript",))]))
    ids = lambda backend: [p.id for _, p in registry.select("chatglm3", backend, "train")]  # noqa: E731
    assert ids(_Declared("npu", lacks_64bit=True, device_type="npu")) == ["int32", "device", "both", "no-jit"]
    assert ids(_Declared("host32", lacks_64bit=True)) == ["int32", "no-jit"]
    assert ids(_Declared("gpu", device_type="gpu", torchscript=True)) == ["device"]
    with pytest.raises(ValueError, match="unknown capability 'fast'"):
        _patch("typo", requires=("fast",)).applies_to(_Declared("x"), "train")


def test_builtin_sets_come_through_the_hook():
    manager = PluginManager(autoload=False)
    registry = manager.patch_sets
    assert list(registry.sets) == ["compat", "no-torchscript", "int32", "accelerator"]
    assert {registry.origin(name) for name in registry.names()} == {"patches"}
    assert "glmport_register_patch_sets" in manager.info["patches"].hooks
    assert "compat" not in PluginManager(disabled=["patches"], autoload=False).patch_sets.sets


# ------------------------------------------------------------------------------ third-party patch sets

TOY_PLUGIN = '''
"""A third-party backend that ships its own patch set through glmport_register_patch_sets."""
from glmport import hookimpl
from glmport.backend import Availability, Backend
from glmport.patching import Patch, PatchSet

CALLS = []


class Toy32Backend(Backend):
    name = "toy32"
    description = "toy device from a plugin"
    device_type = "cpu"

    def availability(self):
        return Availability(True, "toy32 is always here")

    def device_count(self):
        return 1


def count_norm_calls(ctx):
    original = ctx.original("RMSNorm.forward")

    def forward(self, hidden_states):
        CALLS.append(type(self).__name__)
        return original(self, hidden_states)

    ctx.replace("RMSNorm.forward", forward)
    ctx.add("RMSNorm.toy32_marker", True)


def patches(family):
    return [Patch("toy-norm-count", family=family, file="modeling", replaces=("RMSNorm.forward",),
                  adds=("RMSNorm.toy32_marker",), why="count RMSNorm calls on toy32",
                  apply=count_norm_calls, backends=("toy32",), modes=("train",))]


@hookimpl
def glmport_register_backends(registry):
    registry.add(Toy32Backend())


@hookimpl
def glmport_register_patch_sets(registry):
    registry.add(PatchSet("toy32-train", "toy32 training", patches("chatglm3") + patches("glm4")))
'''

OVERLAP_PLUGIN = '''
"""A plugin whose set replaces what the builtin mlu-train set already replaces."""
from glmport import hookimpl
from glmport.patching import Patch, PatchSet


def replace_rotation(ctx):
    ctx.replace("apply_rotary_pos_emb", lambda x, rope_cache: x)


@hookimpl
def glmport_register_patch_sets(registry):
    registry.add(PatchSet("toy-overlap", "overlaps mlu-train", [
        Patch("toy-rotation", family="chatglm3", file="modeling", replaces=("apply_rotary_pos_emb",),
              why="overlap", apply=replace_rotation, backends=("mlu",), modes=("train",)),
    ]))
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("patch-plugins")
    (folder / "glmport_toy_patches.py").write_text(TOY_PLUGIN)
    (folder / "glmport_toy_overlap.py").write_text(OVERLAP_PLUGIN)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    for name in ("glmport_toy_patches", "glmport_toy_overlap"):
        sys.modules.pop(name, None)


def test_third_party_set_is_selected_and_applied(plugin_dir, model_dir):
    import torch

    manager = PluginManager(load=["glmport_toy_patches"], autoload=False)
    registry = manager.patch_sets
    assert registry.origin("toy32-train") == "glmport_toy_patches"
    toy32, cpu = manager.backends.get("toy32"), manager.backends.get("cpu")
    compat_glm4 = [p.id for p in registry.sets["compat"].patches if p.family == "glm4"]
    assert [(s.name, p.id) for s, p in registry.select("glm4", toy32, "train")] == \
        [("compat", pid) for pid in compat_glm4] + [("no-torchscript", "torchscript-off"),
                                                   ("toy32-train", "toy-norm-count")]
    assert "toy32-train" not in {s.name for s, _ in registry.select("chatglm3", toy32, "infer")}  # mode
    assert "toy32-train" not in {s.name for s, _ in registry.select("chatglm3", cpu, "train")}  # backend

    folder = model_dir(CHATGLM3)
    plan = make_plan(folder, "toy32", "train", registry=registry, backend_object=toy32)
    assert not plan.problems
    assert ("toy32-train", "toy-norm-count", "apply") in plan_rows(plan)
    assert {s for s, _, status in plan_rows(plan) if status == "apply"} == {"compat", "no-torchscript", "toy32-train"}

    plugin = sys.modules["glmport_toy_patches"]
    plugin.CALLS.clear()
    with patched_model(folder, "toy32", "train", registry=registry, backend_object=manager.backends.get("toy32")) \
            as (model, session):
        assert "toy32-train/toy-norm-count" in session.summary()
        modeling = session.modules["modeling"]
        assert modeling.RMSNorm.toy32_marker is True
        with torch.no_grad():
            model(input_ids=token_batch("chatglm3"))
        assert plugin.CALLS and set(plugin.CALLS) == {"RMSNorm"}
    assert not hasattr(modeling.RMSNorm, "toy32_marker")
    calls = len(plugin.CALLS)
    model(input_ids=token_batch("chatglm3"))  # the model's classes are back to the originals
    assert len(plugin.CALLS) == calls


def test_third_party_set_in_cli_list_and_plan(plugin_dir, model_dir, fresh_plugin_manager, capsys):
    out = ok(run_cli("-p", "glmport_toy_patches", "patch", "list", "--json"))  # plugin_dir is on sys.path
    sets = {s["set"]: s for s in json.loads(out.stdout)}
    assert sets["toy32-train"]["plugin"] == "glmport_toy_patches"
    toy = sets["toy32-train"]["patches"]
    assert [(p["family"], p["id"], p["backends"], p["modes"]) for p in toy] == \
        [("chatglm3", "toy-norm-count", ["toy32"], ["train"]), ("glm4", "toy-norm-count", ["toy32"], ["train"])]
    assert sets["compat"]["plugin"] == "patches"
    without = ok(run_cli("patch", "list", "--json"))
    assert "toy32-train" not in {s["set"] for s in json.loads(without.stdout)}

    from glmport.cli import main

    folder = model_dir(CHATGLM3)
    rc = main(["-p", "glmport_toy_patches", "patch", "plan", str(folder), "--backend", "toy32", "--mode", "train",
               "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["problems"] == []
    assert {"set": "toy32-train", "id": "toy-norm-count", "status": "apply"}.items() <= \
        next(p for p in plan["patches"] if p["set"] == "toy32-train").items()


def test_overlapping_sets_are_a_problem(plugin_dir, model_dir, fresh_plugin_manager, capsys):
    manager = PluginManager(load=["glmport_toy_overlap"], autoload=False)
    folder = model_dir(CHATGLM3)
    mlu = manager.backends.get("mlu")
    plan = make_plan(folder, "mlu", "train", registry=manager.patch_sets, backend_object=mlu)
    overlap = [str(p) for p in plan.problems]
    assert len(overlap) == 1
    assert "patch toy-overlap/toy-rotation" in overlap[0]
    assert "replaces apply_rotary_pos_emb, which no-torchscript/torchscript-off already replaces" in overlap[0]
    # only where both apply
    assert not make_plan(folder, "mlu", "infer", registry=manager.patch_sets, backend_object=mlu).problems

    from glmport.patching.session import load_modules, patch_session

    modules, _ = load_modules(model_info(folder))
    before = snapshot(modules)
    with pytest.raises(PatchError, match="apply_rotary_pos_emb, which no-torchscript/torchscript-off"):
        patch_session(model_info(folder), manager.backends.get("mlu"), "train", registry=manager.patch_sets)
    assert changes(before, modules) == set()  # refused before anything was replaced

    from glmport.cli import main

    rc = main(["-p", "glmport_toy_overlap", "patch", "plan", str(folder), "--backend", "mlu", "--mode", "train"])
    out = capsys.readouterr().out
    assert rc == 2 and "REFUSED:" in out and "toy-overlap/toy-rotation" in out


# ----------------------------------------------------------------------------------------- session rules


def test_applying_twice_is_refused_and_possible_again_after_undo(model_dir, caplog):
    from glmport.patching.session import patch_session

    folder = model_dir(CHATGLM3)
    info = model_info(folder)
    manager = PluginManager(autoload=False)
    cpu, registry = manager.backends.get("cpu"), manager.patch_sets
    with caplog.at_level(logging.INFO, logger="glmport"):
        first = patch_session(info, cpu, "infer", registry=registry)
    try:
        summaries = [r.getMessage() for r in caplog.records if r.name == "glmport" and "patches for" in r.getMessage()]
        assert len(summaries) == 1, summaries  # one summary line per session
        assert summaries[0].startswith("patches for chatglm3/cpu/infer [modeling=glmport-fixture-chatglm3-2024-06 "
                                       "(imitates chatglm3-6b-2024-06)")
        assert f"{len(first.plan.to_apply)} applied: compat/compat-config-use-cache" in summaries[0]
        with pytest.raises(PatchError, match="is already patched \\(for cpu/infer\\) in this process"):
            patch_session(info, cpu, "train", registry=registry)
        with pytest.raises(PatchError, match="already patched"), patched_model(folder, "cpu", "infer"):
            pass
    finally:
        first.undo()
    first.undo()  # idempotent
    second = patch_session(info, cpu, "train", registry=registry)
    assert second.active and second.recorder.verify() == []
    second.undo()
    assert not second.active


def test_verify_after_build_detects_a_replaced_patch(model_dir):
    from glmport.patching.session import load_modules

    folder = model_dir(CHATGLM3)
    modules, _ = load_modules(model_info(folder))
    before = snapshot(modules)
    with patched_model(folder, "cpu", "train") as (model, session):
        session.verify_after_build(model)
        pretrained = session.modules["modeling"].ChatGLMPreTrainedModel
        pretrained._init_weights = lambda self, module: None  # something else overwrites a patched method
        with pytest.raises(PatchError, match=r"replaced again after patching: ChatGLMPreTrainedModel._init_weights "
                                             r"\(patch compat-init-missing-weights\)"):
            session.verify_after_build(model)
    assert changes(before, modules) == set()  # undo put the original back, not the overwrite


def _failing_registry(mode: str):
    """compat plus a set whose second patch breaks: the first one's replacement must be rolled back."""
    def fine(ctx):
        ctx.replace("RMSNorm.forward", lambda self, hidden_states: hidden_states)

    def boom(ctx):
        raise RuntimeError("boom")

    def unstuck(ctx):
        ctx.replace("MLP.forward", lambda self, hidden_states: hidden_states)
        ctx.module.MLP.forward = lambda self, hidden_states: None  # not through the recorder

    registry = PatchRegistry()
    registry.add(PluginManager(autoload=False).patch_sets.get("compat"))
    broken = boom if mode == "raises" else unstuck
    registry.add(PatchSet("broken", "", [
        _patch("fine", apply=fine),
        _patch("broken", apply=broken, replaces=("MLP.forward",)),
    ]))
    return registry


@pytest.mark.parametrize("mode, message", [("raises", "patch broken failed to apply to .*RuntimeError: boom"),
                                           ("does-not-stick", "patches did not stick: MLP.forward \\(patch broken\\)")])
def test_a_failing_patch_rolls_back_everything(model_dir, mode, message):
    from glmport.patching.session import patch_session

    folder = model_dir(CHATGLM3)
    modules = imported_modules(model_info(folder))
    before, flags = snapshot(modules), capture_state()
    with pytest.raises(PatchError, match=message):
        patch_session(model_info(folder), PluginManager(autoload=False).backends.get("cpu"), "train",
                      registry=_failing_registry(mode))
    # the compat patches applied before the broken one are undone too (even the write that bypassed the
    # recorder is gone: undo puts back what the recorder saw first)
    assert changes(before, modules) == set()
    assert capture_state() == flags


def test_preflight_reports_every_missing_target_in_one_error(model_dir, tmp_path):
    from glmport.patching.manifest import known_revisions
    from glmport.patching.session import load_modules, patch_session

    folder = copy_folder_linking_weights(model_dir(CHATGLM3), tmp_path / "renamed-targets")
    modeling = folder / "modeling_chatglm.py"
    text = modeling.read_text(encoding="utf-8")
    for old, new in (("def apply_rotary_pos_emb(", "def rotate_renamed_locally("),
                     ("def get_position_ids(", "def position_ids_renamed_locally(")):
        assert text.count(old) == 1
        text = text.replace(old, new)
    modeling.write_text(text, encoding="utf-8")
    info = model_info(folder)
    modules, _ = load_modules(info)
    before = snapshot(modules)
    manager = PluginManager(autoload=False)
    mlu, registry = manager.backends.get("mlu"), manager.patch_sets
    with pytest.raises(PatchError) as refused:
        patch_session(info, mlu, "train", registry=registry)
    assert [p.what for p in refused.value.problems] == [
        f"unknown revision (sha256 {refused.value.problems[0].what.split('sha256 ')[1][:12]}...); known revisions of "
        f"this file: {', '.join(known_revisions('modeling'))}"]
    with pytest.raises(PatchError) as missing:
        patch_session(info, mlu, "train", allow_unverified=True, registry=registry)
    whats = [p.what for p in missing.value.problems]
    assert len(whats) == 2, whats
    assert whats[0] == "patch torchscript-off: target apply_rotary_pos_emb does not exist in this revision"
    assert re.fullmatch(r"patch int32-positions: target ChatGLM\w*\.get_position_ids does not exist in this revision",
                        whats[1]), whats[1]
    assert "cannot patch" in str(missing.value) and "  2. " in str(missing.value)
    assert changes(before, modules) == set()


# ----------------------------------------------------------------------------------------- TorchScript


def test_torchscript_patch_restores_the_flags_and_undo_puts_the_modules_back():
    from glmport.patches import torchscript

    pre_import = {"jit_profiling_mode": True, "jit_profiling_executor": True, "jit_fuse_cpu": False,
                  "jit_fuse_gpu": False}
    as_imported = {"jit_profiling_mode": False, "jit_profiling_executor": False, "jit_fuse_cpu": True,
                   "jit_fuse_gpu": False}
    module = types.ModuleType("remote_like")
    scripted = object()
    module.apply_rotary_pos_emb = scripted
    restore_state(as_imported)  # what the remote module's import left behind
    recorder = PatchRecorder()
    ctx = PatchContext(module, {"modeling": module}, recorder, None, "train", None, pre_import, "glm4",
                       torchscript.patch("glm4", requires=()))
    torchscript.apply(ctx)
    assert capture_state() == pre_import
    assert module.apply_rotary_pos_emb is torchscript.rotate_batch_first
    recorder.undo()
    assert capture_state() == as_imported
    assert module.apply_rotary_pos_emb is scripted


FIRST_IMPORT_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from glmport.modeling import inspect_model_dir
    from glmport.patching.session import capture_process_state, load_modules, patch_session
    from glmport.patching.session import restore_process_state as restore
    from glmport.plugins import PluginManager

    manager = PluginManager(autoload=False)
    cpu, registry = manager.backends.get("cpu"), manager.patch_sets
    first, planned = (inspect_model_dir(path) for path in sys.argv[1:3])
    states = {"before import": capture_process_state()}
    session = patch_session(first, cpu, "infer", registry=registry)  # imports: the flags flip, the patch restores them
    states["patched"] = capture_process_state()
    session.undo()
    states["undone"] = capture_process_state()
    session = patch_session(first, cpu, "infer", registry=registry)  # the module is cached now
    states["patched again"] = capture_process_state()
    session.undo()
    restore(states["before import"])
    load_modules(planned)  # what `glmport patch plan` does: import (another folder) without patching
    states["planned"] = capture_process_state()
    session = patch_session(planned, cpu, "infer", registry=registry)
    states["patched after plan"] = capture_process_state()
    session.undo()
    print(json.dumps(states))
''')
AS_IMPORTED = {"jit_profiling_mode": False, "jit_profiling_executor": False, "jit_fuse_cpu": True}


@pytest.fixture(scope="module")
def fresh_process_flags(model_dir, tmp_path_factory):
    """TorchScript flags in a fresh process, where the remote imports really happen."""
    first = model_dir(CHATGLM3)
    planned = copy_folder_linking_weights(first, tmp_path_factory.mktemp("flags") / "planned-first")
    out = subprocess.run([sys.executable, "-c", FIRST_IMPORT_SCRIPT, str(first), str(planned)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    states = json.loads(out.stdout.strip().splitlines()[-1])
    assert states["planned"] == {**states["before import"], **AS_IMPORTED}  # the import flips them (like upstream)
    return states


def test_first_session_restores_flags_the_import_flipped(fresh_process_flags):
    states = fresh_process_flags
    assert states["patched"] == states["before import"]
    # undo puts back what the remote module set when it was imported
    assert states["undone"] == {**states["before import"], **AS_IMPORTED}


def test_second_session_in_the_same_process_restores_the_flags_too(fresh_process_flags):
    assert fresh_process_flags["patched again"] == fresh_process_flags["before import"]


def test_session_after_a_plan_in_the_same_process_restores_the_flags(fresh_process_flags):
    assert fresh_process_flags["patched after plan"] == fresh_process_flags["before import"]

def test_load_model_without_a_tokenizer_config_says_what_is_missing(model_dir, tmp_path):
    from glmport.errors import GlmportError
    from glmport.modeling import load_model

    folder = copy_folder_linking_weights(model_dir(CHATGLM3), tmp_path / "no-tokenizer",
                                         skip=("tokenizer_config.json",))
    with pytest.raises(GlmportError, match="tokenizer_config.json"):
        manager = PluginManager(autoload=False)
        load_model(model_info(folder), manager.backends.get("cpu"), mode="infer", dtype=None,
                   patch_sets=manager.patch_sets)
