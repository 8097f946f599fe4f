#!/usr/bin/env bash
# Build `.venv-trl`: this project + TRL 1.16 (`GRPOTrainer`), for `benchmarks/bench_vs_trl.py --trl-python
# .venv-trl/bin/python`, installed through the repo's lock (constraints.txt), so both sides of the benchmark run the
# same torch and transformers.
#
#   scripts/make_trl_venv.sh [VENV_DIR]                         # default: .venv-trl at the repo root
#   TRL_BASE_VENV=.venv scripts/make_trl_venv.sh                # on top of the project's venv (see below)
#   TRL_BASE_VENV=.venv TRL_VERSION=1.13.0 PIP_NO_INDEX=1 scripts/make_trl_venv.sh   # offline, from local wheels
#
# The lock's pins are constraints, so pip fails rather than move a locked package; TRL's dependencies that the lock
# does not hold (accelerate) resolve freely under them. With TRL_BASE_VENV the new venv reads the base venv's
# site-packages (a .pth line: torch, transformers and this project are then the very same install on both sides)
# and pip adds only what TRL needs beyond them; with PIP_NO_INDEX=1 pip reads only its find-links (PIP_FIND_LINKS /
# pip.conf), nothing is downloaded. requests is named because the GRPO trainer of some TRL versions (1.13) imports
# it without declaring it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-trl}"
TRL_VERSION="${TRL_VERSION:-1.16.0}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if [ -n "${TRL_BASE_VENV:-}" ]; then
    base_site=$("$TRL_BASE_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    venv_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # addsitedir, not a bare path: the base's own .pth files (this project's editable install) apply too
    echo "import site; site.addsitedir('$base_site')" > "$venv_site/_trl_base_venv.pth"
    "$VENV/bin/pip" uninstall -q -y setuptools  # the venv's own would shadow the base's locked one
    "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt "trl==${TRL_VERSION}" requests
else
    "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e . "trl==${TRL_VERSION}" requests
fi
"$VENV/bin/pip" check
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
print(", ".join(f"{d} {m.version(d)}" for d in ("trl", "torch", "transformers", "accelerate", "datasets")))
PY
