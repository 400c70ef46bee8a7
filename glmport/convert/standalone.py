"""Patches written into a model folder as plain code, for a folder that must load without glmport.

``glmport patch materialize`` writes an overlay whose code calls back into glmport when it is imported.
An exported folder goes to machines without glmport (a serving host, a colleague's notebook), so
``glmport export`` writes the patches themselves next to the remote code, which stays as it was:

* ``glmport_compat.py``: the source of each patch's ``apply`` function, with the module-level constants
  and helpers it uses, a small stand-in for the patch context that applies them for good (nothing is ever
  undone in a served model), and, at the end, relative imports of the classes the folder's ``auto_map``
  names, after which it patches their modules;
* ``config.json`` and ``tokenizer_config.json`` whose ``auto_map`` entries name ``glmport_compat``: loading
  by path goes through it (transformers copies its relative imports, the original files, along).

The original files keep their text, so glmport's manifest knows them and glmport loads the folder like any
other, with its own patches for its backend and mode: ``glmport_compat`` leaves modules alone while
glmport's patch engine imports them, and modules glmport has patched already.

Only patches whose code is self-contained can be written out: one that calls into glmport is refused with
its name.
"""

from __future__ import annotations

import ast
import dis
import inspect
import pprint
import sys
import textwrap
import types

from glmport.errors import PatchError

MODULE = "glmport_compat"  # glmport_compat.py, beside the remote code
ENGINE = "glmport.patching.session"  # where glmport imports and patches remote code
# what glmport leaves on a module it has patched: a patch session, or an overlay's recorder
GLMPORT_MARKS = ("_glmport_patch_session", "_glmport_recorder")
_PLAIN = (str, int, float, bool, type(None))


def _is_plain(value) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list, frozenset, set)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


def _globals_used(code: types.CodeType) -> set[str]:
    """Global names a function (and the functions it defines) reads: attribute names are not among them."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _globals_used(const)
    return names


def _imports_glmport(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "glmport" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "glmport":
            return True
    return False


def _collect(function, patch_id: str, sources: dict[str, str], header: dict[str, str]) -> None:
    """Add ``function``'s source, and what it needs from its module, to ``sources``/``header``."""
    name = function.__name__
    if name in sources:
        return
    source = textwrap.dedent(inspect.getsource(function))
    if _imports_glmport(source):
        raise PatchError(f"patch {patch_id} cannot be written into a folder that loads without glmport: "
                         f"{function.__module__}.{name} imports glmport")
    sources[name] = source
    module = sys.modules[function.__module__]
    for used in sorted(_globals_used(function.__code__)):
        if used not in vars(module) or used in sources or used in header:
            continue  # an attribute name, a builtin, or already there
        value = vars(module)[used]
        if isinstance(value, types.ModuleType):
            if value.__name__.split(".")[0] == "glmport":
                raise PatchError(f"patch {patch_id} uses glmport ({used}); it cannot be written out")
            header[used] = f"import {value.__name__}" + ("" if value.__name__ == used else f" as {used}")
        elif isinstance(value, types.FunctionType) and value.__module__ == function.__module__:
            _collect(value, patch_id, sources, header)
        elif _is_plain(value):
            header[used] = f"{used} = {value!r}"
        else:
            raise PatchError(f"patch {patch_id} uses {used} ({type(value).__name__}) from {function.__module__}, "
                             "which cannot be written out as code")


