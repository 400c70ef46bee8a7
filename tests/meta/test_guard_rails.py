"""Rules of the code base that keep glmport portable and its contract honest."""

from __future__ import annotations

import ast
import contextlib
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from glmport import hookspecs

REPO = Path(__file__).resolve().parents[2]

# Only backends/ may touch device APIs, collective backends or visible-devices variables.
DEVICE_SPECIFIC = re.compile(
    r"torch\.cuda|torch\.mlu|torch_mlu|\bnccl\b|\bcncl\b|\b[A-Z][A-Z_]*_VISIBLE_DEVICES\b", re.IGNORECASE
)
CHECKED_TREES = ("glmport", "patches")
HELP_SECONDS = 2.0


def _python_files(*trees: str):
    for tree in trees:
        yield from sorted((REPO / tree).rglob("*.py"))


def test_only_backends_touch_device_apis():
    offenders = []
    for path in _python_files(*CHECKED_TREES):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if DEVICE_SPECIFIC.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "device-specific names outside backends/:\n" + "\n".join(offenders)


def test_the_rule_itself_catches_what_it_should():
    for sample in ("torch.cuda.synchronize()", "import torch_mlu", "backend='nccl'", "os.environ['MLU_VISIBLE_DEVICES']"):
        assert DEVICE_SPECIFIC.search(sample), sample
    assert not DEVICE_SPECIFIC.search("backend.collective_backend")


def _hook_specs():
    return {name: getattr(hookspecs, name) for name in dir(hookspecs) if name.startswith("glmport_")}


def test_every_hook_is_documented():
    for name, spec in _hook_specs().items():
        doc = (spec.__doc__ or "").strip()
        assert len(doc) > 40, f"hook {name} needs a docstring that states its contract"
        assert name in (hookspecs.__doc__ or ""), f"hook {name} is missing from the lifecycle list in hookspecs.py"


# ------------------------------------------------------------------------- every hook has a real test
#
# A test function (``test_*`` in tests/**/test_*.py, meta/ excluded) tests a hook when the code it reaches
# calls the hook (``manager.hook.glmport_x(...)``), or implements it with ``@hookimpl`` and also does what
# makes glmport call it (HOOK_TRIGGERS). What a test reaches: its body, and by name its fixtures,
# module-level helpers and plugin-source strings, conftest fixtures, helpers imported from tests/, and
# plugin modules under tests/ that it names (``-p hooks_plugin``). The hook's name in a comment, a
# docstring or an assertion's string does not count.

# For tests that implement a hook: what makes glmport call it (an attribute, a function called by name, or
# a command given as a string). A new hook needs an entry.
HOOK_TRIGGERS = {
    "glmport_register_backends": {"backends", "env", "train", "infer"},
    "glmport_register_patch_sets": {"patch_sets", "patch", "train", "infer"},
    "glmport_env_report": {"env_reports", "env"},
    "glmport_trainer_callbacks": {"train", "run_training"},
    "glmport_before_train": {"train", "run_training"},
    "glmport_after_train": {"train", "run_training"},
}


class _TestCode:
    """Every Python file under tests/ except meta/, parsed, with its top-level definitions by name."""

    def __init__(self, root: Path):
        self.root = root
        self.trees = {p: ast.parse(p.read_text(encoding="utf-8"), str(p))
                      for p in sorted(root.rglob("*.py")) if "meta" not in p.relative_to(root).parts}
        self.helpers = {p.stem: p for p in self.trees if not p.name.startswith(("test_", "conftest"))}
        self.defs = {p: self._top_level(tree) for p, tree in self.trees.items()}

    @staticmethod
    def _top_level(tree: ast.Module) -> dict[str, ast.AST]:
        defs: dict[str, ast.AST] = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defs[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        defs[target.id] = node
        return defs

    def tests(self):
        for path, tree in self.trees.items():
            if path.name.startswith("test_"):
                for node in ast.walk(tree):
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                        yield path, node

    def _resolve(self, path: Path, name: str):
        """Where ``name``, used in ``path``, is defined: the module itself, a helper it imports from
        tests/, or a conftest.py beside it or above it (fixtures)."""
        if name in self.defs[path]:
            return [(path, self.defs[path][name])]
        for node in self.trees[path].body:
            if isinstance(node, ast.ImportFrom) and node.module in self.helpers \
                    and any((a.asname or a.name) == name for a in node.names):
                helper = self.helpers[node.module]
                return [(helper, self.defs[helper][name])] if name in self.defs[helper] else []
        folder = path.parent
        while folder == self.root or self.root in folder.parents:
            conftest = folder / "conftest.py"
            if conftest in self.defs and name in self.defs[conftest]:
                return [(conftest, self.defs[conftest][name])]
            folder = folder.parent
        return []

    def reached_from(self, path: Path, test: ast.AST):
        """Every (file, node) the test reaches by name, the test itself first."""
        queue, seen = [(path, test)], set()
        while queue:
            where, node = queue.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            yield where, node
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            names |= {a.arg for n in ast.walk(node) if isinstance(n, ast.arguments)
                      for a in n.posonlyargs + n.args + n.kwonlyargs}
            for name in names:
                queue.extend(self._resolve(where, name))


def _is_hookimpl(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Name) and target.id == "hookimpl") or \
        (isinstance(target, ast.Attribute) and target.attr == "hookimpl")


