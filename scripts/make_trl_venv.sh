#!/usr/bin/env bash
# Build `.venv-trl`: this project + TRL 1.16 (`GRPOTrainer`), for `benchmarks/bench_vs_trl.py --trl-python
# .venv-trl/bin/python`, installed through the repo's lock (constraints.txt), so both sides of the benchmark run the
# same torch and transformers.
#
#   scripts/make_trl_venv.sh [VENV_DIR]        # default: .venv-trl at the repo root
#
# The lock's pins are constraints, so pip fails rather than move a locked package; TRL's dependencies that the lock
# does not hold (accelerate) resolve freely under them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-trl}"
TRL_VERSION="${TRL_VERSION:-1.16.0}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e . "trl==${TRL_VERSION}"
"$VENV/bin/pip" check
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
print(", ".join(f"{d} {m.version(d)}" for d in ("trl", "torch", "transformers", "accelerate", "datasets")))
PY
