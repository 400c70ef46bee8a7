"""Fixtures for end-to-end tests: tiny models built once through the CLI, a small synthetic data set."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_cli import ok, run_glmport

from glmport.tiny.synthetic import make_records, write_jsonl


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "train.jsonl", make_records(32, seed=1))
    write_jsonl(folder / "dev.jsonl", make_records(8, seed=2))
    return folder


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny model folders built through the CLI, once per session."""
    built = {}
    for name, args in {"native": ["tiny-native"], "remote": ["tiny-remote"],
                       "remote-glm4": ["tiny-remote", "--family", "glm4"]}.items():
        target = tmp_path_factory.mktemp("models") / name
        ok(run_glmport("init-model", *args, target))
        built[name] = target
    return built
