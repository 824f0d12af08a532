#!/usr/bin/env bash
# The GPU checks in one go, meant to take under 8 minutes on one H100/H200: the Triton kernels against their torch
# references, the MoE block (r1kit's Triton path vs transformers' grouped_mm), and one step of every stage of every
# GPU recipe on CUDA, R1-Zero's on a real-shaped Qwen2.5-Math-1.5B stand-in (random weights) with vLLM colocated
# and sleeping between rollout and update; its GRPO timings line shows the weight push (time/weight_sync and
# rollout/weight_sync_mb_s) at that size. Needs CUDA builds of torch, Triton and vLLM (./setup.sh installs the CPU
# ones).
#
#     bash bench/gpu_check.sh 2>&1 | tee gpu_check.log      # then put its numbers in docs/benchmarks.md
#
# Not yet run on a GPU: no GPU has been lent to this project so far (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export TRITON_INTERPRET=0  # tests/conftest.py would otherwise run Triton in its CPU interpreter
GIB=$("$PY" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("bench/gpu_check.sh: needs a CUDA GPU (torch sees none)")
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}", file=sys.stderr)
print(f"{p.total_memory / 2**30:.0f}")
EOF
)
t0=$SECONDS
echo "== 1/3 Triton kernels against their torch references (CUDA)"
"$PY" -m pytest -q tests/test_kernels.py -k cuda -p no:cacheprovider
echo "== 2/3 MoE block: r1kit Triton vs transformers grouped_mm, fp32 and bf16 ($((SECONDS - t0)) s so far)"
timeout 180 "$PY" bench/moe.py --tokens 16384
echo "== 3/3 one step of every stage of every GPU recipe on CUDA ($((SECONDS - t0)) s so far)"
timeout 300 "$PY" -m grpo.cli run recipes/gpu/r1-zero-qwen2.5-math-1.5b.yaml --dry-run --device cuda --full-size \
    --gpu-memory "$GIB"
for recipe in recipes/gpu/grpo-deepseek-v2-lite.yaml recipes/gpu/distill-r1-traces-qwen2.5-1.5b.yaml; do
  timeout 200 "$PY" -m grpo.cli run "$recipe" --dry-run --device cuda --gpu-memory "$GIB"  # tiny stand-ins
done
echo "gpu_check: all checks passed in $((SECONDS - t0)) s"