def hooks_in(node: ast.AST, hooks: set[str], code: _TestCode | None = None) -> tuple[set[str], set[str]]:
    """(hooks that ``node`` calls, hooks it implements with ``@hookimpl``), counting plugin source held in
    a string and plugin modules under tests/ named by a string."""
    called, implemented = set(), set()
    for n in ast.walk(node):
        inner = None
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in hooks:
            called.add(n.func.attr)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in hooks \
                and any(_is_hookimpl(d) for d in n.decorator_list):
            implemented.add(n.name)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            if "def glmport_" in n.value:
                with contextlib.suppress(SyntaxError):  # a string that only looks like code
                    inner = ast.parse(textwrap.dedent(n.value))
            elif code is not None and n.value in code.helpers:
                inner = code.trees[code.helpers[n.value]]
        if inner is not None:
            more_called, more_implemented = hooks_in(inner, hooks)
            called |= more_called
            implemented |= more_implemented
    return called, implemented


def triggers_in(node: ast.AST) -> set[str]:
    """What HOOK_TRIGGERS entries are matched against: attributes, functions called by name, and strings
    that are one word (a command). Variable names do not count (``env = dict(os.environ)``)."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute):
            found.add(n.attr)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
            found.add(n.func.id)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isidentifier():
            found.add(n.value)
    return found


def hook_tests() -> dict[str, list[str]]:
    hooks, code = set(_hook_specs()), _TestCode(REPO / "tests")
    assert hooks <= set(HOOK_TRIGGERS), f"add to HOOK_TRIGGERS what makes glmport call {sorted(hooks - set(HOOK_TRIGGERS))}"
    per_hook: dict[str, list[str]] = {name: [] for name in hooks}
    for path, test in code.tests():
        called, implemented, triggers = set(), set(), set()
        for _, node in code.reached_from(path, test):
            more_called, more_implemented = hooks_in(node, hooks, code)
            called |= more_called
            implemented |= more_implemented
            triggers |= triggers_in(node)
        for name in called | {h for h in implemented if HOOK_TRIGGERS[h] & triggers}:
            per_hook[name].append(f"{path.relative_to(REPO)}::{test.name}")
    return per_hook


def test_every_hook_has_a_test():
    untested = sorted(name for name, tests in hook_tests().items() if not tests)
    assert not untested, f"hooks that no test calls, or implements and triggers: {untested}"


def test_the_hook_test_rule_counts_code_not_mentions():
    hooks = {"glmport_env_report", "glmport_after_train"}
    mentions = ast.parse(textwrap.dedent('''
        # glmport_env_report is tested elsewhere
        def test_x(events):
            """Checks glmport_env_report."""
            assert events.count("glmport_after_train") == 1
            def glmport_env_report(backend):  # no @hookimpl: not a hook implementation
                return {}
    '''))
    assert hooks_in(mentions, hooks) == (set(), set())
    calls = ast.parse("def test_x(manager):\n    manager.hook.glmport_env_report(backend=None)\n")
    assert hooks_in(calls, hooks) == ({"glmport_env_report"}, set())
    plugin_source = ast.parse("PLUGIN = '''\n@hookimpl\ndef glmport_after_train(run, summary):\n    pass\n'''\n")
    assert hooks_in(plugin_source, hooks) == (set(), {"glmport_after_train"})
    assert "env" in triggers_in(ast.parse("run_cli('--backend', 'fancy', 'env', '--json')"))
    assert "env" not in triggers_in(ast.parse("env = dict(os.environ)\nrun_cli('plugins', env=env)"))


def test_importing_glmport_does_not_import_torch():
    code = (
        "import sys, glmport, glmport.cli, glmport.plugins, glmport.backend, glmport.hookspecs;"
        "glmport.cli.build_parser();"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing glmport imported: {out.stdout.strip()}"


def test_help_is_fast_and_complete():
    """``glmport --help`` in a fresh interpreter, best of 3: a generous bound that still fails the day
    the CLI imports torch and transformers (seconds) to print its usage."""
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "glmport", "--help"], capture_output=True, text=True, check=True)
        timings.append(time.perf_counter() - start)
    assert min(timings) < HELP_SECONDS, f"`glmport --help` took {min(timings):.2f} s at best (bound {HELP_SECONDS} s)"
    for command in ("backends", "env", "plugins"):
        assert command in out.stdout


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    result = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_line_runs_copied_from_upstream():
    tool = REPO.parent / "shared" / "tools" / "upstream_overlap.py"
    if not tool.exists():
        pytest.skip(f"{tool} not present (it lives in ../shared beside the repository)")
    result = subprocess.run([sys.executable, str(tool), str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
