"""MLA decode: KV-cache bytes per token and decode-step time, absorbed path vs expanded path, one run.

Model: DeepSeek-V3's per-head attention shape (kv_lora_rank 512, qk_rope 64, qk_nope 128, v 128, q_lora 1536)
with 16 heads, hidden 2048, 4 dense layers (no MoE, so the step time is attention-bound), fp32 on CPU.
The cache holds `--context` past tokens per sequence (random latents: decode cost does not depend on values).
- absorbed: caches the normalised latent + rope key, (C + r) per layer; kv_b is folded into q and the output.
- expanded: needs per-head K and V, H*(n + r + v) per layer, for every past token at every step; r1kit (like
  transformers 5.19) keeps the latent cache and re-expands it with kv_b each step, which is what is timed here.
Usage: python bench/mla.py [--context 2048] [--batch 4] [--steps 8] [--threads 2]
"""

import argparse
import time

import torch

from grpo.models import DeepseekConfig, DeepseekForCausalLM, MLACache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DeepseekConfig(vocab_size=1024, hidden_size=2048, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, first_k_dense_replace=4,
                         kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
                         v_head_dim=128, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2)
    model = DeepseekForCausalLM(cfg).eval()
    L, H, C, r, n, v = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                        cfg.qk_nope_head_dim, cfg.v_head_dim)
    B, T = args.batch, args.context
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(B, T, C, generator=g) for _ in range(L)]
    keys = [torch.randn(B, T, r, generator=g) for _ in range(L)]
    bytes_absorbed = L * (C + r) * 4
    bytes_expanded = L * H * (n + r + v) * 4
    print(f"config: {L} layers, {H} heads, C={C}, r={r}, n={n}, v={v}; batch {B}, context {T}, fp32, "
          f"{args.threads} threads")
    print(f"KV-cache bytes per token: absorbed {bytes_absorbed:,} (latent {C} + rope key {r}, x{L} layers), "
          f"expanded {bytes_expanded:,} (per-head K {n + r} + V {v}, x{H} heads, x{L} layers): "
          f"{bytes_expanded / bytes_absorbed:.1f}x")
    times = {}
    for mode in ("expanded", "absorbed"):
        model.set_mla_mode(mode)
        per_step = []
        with torch.no_grad():
            for step in range(args.steps + 1):  # first step is warm-up
                cache = MLACache(capacity=T + 1)  # room for the timed step: no buffer growth inside it
                for layer, (lat, key) in enumerate(zip(latents, keys)):
                    cache.update(layer, lat, key)
                tok = torch.randint(0, cfg.vocab_size, (B, 1), generator=g)
                pos = torch.full((B, 1), T)
                t0 = time.perf_counter()
                model(tok, position_ids=pos, past_key_values=cache, use_cache=True)
                if step:
                    per_step.append(time.perf_counter() - t0)
        per_step.sort()
        times[mode] = per_step[len(per_step) // 2]
        print(f"decode step ({mode}): median {times[mode] * 1e3:.1f} ms over {args.steps} steps")
    print(f"ratio expanded/absorbed decode step time: {times['expanded'] / times['absorbed']:.2f}x")


if __name__ == "__main__":
    main()
