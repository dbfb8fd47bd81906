"""Fixtures of the decoding tests: the tiny random Llama and its character tokenizer (tests/decoding_tiny.py). A test
file that needs another model (a shorter window, another seed) defines its own ``model``, which wins over this one."""

import pytest

from decoding_tiny import TinyTokenizer, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def tok():
    return TinyTokenizer()
