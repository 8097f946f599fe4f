"""Every kernel's launch space, gathered: what the AOT test and ``benchmarks/aot_kernels.py`` compile.

Each kernel module declares the :class:`.aot.KernelSpace` of its ``@triton.jit`` entry points next to them
(``SPACES``); this module only collects them, so that :mod:`.aot` (the compiler driver) imports no kernel and the
launcher → performance model → AOT resources chain (:mod:`.logprob` → :mod:`.tuning` → :mod:`.aot`) has no way back.

``python -m p2o_lightning.kernels.catalog --out FILE`` compiles every case for every architecture, one JSON line per
(case, arch); ``--first-cases`` only one case a dtype (:func:`.aot.first_cases`). ``tests/test_kernels_aot.py`` runs
it in a subprocess (the kernels must be loaded compiled, not interpreted): the first cases by default, the sweep
under the ``aot_sweep`` marker.
"""

from __future__ import annotations

from . import (
    _guard,  # noqa: F401  (refuses the top-level name `kernels`)
    advantage,
    aot,
    fused_head,
    logprob,
    loss,
)

__all__ = ["spaces"]


def spaces() -> tuple[aot.KernelSpace, ...]:
    """The launch space of every ``@triton.jit`` kernel of the package (entry points, not ``@jit`` helpers)."""
    return (*logprob.SPACES, *loss.SPACES, *advantage.SPACES, *fused_head.SPACES)


def main() -> None:
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(
        description="AOT-compile every kernel case; one JSON line per (case, arch)", allow_abbrev=False
    )
    parser.add_argument("--archs", nargs="+", type=int, default=list(aot.ARCHS))
    parser.add_argument("--first-cases", action="store_true", help="one case a dtype (the first config), not all")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = aot.compile_all(spaces(), tuple(args.archs), pick=aot.first_cases if args.first_cases else aot.cases)
    args.out.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))


if __name__ == "__main__":
    main()
