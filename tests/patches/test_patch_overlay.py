"""``glmport patch materialize``: an overlay folder (links to the weights, patched code) that plain
transformers loads by path, in a process that makes no glmport calls of its own."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from patchkit import (
    ATOL,
    REMOTE_CODE,
    copy_folder_linking_weights,
    fixture_sources,
    make_plan,
    native_reference,
)

from glmport.errors import PatchError
from glmport.patching import overlay
from glmport.testing import ok, run_cli

SOURCE = next(s for s in fixture_sources() if s.name == "chatglm3-2024-06")

# Only torch and transformers here: whatever glmport does happens through the overlay's own imports.
LOAD_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    request = json.loads(sys.argv[1])
    results = {}
    for folder, out in request["folders"].items():
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        except Exception as exc:
            results[folder] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        encoded = tokenizer(request["texts"], padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
        generated = model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                   max_new_tokens=3, do_sample=False)
        torch.save({"ids": encoded["input_ids"], "mask": encoded["attention_mask"], "logits": logits,
                    "generated": generated}, out)
        recorders = {name: [r.patch_id for r in module._glmport_recorder.replacements]
                     for name, module in list(sys.modules.items())
                     if name.startswith("transformers_modules.") and hasattr(module, "_glmport_recorder")}
        results[folder] = {"recorders": recorders, "fuse_on_cpu": torch._C._jit_can_fuse_on_cpu()}
    print(json.dumps(results))
''')


@pytest.fixture(scope="module")
def overlay_dir(model_dir, tmp_path_factory):
    folder = model_dir(SOURCE)
    out = tmp_path_factory.mktemp("overlays") / "cpu-infer"
    result = ok(run_cli("patch", "materialize", str(folder), str(out), "--backend", "cpu", "--mode", "infer"))
    assert f"wrote overlay {out}" in result.stdout
    return folder, out


def test_overlay_layout(overlay_dir):
    folder, out = overlay_dir
    originals = {item.name for item in folder.iterdir()}
    assert {item.name for item in out.iterdir()} == originals | {overlay.OVERLAY_FILE, f"{overlay.PLAN_MODULE}.py"}
    for name in originals:
        copy, original = out / name, folder / name
        if name in REMOTE_CODE:
            assert copy.is_file() and not copy.is_symlink()
            text = copy.read_text(encoding="utf-8")
            assert text.count(f"{overlay.HEADER_MARK}\n") == 1 and text.count(f"\n{overlay.FOOTER_MARK}\n") == 1
            before_header = text[:text.index(overlay.HEADER_MARK)].splitlines()  # only `from __future__` may precede
            assert all(line.startswith("from __future__ import") for line in before_header), before_header
            assert overlay.original_text(text) == original.read_text(encoding="utf-8")
            digest = hashlib.sha256(original.read_bytes()).hexdigest()
            assert repr(digest) in text.rsplit(overlay.FOOTER_MARK, 1)[1]
        else:  # weights, config, vocabulary: links to the user's files
            assert copy.is_symlink() and copy.resolve() == original.resolve(), name
    described = json.loads((out / overlay.OVERLAY_FILE).read_text(encoding="utf-8"))
    expected = make_plan(folder, "cpu", "infer")
    assert [(p["set"], p["id"], p["status"]) for p in described["patches"]] == \
        [(e.set_name, e.patch.id, e.status) for e in expected.entries]
    assert described["backend"] == "cpu" and described["mode"] == "infer" and described["problems"] == []


def test_plain_transformers_loads_the_overlay_and_a_tampered_copy_fails(overlay_dir, tmp_path):
    folder, out = overlay_dir
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered, symlinks=True)
    modeling = tampered / "modeling_chatglm.py"
    text = modeling.read_text(encoding="utf-8")
    marker = "class RMSNorm("
    assert text.count(marker) == 1
    modeling.write_text(text.replace(marker, "# a local edit\n" + marker), encoding="utf-8")

    request = {"texts": ["hello there", "hi"], "folders": {str(out): str(tmp_path / "good.pt"),
                                                           str(tampered): str(tmp_path / "tampered.pt")}}
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(request)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])

    bad = report[str(tampered)]
    assert "error" in bad and "the code changed since the overlay was made" in bad["error"], bad
    assert "run glmport patch materialize again" in bad["error"]

    good = report[str(out)]
    assert "error" not in good, good
    applied = sorted(pid for ids in good["recorders"].values() for pid in ids)
    expected = make_plan(folder, "cpu", "infer")
    assert set(applied) == {e.patch.id for e in expected.to_apply}  # every planned patch, in its own module
    assert good["fuse_on_cpu"] is False  # torchscript-off put the flag the import flipped back

    saved = torch.load(tmp_path / "good.pt")
    ids, mask = saved["ids"], saved["mask"]
    assert mask[1, 0] == 0 and mask[0].all()  # the remote tokenizer pads on the left
    native = native_reference(SOURCE.family)
    with torch.no_grad():
        expected_logits = native(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(saved["logits"][keep], expected_logits[keep], atol=ATOL, rtol=0)
    greedy = native.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert saved["generated"].tolist() == greedy.tolist()


def test_materialize_refuses_a_non_empty_folder_native_folders_and_refused_plans(
        model_dir, native_dir, tmp_path, fresh_plugin_manager, capsys):
    from glmport.cli import main

    folder = model_dir(SOURCE)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["patch", "materialize", str(folder), str(busy), "--backend", "cpu", "--mode", "infer"]) == 2
    assert "folder is not empty; choose a new folder for the overlay" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    native_out = tmp_path / "native-overlay"
    assert main(["patch", "materialize", str(native_dir("chatglm3")), str(native_out), "--backend", "mlu",
                 "--mode", "train"]) == 2
    assert "native GLM folders have no remote code to patch" in capsys.readouterr().err
    assert not native_out.exists()

    edited = copy_folder_linking_weights(folder, tmp_path / "edited")
    with open(edited / "modeling_chatglm.py", "a", encoding="utf-8") as handle:
        handle.write("# edited\n")
    refused_out = tmp_path / "refused-overlay"
    assert main(["patch", "materialize", str(edited), str(refused_out), "--backend", "cpu", "--mode", "infer"]) == 2
    err = capsys.readouterr().err
    assert "cannot materialize" in err and "unknown revision" in err
    assert not refused_out.exists() and not (tmp_path / ".refused-overlay.partial").exists()

    empty = tmp_path / "empty-is-fine"
    empty.mkdir()
    assert main(["patch", "materialize", str(folder), str(empty), "--backend", "cpu", "--mode", "train"]) == 0
    assert (empty / overlay.OVERLAY_FILE).is_file()


@pytest.mark.parametrize("backend_name, missing", [
    ("cpu", "patches of this overlay are not registered here: toy32-train/toy-norm-count"),
    ("toy32", "the overlay was made for backend 'toy32', which is not registered here"),
])
def test_overlay_refuses_to_load_without_its_patches(tmp_path, fresh_plugin_manager, backend_name, missing):
    """An overlay planned with a plugin's set must not load unpatched where that plugin is absent."""
    module_file = tmp_path / "modeling_chatglm.py"
    text = "x = 1\n"
    module_file.write_text(text, encoding="utf-8")
    module = types.ModuleType("glmport_test_overlay_module")
    module.__file__ = str(module_file)
    sys.modules[module.__name__] = module
    plan = {"backend": backend_name, "mode": "train", "family": "chatglm3",
            "files": {"modeling": {"revision": "chatglm3-6b-2024-06"}},
            "patches": [{"set": "toy32-train", "id": "toy-norm-count", "status": "apply", "file": "modeling"}]}
    try:
        with pytest.raises(PatchError, match=missing):
            overlay.finish(vars(module), "modeling", hashlib.sha256(text.encode()).hexdigest(), {}, plan)
    finally:
        del sys.modules[module.__name__]

