"""Fixtures for end-to-end tests: tiny models built through the CLI when first used, a small synthetic data set."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmport.testing import ok, run_cli
from glmport.tiny.synthetic import make_records, write_jsonl

MODEL_ARGS = {"native": ["tiny-native"], "remote": ["tiny-remote"], "remote-glm4": ["tiny-remote", "--family", "glm4"],
              "remote-chatglm2": ["tiny-remote", "--family", "chatglm2"],
              "remote-chatglm": ["tiny-remote", "--family", "chatglm"],
              "native-glm4": ["tiny-native", "--arch", "glm4"]}


@pytest.fixture(autouse=True)
def _no_emulation_from_outside(monkeypatch):
    """Runs emulate a device only where a test asks for it, whatever the developer's shell exports."""
    monkeypatch.delenv("GLMPORT_EMULATE", raising=False)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "train.jsonl", make_records(32, seed=1))
    write_jsonl(folder / "dev.jsonl", make_records(8, seed=2))
    return folder


class _TinyModels(dict):
    """``models["native" | "remote" | "remote-glm4" | ...]`` (:data:`MODEL_ARGS`): the folder, built by
    ``glmport init-model`` on first use."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        target = self.root / name
        ok(run_cli("init-model", *MODEL_ARGS[name], target))
        self[name] = target
        return target


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    return _TinyModels(tmp_path_factory.mktemp("models"))
