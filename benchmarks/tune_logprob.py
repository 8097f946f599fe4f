"""Measured tuning of the log-prob kernels on the device at hand: every launch config, and the backward's buffer bound.

``triton.autotune`` in :mod:`p2o_lightning.kernels.logprob` times only the configs a cost model ranks first, and
that model was never fitted on a GPU. This script times **every** config of
:func:`~p2o_lightning.kernels.logprob.tuning_space` (the launch spaces plus larger tiles, cut-cross-entropy's
256 × 128 × 32 on 8 warps and 3 stages among them) at each shape, forward with and without the entropy and the ∂L/∂z
kernel of the backward, checks each one's outputs against a float32 torch reference (a config that is wrong is
reported and never recorded), then times the whole backward at each buffer bound of ``BUDGET_CANDIDATES`` with the
winning config. The winners go to ``kernels/tuned/<device kind>.json`` (:mod:`p2o_lightning.kernels.tuned_configs`),
which the launchers read first: the next run on that device starts from them.

    python benchmarks/tune_logprob.py                               # CUDA: N ∈ {4096, 16384}, H 4096, V 151,936
    python benchmarks/tune_logprob.py --shapes 2048x4096x151936 --no-write
    TRITON_INTERPRET=1 python benchmarks/tune_logprob.py --dry-run  # CPU: the same code at 48×64×1000, ~1 min

Inputs: bf16 hidden states and head whose logits have a real LM's spread (``bench_logprob.make_inputs``,
"realistic"). Times: the median of ``--reps`` calls after one untimed call (the compile), CUDA events. Writes
``<out>/tune_logprob_<device kind>.csv`` (every config: status, ms, error against the reference) and the tuned file
(``--tuned-dir``, default the package's ``kernels/tuned``; ``--no-write``: none). ``--dry-run`` runs it all on the
CPU in the interpreter at a tiny shape, writes the tuned file under ``--out`` and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_logprob import make_inputs, parse_shape  # noqa: E402
from common import environment, versions, write_csv  # noqa: E402

from p2o_lightning.kernels import logprob, tuned_configs  # noqa: E402

GPU_SHAPES = [(4096, 4096, 151936), (16384, 4096, 151936)]
DRY_SHAPES = [(48, 64, 1000)]
# max |Δ| against the float32 reference: lse and z_target (logits up to ~25) in absolute terms; the gradients as a
# share of the largest |reference| entry (∂L/∂z is stored in bf16 before its matmuls)
FORWARD_ATOL, GRAD_RTOL = 2e-2, 2e-2
COLUMNS = ["date", "device", "device_kind", "torch", "triton_version", "commit", "kernel", "dtype", "N", "H", "V",
           "entropy", "config", "logits_budget", "status", "ms", "error"]  # fmt: skip


def timer(device: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    """fn → the median ms of ``reps`` calls after one untimed call (CUDA events on a GPU, wall clock on a CPU)."""

    def time_it(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return time_it


def reference(hidden, weight, targets, grad_logp, rows: int = 2048) -> dict:
    """float32 lse, z_target, Σ p·z and the gradients of Σ grad_logp · logp w.r.t. hidden and weight, by row chunks."""
    w = weight.float()
    out = {k: [] for k in ("lse", "z_target", "sum_pz", "grad_hidden")}
    grad_weight = torch.zeros_like(w)
    for r in range(0, hidden.shape[0], rows):
        h, t, g = hidden[r : r + rows].float(), targets[r : r + rows], grad_logp[r : r + rows]
        z = h @ w.T  # (R, V)
        lse = z.logsumexp(-1)
        p = (z - lse[:, None]).exp_()
        out["lse"].append(lse)
        out["z_target"].append(z.gather(1, t[:, None])[:, 0])
        out["sum_pz"].append((p * z).sum(-1))
        dz = p.mul_(-g[:, None])  # ∂(g·logp)/∂z = g (onehot − p)
        dz[torch.arange(len(t)), t] += g
        out["grad_hidden"].append(dz @ w)
        grad_weight.addmm_(dz.T, h)
        del z, p, dz
    return {k: torch.cat(v) for k, v in out.items()} | {"grad_weight": grad_weight}


def max_error(got, want, relative: bool = False) -> float:
    err = (got.float() - want).abs().max().item()
    return err / max(want.abs().max().item(), 1e-30) if relative else err


def tune_shape(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, time_it, log) -> list[dict]:
    """One row per (kernel, entropy, config) and per budget at this shape: status, ms, error."""
    hidden, weight, targets = make_inputs(n, h, v, dtype, device, "realistic")
    grad_logp = torch.randn(n, device=device, generator=torch.Generator(device).manual_seed(2))
    ref = reference(hidden, weight, targets, grad_logp)
    rows = []

    def record(kernel, entropy, config, fn, check, budget=None) -> None:
        row = dict(kernel=kernel, N=n, H=h, V=v, entropy=entropy, config=json.dumps(config), logits_budget=budget)
        try:
            error = check(fn())
            ok = error <= (FORWARD_ATOL if kernel == "forward" else GRAD_RTOL)
            row.update(error=error, status="ok" if ok else "wrong", ms=time_it(fn) if ok else None)
        except Exception as err:  # a config that does not compile or launch (shared memory, registers) is a row
            row.update(status=f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:160]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        log(f"{kernel:>8} N={n} entropy={entropy!s:5} {config} budget={budget}: {row['status']} "
            f"{row.get('ms') or '':.6} ms, error {row.get('error', float('nan')):.2e}")  # fmt: skip

    for entropy in (False, True):

        def check_forward(out, entropy=entropy) -> float:
            lse, z_target, sum_pz = (x[0] if x is not None else None for x in out)
            errs = [max_error(lse, ref["lse"]), max_error(z_target, ref["z_target"])]
            return max(errs + ([max_error(sum_pz, ref["sum_pz"])] if entropy else []))

        for config in logprob.tuning_space("forward", dtype):
            fn = lambda c=config, e=entropy: logprob.linear_logprob_forward(hidden[None], weight, targets, 1.0, e, c)  # noqa: E731
            record("forward", entropy, config, fn, check_forward)

    lse = ref["lse"]

    def backward(config, budget) -> Callable[[], tuple]:
        return lambda: logprob.linear_logprob_backward(
            hidden, weight, targets, lse, None, grad_logp, None, 1.0, budget, True, True, config
        )  # fmt: skip

    def check_backward(out) -> float:
        return max(max_error(out[0], ref["grad_hidden"], True), max_error(out[1], ref["grad_weight"], True))

    for config in logprob.tuning_space("backward", dtype):
        record("backward", False, config, backward(config, logprob.LOGITS_BUDGET), check_backward)
    best = winner(rows, "backward", False)
    if best is not None:
        for budget in logprob.BUDGET_CANDIDATES:
            record("budget", False, best, backward(best, budget), check_backward, budget)
    return rows


def winner(rows: list[dict], kernel: str, entropy: bool) -> dict | None:
    ok = [r for r in rows if r["kernel"] == kernel and r["entropy"] == entropy and r["status"] == "ok"]
    return json.loads(min(ok, key=lambda r: r["ms"])["config"]) if ok else None


def tuned_entries(rows: list[dict], dtype_name: str) -> tuple[list[dict], list[dict], dict]:
    """The tuned file's forward / backward entries (the fastest correct config per shape and entropy flag) and its
    budget (the one with the least time summed over the shapes, each measured with that shape's backward winner).
    """
    shapes = sorted({(r["N"], r["H"], r["V"]) for r in rows})
    forward, backward, budget_ms = [], [], {}
    for n, h, v in shapes:
        at = [r for r in rows if (r["N"], r["H"], r["V"]) == (n, h, v)]
        for kernel, out, flags in (("forward", forward, (False, True)), ("backward", backward, (False,))):
            for entropy in flags:
                ok = [r for r in at if r["kernel"] == kernel and r["entropy"] == entropy and r["status"] == "ok"]
                if ok:
                    best = min(ok, key=lambda r: r["ms"])
                    tried = len([r for r in at if r["kernel"] == kernel and r["entropy"] == entropy])
                    out.append(
                        dict(
                            dtype=dtype_name,
                            N=n,
                            H=h,
                            V=v,
                            entropy=entropy,
                            config=json.loads(best["config"]),
                            ms=round(best["ms"], 4),
                            tried=tried,
                        )
                    )
        for r in at:
            if r["kernel"] == "budget" and r["status"] == "ok":
                budget_ms.setdefault(r["logits_budget"], []).append(r["ms"])
    complete = {b: sum(ms) for b, ms in budget_ms.items() if len(ms) == len(shapes)}
    budgets = {dtype_name: min(complete, key=complete.get)} if complete else {}
    return forward, backward, budgets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="NxHxV (default: the GPU grid)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per config (the median is kept)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--tuned-dir", type=Path, default=None, help="default: kernels/tuned (dry run: <out>/tuned)")
    parser.add_argument("--no-write", action="store_true", help="write no tuned file")
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shape; measures nothing")
    args = parser.parse_args()

    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run runs the kernels in the interpreter: set TRITON_INTERPRET=1")
        device, shapes, reps = torch.device("cpu"), args.shapes or DRY_SHAPES, 1
        tuned_dir = args.tuned_dir or args.out / "tuned"
    else:
        if not torch.cuda.is_available():
            sys.exit("tune_logprob: no CUDA device; the tuning measures a GPU (a CPU: --dry-run, TRITON_INTERPRET=1)")
        device, shapes, reps = torch.device("cuda"), args.shapes or GPU_SHAPES, args.reps
        tuned_dir = args.tuned_dir or tuned_configs.tuned_dir()
    dtype = torch.bfloat16
    env = dict(environment(device), **versions())
    kind = env["device_kind"] if device.type == "cuda" else "cpu-dry-run"
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    meta = {"device": env["device"], "device_kind": kind, "capability": "sm_{}{}".format(*capability),
            "date": env["date"], "commit": env["commit"],
            "versions": {"torch": env["torch"], "triton": env["triton_version"]},
            "measured": f"median of {reps} calls after one, CUDA events; inputs: realistic logits"
            if device.type == "cuda" else "dry run: CPU, the interpreter; not a measurement"}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"tune_logprob_{kind}.csv"
    start = time.perf_counter()
    rows, summary = [], {}
    for n, h, v in shapes:  # the CSV and the tuned file after each shape: a run stopped early keeps what it measured
        new = tune_shape(n, h, v, dtype, device, timer(device, reps), lambda line: print(line, flush=True))
        write_csv([dict(env, dtype="bf16", **r) for r in new], csv_path, COLUMNS)
        rows += new
        forward, backward, budgets = tuned_entries(rows, "bf16")
        summary = {"forward": forward, "backward": backward, "logits_budget": budgets}
        if not args.no_write and (forward or backward):
            path = tuned_configs.write(tuned_dir / f"{kind}.json", meta, forward, backward, budgets)
            summary["tuned_file"] = str(path)
    wrong = [r for r in rows if r["status"] == "wrong"]
    print(json.dumps({"bench": "tune_logprob", "device": env["device"], "rows": len(rows), "wrong": wrong,
                      "seconds": round(time.perf_counter() - start, 1), "csv": str(csv_path), **summary}))  # fmt: skip
    sys.exit(1 if wrong or not (summary.get("forward") and summary.get("backward")) else 0)


if __name__ == "__main__":
    main()
