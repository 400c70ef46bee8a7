"""``glmport patch materialize``: an overlay folder that other tools can load by path.

The overlay holds symbolic links to every file of the model folder except the remote-code modules, which
are copied with two additions: a header that records the process state before the module body runs
(TorchScript flags) and a footer that checks the original text's sha256 and applies the planned patches
to the module it ends. ``AutoModelForCausalLM.from_pretrained(OVERLAY, trust_remote_code=True)`` then
builds a patched model in any script, as long as glmport is importable there. The original folder is
only read.
"""

from __future__ import annotations

import json
import pprint
import shutil
from pathlib import Path

from glmport.errors import PatchError
from glmport.patching.manifest import REMOTE_FILES, sha256_raw

HEADER_MARK = "# --- glmport overlay header ---"
FOOTER_MARK = "# --- glmport overlay footer ---"
OVERLAY_FILE = "glmport_overlay.json"  # the plan, for people
PLAN_MODULE = "glmport_overlay_plan"  # the plan, for the footer: transformers copies relative imports along


def _header() -> str:
    return (
        f"{HEADER_MARK}\n"
        "import glmport.patching.overlay as _glmport_overlay\n"
        "_glmport_state = _glmport_overlay.capture()\n"
        "# --- end of glmport overlay header ---\n"
    )


def _footer(file_key: str, digest: str) -> str:
    return (
        f"\n{FOOTER_MARK}\n"
        f"from .{PLAN_MODULE} import PLAN as _glmport_plan\n"
        f"_glmport_overlay.finish(globals(), {file_key!r}, {digest!r}, _glmport_state, _glmport_plan)\n"
    )


def _wrap(text: str, file_key: str, digest: str) -> str:
    """Header before the module body (after any ``from __future__`` lines, which must come first)."""
    lines = text.splitlines(keepends=True)
    split = 0
    for index, line in enumerate(lines):
        if line.startswith("from __future__ import"):
            split = index + 1
    head, body = "".join(lines[:split]), "".join(lines[split:])
    return head + _header() + body + _footer(file_key, digest)


def original_text(overlay_source: str) -> str:
    """The upstream text inside an overlay module (what the header and footer wrap)."""
    head, _, rest = overlay_source.partition(f"{HEADER_MARK}\n")
    body = rest.split("# --- end of glmport overlay header ---\n", 1)[-1]
    return head + body.rsplit(f"\n{FOOTER_MARK}\n", 1)[0]


def capture() -> dict:
    from glmport.patching.session import capture_process_state

    return capture_process_state()


def finish(namespace: dict, file_key: str, digest: str, state: dict, plan: dict) -> None:
    """Run from an overlay module's footer: verify its text, apply the planned patches of this file.

    The footer runs inside someone else's script, so there is no caller to hand down a plugin manager:
    this is the one place glmport makes its own, from the environment (installed plugins, ``-p`` is not
    available). Patches are applied by :func:`glmport.patching.session.apply_patches`, the same code and
    the same rollback as ``glmport train``."""
    import sys

    from glmport.patching.session import apply_patches
    from glmport.plugins import PluginManager

    path = Path(namespace["__file__"])
    text = original_text(path.read_text(encoding="utf-8"))
    if sha256_raw(text.encode("utf-8")) != digest:
        raise PatchError(f"{path}: the code changed since the overlay was made; run glmport patch materialize again")
    manager = PluginManager()
    backend = manager.backends.get(plan["backend"])
    if backend is None:
        raise PatchError(f"{path}: the overlay was made for backend {plan['backend']!r}, which is not registered here "
                         "(install the plugin that provides it)")
    module = sys.modules[namespace["__name__"]]
    wanted = [(p["set"], p["id"]) for p in plan["patches"] if p["status"] == "apply" and p["file"] == file_key]
    available = {(s.name, p.id): p for s, p in manager.patch_sets.select(plan["family"], backend, plan["mode"])}
    missing = sorted(f"{name}/{patch_id}" for name, patch_id in set(wanted) - available.keys())
    if missing:
        raise PatchError(f"{path}: patches of this overlay are not registered here: {', '.join(missing)} "
                         "(install the plugin that provides them, or materialize the overlay again)")
    namespace["_glmport_recorder"] = apply_patches(
        [available[key] for key in wanted], {file_key: module}, backend, plan["mode"], state=state,
        family=plan["family"], revisions={file_key: plan["files"][file_key]["revision"]})


def materialize(plan, model_dir: Path, out_dir: Path) -> Path:
    """Write the overlay for ``plan`` (a :class:`~glmport.patching.session.PatchPlan`) into ``out_dir``."""
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir)
    if plan.kind == "native":
        raise PatchError(
            f"{model_dir}: native GLM folders have no remote code to patch; transformers' own classes are "
            "patched in the process that loads them (glmport train / glmport infer)")
    if plan.problems:
        raise PatchError(f"cannot materialize {model_dir}", plan.problems)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PatchError(f"{out_dir}: folder is not empty; choose a new folder for the overlay")
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    code_files = {name: key for key, name in REMOTE_FILES.items()}
    for item in sorted(model_dir.iterdir()):
        target = staging / item.name
        if item.name in code_files:
            text = item.read_text(encoding="utf-8")
            digest = sha256_raw(text.encode("utf-8"))
            target.write_text(_wrap(text, code_files[item.name], digest), encoding="utf-8")
        elif item.suffix == ".py":
            shutil.copyfile(item, target)
        else:
            target.symlink_to(item)
    description = plan.as_dict()
    (staging / OVERLAY_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    (staging / f"{PLAN_MODULE}.py").write_text(
        '"""Written by glmport patch materialize: the patch plan this overlay applies."""\n\n'
        f"PLAN = {pprint.pformat(description, width=100)}\n", encoding="utf-8")
    if out_dir.exists():
        out_dir.rmdir()
    staging.rename(out_dir)
    return out_dir
