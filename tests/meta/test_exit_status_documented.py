"""The exit statuses: one table in the code (glmport.errors.EXIT_CODES), the same table in the README, and
every error class exiting with a status the table lists."""

from __future__ import annotations

import re
from pathlib import Path

from glmport import errors

REPO = Path(__file__).resolve().parents[2]


def readme_exit_table() -> dict[int, str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Resume and failures\n", 1)[1].split("\n## ", 1)[0]
    assert "**Exit status.**" in section, "the README's Resume and failures section lost its Exit status paragraph"
    after = section.split("**Exit status.**", 1)[1]
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", after, re.M)
    return {int(code): meaning for code, meaning in rows}


def test_readme_table_is_the_code_table():
    assert readme_exit_table() == errors.EXIT_CODES


def _error_classes(base=errors.GlmportError):
    for cls in base.__subclasses__():
        yield cls
        yield from _error_classes(cls)


def test_every_error_class_exits_with_a_listed_status():
    for cls in [errors.GlmportError, *_error_classes()]:
        assert cls.exit_code in errors.EXIT_CODES and cls.exit_code not in (0, 1), cls


def test_the_classes_that_carry_their_own_status():
    assert errors.GlmportError.exit_code == 2
    assert errors.BackendUnavailable.exit_code == 3
    assert errors.SixtyFourBitError.exit_code == 4
    assert errors.TrainingDiverged.exit_code == 5
    assert errors.Interrupted.exit_code == 130
