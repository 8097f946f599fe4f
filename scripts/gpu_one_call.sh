#!/usr/bin/env bash
# The whole GPU check in one device call: install the carried wheels, run benchmarks/gpu_check.py --all, bundle.
#
#   bash scripts/gpu_one_call.sh COMMIT [BUDGET_S]      # on the GPU machine, from the repository root
#
# Needs .whl/ (scripts/fetch_gpu_wheels.sh, run beforehand where there is network) carried along, and $OUT, the
# folder whose files come back (at most 8 files: console.log, gpu_check.md, gpu_check.csv, the tuned file
# <device kind>.json and gpu_check_<device kind>.tar.gz of everything). COMMIT is the commit that runs (the
# machine's copy of the repository may carry no reliable git history); BUDGET_S the check's budget in seconds
# (default 520: with the install and the bundle, inside a 600 s command). Dry run of the same steps on a CPU:
#   python benchmarks/gpu_check.py --dry-run
set -uo pipefail
cd "$(dirname "$0")/.."
COMMIT="${1:?usage: scripts/gpu_one_call.sh COMMIT [BUDGET_S]}"
BUDGET="${2:-520}"
OUT="${OUT:?OUT must name the folder whose files come back}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_one_call: installing .whl/ failed (carry .whl, fetched by scripts/fetch_gpu_wheels.sh)"; exit 3; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/console.log"
python3 benchmarks/gpu_check.py --all --budget "$BUDGET" --commit "$COMMIT" --out /tmp/gpu_check --bundle "$OUT" \
    2>&1 | tee -a "$OUT/console.log"
