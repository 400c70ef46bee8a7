"""Backend selection: one exclusive auto chain, no silent fallback."""

from __future__ import annotations

import pytest

from glmport.backend import BackendRegistry, select_backend
from glmport.errors import BackendUnavailable
from glmport.plugins import PluginManager


def registry() -> BackendRegistry:
    return PluginManager(autoload=False).backends


def test_auto_takes_the_first_available_and_says_what_it_skipped(monkeypatch):
    monkeypatch.delenv("GLMPORT_EMULATE", raising=False)
    monkeypatch.delenv("GLMPORT_BACKEND", raising=False)
    selection = select_backend(registry(), "auto")
    assert selection.backend.name == "cpu"
    assert "mlu > cuda > cpu" in selection.how and "mlu: torch_mlu is not installed" in selection.how


def test_auto_prefers_mlu_when_emulated(glmport_emulate, monkeypatch):
    monkeypatch.delenv("GLMPORT_BACKEND", raising=False)
    glmport_emulate("mlu")
    assert select_backend(registry(), None).backend.name == "mlu"


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv("GLMPORT_EMULATE", raising=False)
    with pytest.raises(BackendUnavailable, match=r"--backend mlu: .*torch_mlu is not installed[\s\S]*GLMPORT_EMULATE=mlu"):
        select_backend(registry(), "mlu")


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(BackendUnavailable, match="no such backend. Known backends: mlu, cuda, cpu"):
        select_backend(registry(), "npu")


def test_environment_variable_chooses_when_the_flag_is_auto(monkeypatch):
    monkeypatch.setenv("GLMPORT_BACKEND", "cuda")
    monkeypatch.delenv("GLMPORT_EMULATE", raising=False)
    with pytest.raises(BackendUnavailable, match="^GLMPORT_BACKEND cuda"):
        select_backend(registry(), "auto")
