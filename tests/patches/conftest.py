"""Fixtures for the patch-set tests: tiny model folders (built once per session), process hygiene.

Every test here runs with the TorchScript flags restored afterwards (importing remote code flips them
process-wide) and fails if it leaves a patch session active (later tests would be refused or would see
patched classes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from patchkit import (
    Source,
    build_fixture_folder,
    build_upstream_folder,
    capture_state,
    patched_modules,
    restore_state,
    shape,
)


@pytest.fixture(autouse=True)
def _process_hygiene():
    saved = capture_state()
    yield
    restore_state(saved)
    leaked = patched_modules()
    for _, session in leaked:
        session.undo()
    restore_state(saved)
    if leaked:
        pytest.fail(f"test left patch sessions active on: {', '.join(name for name, _ in leaked)}")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """``model_dir(source)``: the tiny model folder of a :class:`patchkit.Source`, built once."""
    built: dict[str, Path] = {}

    def get(source: Source) -> Path:
        if source.kind == "broken":
            pytest.fail(source.problem)
        key = f"{source.kind}:{source.name}"
        if key not in built:
            target = tmp_path_factory.mktemp("models") / source.name
            builder = build_fixture_folder if source.kind == "fixture" else build_upstream_folder
            built[key] = builder(source, target)
        return built[key]

    return get


@pytest.fixture(scope="session")
def native_dir(tmp_path_factory):
    """``native_dir(family)``: a tiny-native (transformers GlmForCausalLM) folder, built once."""
    built: dict[str, Path] = {}

    def get(family: str = "chatglm3") -> Path:
        if family not in built:
            from glmport.tiny import build_tiny_model

            target = tmp_path_factory.mktemp("native") / f"native-{family}"
            built[family] = build_tiny_model("tiny-native", target, family=family, seq_length=shape().seq_length)
        return built[family]

    return get
