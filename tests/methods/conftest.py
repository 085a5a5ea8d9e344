"""Fixtures for the method tests."""

from __future__ import annotations

import pytest

from ._helpers import SENTENCES


@pytest.fixture(scope="session")
def batch(tiny_bert):
    """Three sentences of different lengths, padded: the attention mask matters."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)(SENTENCES, padding=True, return_tensors="pt")
