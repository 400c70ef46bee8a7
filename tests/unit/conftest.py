"""Tiny tokenizers with each generation's special tokens at their real ids, built once per test session."""

from __future__ import annotations

import pytest

from glmport.tiny.tokenizer import CHATGLM2, CHATGLM3, GLM4, build_fast_tokenizer


@pytest.fixture(scope="session")
def tok3():
    return build_fast_tokenizer(CHATGLM3)


@pytest.fixture(scope="session")
def tok4():
    return build_fast_tokenizer(GLM4)


@pytest.fixture(scope="session")
def tok2():
    return build_fast_tokenizer(CHATGLM2)
