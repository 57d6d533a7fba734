"""Shared fixtures: tiny random-weight models built once per session (see tiny_models.py)."""
import os
import sys

import pytest

# Triton picks its interpreter when a kernel is decorated: switch it on before anything imports
# batchllm.kernels.attention/cache on a machine without CUDA (the kernel tests run on the CPU that way).
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

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
