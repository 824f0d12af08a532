"""Kernels, each beside its plain-torch reference: routed MoE experts, fused linear log-prob, RMSNorm.
Each public function dispatches to Triton on CUDA tensors and to a torch path elsewhere."""

from grpo.kernels.logprob import fused_logprob
from grpo.kernels.moe import moe_ffn
from grpo.kernels.rmsnorm import rms_norm

__all__ = ["fused_logprob", "moe_ffn", "rms_norm"]
