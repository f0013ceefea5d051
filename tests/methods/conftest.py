"""Fixtures over the tiny models and tokenizer of tests/tiny.py."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from tests.tiny import MODEL_TYPES, make_model, make_tokenizer


@pytest.fixture(scope="session")
def tiny_tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session", params=MODEL_TYPES)
def tiny_model(request, tiny_tok):
    return make_model(request.param, len(tiny_tok))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tok):
    return make_model("gpt2", len(tiny_tok))


@pytest.fixture(scope="session")
def tiny_llama(tiny_tok):
    return make_model("llama", len(tiny_tok))
