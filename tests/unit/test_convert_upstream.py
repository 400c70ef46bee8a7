"""export and convert with the real upstream remote code (``GLMPORT_UPSTREAM_DIR``, one folder per revision).

Each revision's .py files go into a tiny model folder (tiny random weights: the real checkpoints are not
here) with a real tokenizer: ChatGLM2/3's SentencePiece tokenizer.model where a folder of the family has
it (the two share it), else one trained as in convertkit; GLM-4 with tiktoken ranks trained on the real
data (the real file is not available). Then, per revision:

* convert: the native logits equal the real remote code's; the fast tokenizer gives the real tokenizer's
  ids on every text of the real data sets; the chat template is verified by convert itself;
* export: the folder glmport export writes loads in plain transformers (the compat patches written as plain
  code, applied to the real files) in one interpreter that never imports glmport, and computes what glmport
  computed (checked when the module's tests are done, for all revisions at once).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convertkit import SHARED_DATA, glm4_pattern, real_texts, train_sentencepiece, train_tiktoken_ranks

UPSTREAM_ENV = "GLMPORT_UPSTREAM_DIR"
FAMILIES = ("chatglm2", "chatglm3", "glm4")
CODE = ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py", "quantization.py")


def _root() -> Path | None:
    raw = os.environ.get(UPSTREAM_ENV, "").strip()
    return Path(raw) if raw else None


def _revisions() -> list:
    root = _root()
    if root is None or not root.is_dir():
        return [pytest.param(None, id="upstream", marks=pytest.mark.skip(
            reason=f"{UPSTREAM_ENV} is not set (or not a folder): real upstream files are not available here"))]
    from glmport.patching.manifest import identify_file, load_manifest

    revisions = load_manifest()["revisions"]
    found = []
    for folder in sorted(p for p in root.iterdir() if (p / "modeling_chatglm.py").is_file()):
        revision = identify_file("modeling", folder / "modeling_chatglm.py").revision
        family = revisions.get(revision or "", {}).get("family")
        if family in FAMILIES:
            found.append(pytest.param((folder, family), id=folder.name))
    return found or [pytest.param(None, id="upstream", marks=pytest.mark.skip(reason=f"no revision folders in {root}"))]


def _sibling(folder: Path, family: str, name: str) -> Path | None:
    """``name`` from ``folder``, else from another folder of the family (partial copies borrow)."""
    from glmport.patching.manifest import identify_file, load_manifest

    if (folder / name).is_file():
        return folder / name
    revisions = load_manifest()["revisions"]
    for other in sorted(folder.parent.iterdir(), reverse=True):
        if (other / name).is_file() and (other / "modeling_chatglm.py").is_file():
            revision = identify_file("modeling", other / "modeling_chatglm.py").revision
            if revisions.get(revision or "", {}).get("family") == family:
                return other / name
    return None


def _sentencepiece_file(root: Path, scratch: Path) -> Path:
    real = sorted(root.glob("chatglm[23]-6b-*/tokenizer.model"))
    return real[0] if real else train_sentencepiece(scratch, real_texts())


def build_folder(folder: Path, family: str, target: Path, scratch: Path) -> Path:
    from safetensors.torch import save_file

    from glmport.tiny.build import TinyShape, native_model, remote_config, remote_state_dict, used_token_ids
    from glmport.tiny.remote import GLM4_CHAT_TEMPLATE
    from glmport.tiny.tokenizer import LAYOUTS

    target.mkdir(parents=True)
    for name in CODE:
        source = _sibling(folder, family, name)
        if source is not None:
            shutil.copyfile(source, target / name)
    layout, shape = LAYOUTS[family], TinyShape(seq_length=64)
    (target / "config.json").write_text(json.dumps(remote_config(shape, layout, folder.name), indent=2))
    save_file(remote_state_dict(native_model(shape, layout, 0, used_token_ids(layout, ""))),
              str(target / "model.safetensors"), metadata={"format": "pt"})
    tokenizer_class = "ChatGLM4Tokenizer" if family == "glm4" else "ChatGLMTokenizer"
    config = {"tokenizer_class": tokenizer_class, "padding_side": "left", "clean_up_tokenization_spaces": False,
              "auto_map": {"AutoTokenizer": [f"tokenization_chatglm.{tokenizer_class}", None]}}
    if family == "glm4":
        ranks = train_tiktoken_ranks(scratch, real_texts()[:4000], glm4_pattern())
        shutil.copyfile(ranks, target / "tokenizer.model")
        first = len(ranks.read_text().splitlines())
        names = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>"]
        config["added_tokens_decoder"] = {str(first + i): {"content": name, "special": True, "normalized": False,
                                                           "lstrip": False, "rstrip": False, "single_word": False}
                                          for i, name in enumerate(names)}
        config.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>", additional_special_tokens=names[1:])
        if folder.name.endswith("jinja"):  # that revision reads its template from here (the real one is not available)
            config["chat_template"] = GLM4_CHAT_TEMPLATE
    else:
        shutil.copyfile(_sentencepiece_file(folder.parent, scratch), target / "tokenizer.model")
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return target


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export folders collected over the module, loaded in one interpreter at the end."""
    folders: list[tuple[Path, torch.Tensor]] = []
    yield folders
    if not folders:
        return
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "for folder, out in json.loads(sys.argv[1]):\n"
        "    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)('你好 hello')\n"
        "    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)\n"
        "    with torch.no_grad():\n"
        f"        torch.save(model(input_ids=torch.tensor({ids.tolist()})).logits, out)\n"
        "print(any(m.split('.')[0] == 'glmport' for m in sys.modules))\n")
    jobs = [(str(folder), str(folder.parent / f"{folder.name}.pt")) for folder, _ in folders]
    done = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == "False"  # glmport was never imported
    for (folder, want_for), (_, out) in zip(folders, jobs):
        assert torch.allclose(torch.load(out), want_for(ids), atol=1e-4), folder


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data sets not found at {SHARED_DATA}")
@pytest.mark.parametrize("source", _revisions())
def test_real_remote_code_converts_and_exports(source, tmp_path, exported):
    from transformers import AutoModelForCausalLM

    from glmport.convert.native import convert_to_native
    from glmport.convert.tokenizer import mismatches
    from glmport.export import export
    from glmport.infer import load_for_inference
    from glmport.modeling import RemoteCodeConsent
    from glmport.plugins import PluginManager

    upstream, family = source
    folder = build_folder(upstream, family, tmp_path / upstream.name, tmp_path)
    manager = PluginManager(autoload=False)
    cpu = manager.backends.get("cpu")
    done = convert_to_native(folder, tmp_path / "native", backend=cpu, patch_sets=manager.patch_sets,
                             consent=RemoteCodeConsent())
    from glmport.patching.manifest import identify_file

    assert done.family == family  # a file two revisions share is listed under the older one
    assert done.record["source_code"]["modeling"] == identify_file("modeling", upstream / "modeling_chatglm.py").revision
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    bundle = load_for_inference(folder, cpu, patch_sets=manager.patch_sets, dtype="fp32")
    try:
        with torch.no_grad():
            remote = bundle.model(input_ids=ids).logits
        native = AutoModelForCausalLM.from_pretrained(str(tmp_path / "native"), dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.allclose(native(input_ids=ids).logits, remote, atol=1e-5)
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(tmp_path / "native"))
        assert mismatches(fast, bundle.tokenizer, real_texts()) == []

        merged = export(folder, tmp_path / "merged", bundle, merge=True, dtype=None)
    finally:
        bundle.close()
    assert (tmp_path / "merged" / "modeling_chatglm.py").read_bytes() == (folder / "modeling_chatglm.py").read_bytes()

    def want_for(check_ids, path=folder):
        again = load_for_inference(path, cpu, patch_sets=manager.patch_sets, dtype="fp32")
        try:
            with torch.no_grad():
                return again.model(input_ids=check_ids).logits
        finally:
            again.close()

    exported.append((merged.path, want_for))