_RUNTIME = '''

class _Context:
    """What a patch's apply() reads: the module it patches and the family; replacements are for good."""

    def __init__(self, module, family, revision):
        self.module, self.module_family, self.revision = module, family, revision
        self.modules, self.mode, self.backend, self.state = {}, "infer", None, {}
        self.recorder = self

    def on_undo(self, action, description):  # nothing is undone in an exported folder
        pass

    def _owner(self, dotted):
        owner = self.module
        for part in dotted.split(".")[:-1]:
            owner = getattr(owner, part)
        return owner, dotted.rpartition(".")[2]

    def original(self, dotted, module=None):
        owner, name = self._owner(dotted)
        return getattr(owner, name)

    def replace(self, dotted, value, module=None):
        owner, name = self._owner(dotted)
        setattr(owner, name, value)

    add = replace


def _glmport_is_importing():
    """glmport's patch engine imports remote code and patches it itself, for its backend and mode."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__") == ENGINE:
            return True
        frame = frame.f_back
    return False


def apply(classes):
    """Patch the module of each class in ``classes`` (file key -> a class the auto_map names) once."""
    if _glmport_is_importing():
        return
    for file_key, cls in classes.items():
        module = sys.modules[cls.__module__]
        if getattr(module, "_glmport_compat_applied", False) or any(hasattr(module, m) for m in GLMPORT_MARKS):
            continue
        for patch_id, function in PATCHES.get(file_key, ()):
            globals()[function](_Context(module, FAMILY, REVISIONS.get(file_key)))
        module._glmport_compat_applied = True
'''


def module_source(plan_entries, family: str, revisions: dict[str, str | None], title: str,
                  exported: dict[str, list[str]]) -> str:
    """The text of ``glmport_compat.py``: ``plan_entries`` (the patches to write, in order) and the classes
    it re-exports, ``exported`` (remote file name -> class names the auto_map entries name)."""
    from glmport.patching.manifest import REMOTE_FILES

    sources: dict[str, str] = {}
    header: dict[str, str] = {"sys": "import sys"}
    per_file: dict[str, list[tuple[str, str]]] = {}
    for patch in plan_entries:
        _collect(patch.apply, patch.id, sources, header)
        per_file.setdefault(patch.file, []).append((patch.id, patch.apply.__name__))
    listing = "\n".join(f"#   {patch.id}: {patch.why}" for patch in plan_entries)
    keys = {name: key for key, name in REMOTE_FILES.items()}
    imports = "".join(f"from .{name.removesuffix('.py')} import {', '.join(classes)}  # noqa: E402\n"
                      for name, classes in sorted(exported.items()))
    patched = {keys[name]: classes[0] for name, classes in sorted(exported.items()) if name in keys}
    return "".join((
        f'"""Written by glmport export for {title}: the compatibility patches this folder\'s remote code needs on\n'
        'transformers 5, as plain code: the folder loads without glmport. Each function below is a glmport patch;\n'
        'the end of the file imports the classes config.json and tokenizer_config.json name (their auto_map points\n'
        'here) and patches their modules."""\n\n',
        "\n".join(header[name] for name in sorted(header, key=lambda n: (not header[n].startswith("import"), n))),
        f"\n\n# patches, in the order they are applied:\n{listing}\n",
        f"FAMILY = {family!r}\nREVISIONS = {pprint.pformat(revisions)}\n",
        f"PATCHES = {pprint.pformat(per_file)}\n",
        f"ENGINE = {ENGINE!r}\nGLMPORT_MARKS = {GLMPORT_MARKS!r}\n\n\n",
        "\n\n".join(sources[name].rstrip() + "\n" for name in sources),
        _RUNTIME, "\n\n", imports,
        "\napply({" + ", ".join(f"{key!r}: {cls}" for key, cls in patched.items()) + "})\n",
    ))


def redirect_auto_map(auto_map, exported: dict[str, list[str]]):
    """``auto_map`` (config.json's dict, or tokenizer_config.json's list) with each ``file.Class`` entry
    pointing at ``glmport_compat.Class``; ``exported`` collects the classes (file name -> class names)."""
    def redirect(reference):
        if not isinstance(reference, str) or "." not in reference:
            return reference
        module, _, cls = reference.rpartition(".")
        names = exported.setdefault(f"{module}.py", [])
        if cls not in names:
            names.append(cls)
        return f"{MODULE}.{cls}"

    if isinstance(auto_map, dict):
        return {key: redirect_auto_map(value, exported) for key, value in auto_map.items()}
    if isinstance(auto_map, list):
        return [redirect(item) for item in auto_map]
    return redirect(auto_map)
