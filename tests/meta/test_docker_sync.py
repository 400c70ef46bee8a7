"""The MLU image installs glmport's dependencies by hand (to keep the vendor's torch): the same pins."""

from __future__ import annotations

import re
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def _pins(specs) -> set[tuple[str, str]]:
    return {(req.name, str(req.specifier)) for req in map(Requirement, specs)}


def test_mlu_image_installs_what_glmport_requires_but_torch():
    """Core dependencies plus the ``[all]`` extras (metrics, plot), as the installed metadata states them."""
    wanted = set()
    for spec in requires("glmport"):
        req = Requirement(spec)
        marker = str(req.marker) if req.marker else ""
        if req.name == "glmport":
            assert marker != 'extra == "all"' or req.extras == {"metrics", "plot"}, \
                "the [all] extra changed: update the MLU image and this test"
        elif not marker and req.name != "torch" or marker in ('extra == "metrics"', 'extra == "plot"'):
            wanted.add((req.name, str(req.specifier)))

    dockerfile = (REPO / "docker" / "mlu" / "Dockerfile").read_text(encoding="utf-8")
    run = dockerfile.split("pip install --no-deps .", 1)[1].split("\nENTRYPOINT", 1)[0]
    assert _pins(re.findall(r'"([^"]+)"', run)) == wanted
