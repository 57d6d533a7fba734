"""Shared fixtures: tiny random-weight models built once per session (see tiny_models.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache = {}

    def get(arch="llama", **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = make_model_dir(path, arch, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory):
    """A tiny random Llama (GQA, llama3 rope scaling) with a BPE tokenizer and a chat template."""
    return tiny_model_factory("llama")
