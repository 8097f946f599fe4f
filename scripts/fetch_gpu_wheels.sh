#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.py needs on a GPU machine that has no network, into .whl/ (git-ignored).
#
#   scripts/fetch_gpu_wheels.sh [DIR]     # default: .whl at the repo root
#
# The GPU image this project is lent (CPython 3.12, PyTorch, Triton, transformers, Lightning, torchmetrics, numpy,
# pandas, pyarrow, ... already there) lacks our pure-Python dependencies and the two baselines of the log-prob
# benchmark. This fetches exactly those, each at the version of constraints.txt where the lock has it, as
# CPython 3.12 manylinux x86-64 wheels without their dependencies (the list below is the closure that image lacks).
# There scripts/gpu_one_call.sh installs them (the whole check in one device call), as
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
LOCKED=(annotated-types antlr4-python3-runtime datasets dill docstring-parser gepa jsonargparse latex2sympy2-extended
        math-verify multiprocess pydantic pydantic-core typeshed-client typing-inspection)
BASELINES=("liger-kernel==${LIGER_VERSION:-0.8.5}" "cut-cross-entropy==${CCE_VERSION:-25.1.1}")

specs=()
for name in "${LOCKED[@]}"; do
    pin="$(grep -i "^${name}==" constraints.txt || true)"
    [ -n "$pin" ] || { echo "fetch_gpu_wheels: $name is not in constraints.txt (run scripts/lock.sh?)" >&2; exit 1; }
    specs+=("$pin")
done
mkdir -p "$DIR"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$DIR" "${specs[@]}" "${BASELINES[@]}"
ls "$DIR" | sed 's/^/  /'
du -sh "$DIR"
