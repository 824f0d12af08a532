"""r1kit's models: the DeepSeek-V3-style MoE/MLA/MTP model and its presets."""

from grpo.models.configs import PRESETS, qwen2_student
from grpo.models.deepseek import DeepseekConfig, DeepseekForCausalLM, MLACache

__all__ = ["DeepseekConfig", "DeepseekForCausalLM", "MLACache", "PRESETS", "qwen2_student"]
