"""The README's quick start and CI run the same test command."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def quickstart_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    assert "glmport train configs/quickstart.yaml" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_and_fails_on_no_tests():
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert quickstart_commands()[1] in script.splitlines()
    assert '"$status" -eq 5' in script


def test_the_test_extra_installs_what_the_pytest_options_need():
    """addopts runs the suite in parallel (`-n`): the quick start's `.[test]` must install pytest-xdist."""
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    addopts = re.search(r'^addopts = "(.*)"$', pyproject, re.M).group(1).split()
    test_extra = re.search(r"^test = \[(.*)\]$", pyproject, re.M).group(1)
    assert "-n" in addopts and '"pytest-xdist' in test_extra
