"""AOT table: every Triton kernel case compiled for sm_80 / sm_90 / sm_100 on this CPU-only machine (no GPU).

For each kernel × launch config × dtype (and each feature constexpr's other values: the cases
:mod:`p2o_lightning.kernels.aot` makes of each space of :mod:`p2o_lightning.kernels.catalog`), the cubin's registers
per thread, spill instructions, stack, shared memory per block and the tensor-core instruction its matmuls became,
with the ``ptxas`` Triton ships. These are compiler outputs, not GPU measurements: nothing here ran on a GPU.

    python benchmarks/aot_kernels.py             # ~7 min cold on one core; seconds with Triton's cache warm

Writes ``benchmarks/results/aot_kernels.csv`` (one row per case and arch, with versions, commit, date) and
``aot_kernels.md`` (a summary per kernel); the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # AOT needs the compiled kernels, not the interpreter

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, versions, write_csv  # noqa: E402

from p2o_lightning.kernels import aot, catalog  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = [
    "date", "commit", "device", "torch", "triton_version", "ptxas", "ptxas_blackwell", "kernel", "arch", "dtype",
    "config", "features", "registers", "stack_bytes", "local_bytes", "shared_bytes",
    "shared_limit", "num_warps", "tensor_op", "compile_s", "error",
]  # fmt: skip


def summary_table(rows: list[dict]) -> str:
    """Markdown: per kernel and arch, the cases, the register and shared-memory range, spills, tensor-core op."""
    lines = [
        "| kernel | arch | cases | registers / thread | shared memory / block | cases that spill | matmul (16-bit) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        for arch in aot.ARCHS:
            sel = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch and not r["error"]]
            if not sel:
                continue
            regs = sorted(r["registers"] for r in sel)
            shared = sorted(r["shared_bytes"] for r in sel)
            spills = sum(1 for r in sel if r["stack_bytes"] or r["local_bytes"])
            ops = sorted({r["tensor_op"] for r in sel if r["dtype"] in ("bf16", "fp16")}) or ["–"]
            limit = aot.ARCHS[arch][1]
            lines.append(
                f"| {kernel} | sm_{arch} | {len(sel)} | {regs[0]}–{regs[-1]} | {shared[0] / 1024:.1f}–"
                f"{shared[-1] / 1024:.1f} KiB (limit {limit / 1024:.0f}) | {spills} | {', '.join(ops)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", type=int, default=list(aot.ARCHS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    env = dict(environment(torch.device("cpu")), **versions())
    ptxas = aot.ptxas_versions()
    env.update(ptxas=ptxas.get("ptxas", "-"), ptxas_blackwell=ptxas.get("ptxas-blackwell", "-"))
    env["device"] = f"none: AOT on {env['device']}"
    rows = aot.compile_all(catalog.spaces(), tuple(args.archs), log=lambda msg: print(msg, flush=True))
    out_rows = []
    for r in rows:
        row = dict(env, **r, shared_limit=aot.ARCHS[r["arch"]][1])
        row.update(config=json.dumps(r["config"]), features=json.dumps(r["features"]))
        out_rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = args.out / "aot_kernels.csv", args.out / "aot_kernels.md"
    if csv_path.exists():
        csv_path.unlink()  # one run's table: the cases change with the kernels
    write_csv(out_rows, csv_path, COLUMNS)
    table = summary_table(rows)
    head = (
        f"AOT compile of every kernel case, {env['date']}, commit {env['commit']}, triton {env['triton_version']}, "
        f"ptxas {env['ptxas']} (sm_100: ptxas-blackwell {env['ptxas_blackwell']}); compiler output, no GPU.\n\n"
    )
    md_path.write_text(head + table + "\n")
    print("\n" + table)
    errors = [r for r in rows if r["error"]]
    print(json.dumps({"bench": "aot_kernels", **{k: env[k] for k in ("date", "commit", "triton_version", "ptxas")},
                      "rows": len(rows), "errors": len(errors), "csv": str(csv_path), "md": str(md_path)}))  # fmt: skip


if __name__ == "__main__":
    main()
