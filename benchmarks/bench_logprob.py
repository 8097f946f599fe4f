"""Benchmark: chunked ``linear_logprob`` against materialised logits — time, GFLOP/s and MEASURED peak memory.

The op behind every log-prob of the trainer (policy, frozen reference, P²O's context ratio mask) turns last hidden
states (N, H) and the LM head (V, H) into one log-prob per token. The naive path materialises the (N, V) logits::

    (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[:, None])   # writes N·V floats, twice

while :func:`p2o_lightning.ops.linear_logprob` walks the tokens ``chunk_size`` rows at a time and recomputes each
chunk's logits in backward, so only (chunk_size, V) floats live at once — at the price of one more N·H·V matmul.

Modes: ``fwd`` is a forward under ``torch.no_grad`` (old-policy and reference log-probs); ``fwd+bwd`` a forward
and backward to hidden and weight (the policy update). GFLOP/s are counted on the useful work, 2·N·H·V (fwd) and
6·N·H·V (fwd+bwd); the chunked backward's recompute is not credited. ``% mm`` compares with a plain matmul of the
same device (the ceiling). Peak memory is measured: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs;
on CPU every case runs in a fresh subprocess and reports the rise of ``ru_maxrss`` over the post-setup baseline.
``logits MB`` is the size of the (N, V) float32 logits, for comparison. Times on CPU are the minimum of the timed
runs (on a shared 2-core machine other processes only ever add time; the median is in the CSV), on CUDA the median
of ``triton.testing.do_bench``.

    python benchmarks/bench_logprob.py                      # default grid (~2–3 min on 2 CPU cores)
    python benchmarks/bench_logprob.py --grid full          # N up to 8192, H 1024, V 32768
    python benchmarks/bench_logprob.py --shapes 4096x1024x32768 --modes fwd+bwd

Writes (appends) ``benchmarks/results/bench_logprob_<device kind>.csv`` and draws this run's
``bench_logprob_<device kind>.png``; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from p2o_lightning.ops import linear_logprob  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRIDS = {  # (N, H, V)
    "default": [(1024, 512, 32768), (2048, 512, 32768), (4096, 512, 32768)],
    "full": [(n, 1024, 32768) for n in (1024, 2048, 4096, 8192)] + [(4096, 1024, 8192), (4096, 512, 32768)],
}
IMPLS = ("chunked", "materialised")
MODES = ("fwd", "fwd+bwd")
CEILING_SHAPE = (1024, 1024, 32768)  # the plain matmul whose GFLOP/s is the device's ceiling here


# ----------------------------------------------------------------------------------------------------------------
# setup shared by all modes
# ----------------------------------------------------------------------------------------------------------------


def materialised_logprob(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """The naive path: (N, V) logits in float32, log_softmax, gather."""
    return (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)


def chunked_logprob(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    return linear_logprob(hidden, weight, targets, chunk_size=chunk_size)[0]  # (N,)


def setup_logprob(
    n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, impl: str, mode: str, chunk_size: int
) -> Callable[[], object]:
    """Allocate the inputs (in place, no temporaries: the CPU baseline must be the high-water mark) → a step."""
    gen = torch.Generator(device).manual_seed(0)
    hidden = torch.empty(n, h, dtype=dtype, device=device).normal_(generator=gen)  # (N, H)
    weight = torch.empty(v, h, dtype=dtype, device=device).normal_(std=h**-0.5, generator=gen)  # (V, H)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)  # (N,)
    grad_out = torch.empty(n, device=device).normal_(generator=gen)  # (N,) upstream grad of the log-probs
    if impl == "chunked":

        def fn(hd: Tensor, w: Tensor) -> Tensor:
            return chunked_logprob(hd, w, targets, chunk_size)
    else:

        def fn(hd: Tensor, w: Tensor) -> Tensor:
            return materialised_logprob(hd, w, targets)

    if mode == "fwd":

        def step() -> object:
            with torch.no_grad():
                return fn(hidden, weight)
    else:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)

        def step() -> object:
            return torch.autograd.grad(fn(hidden, weight), (hidden, weight), grad_out)

    return step


def setup_matmul(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device) -> Callable[[], object]:
    a = torch.empty(n, h, dtype=dtype, device=device).normal_()
    b = torch.empty(v, h, dtype=dtype, device=device).normal_()
    return lambda: a @ b.T


# ----------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------


def _rss_mb() -> tuple[float, float]:
    """(high-water mark, current) resident set size of this process, MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return peak, current


def time_cpu(step: Callable[[], object], min_run_time: float, first_run_s: float, repeats: int) -> list[float]:
    """Times (ms) of ``step`` with torch.utils.benchmark on all of this process's threads.

    A step slower than ``min_run_time`` (judged by the untimed first run) is timed ``repeats`` times, one call each:
    a 2-core CPU cannot afford more within the default grid's ~3 minutes; quicker steps get ``blocked_autorange``.
    """
    from torch.utils.benchmark import Timer

    timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    if first_run_s >= min_run_time:
        return [timer.timeit(1).raw_times[0] * 1e3 for _ in range(repeats)]
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return [t / m.number_per_run * 1e3 for t in m.raw_times]


def run_case_cpu(case: dict) -> dict:
    """One case in this (fresh) process: peak RSS rise of one step over the post-setup baseline, then timing."""
    dtype = getattr(torch, case["dtype"])
    device = torch.device("cpu")
    for impl in IMPLS:  # load every kernel (oneDNN JIT, thread pool) before the baseline
        setup_logprob(16, 16, 64, dtype, device, impl, "fwd+bwd", 8)()
    if case["impl"] == "matmul":
        step = setup_matmul(case["N"], case["H"], case["V"], dtype, device)
    else:
        step = setup_logprob(
            case["N"], case["H"], case["V"], dtype, device, case["impl"], case["mode"], case["chunk_size"]
        )
    gc.collect()
    base_peak, base_current = _rss_mb()
    start = time.perf_counter()
    step()  # also the warm-up of the timing
    first_run_s = time.perf_counter() - start
    after_peak, _ = _rss_mb()
    times = time_cpu(step, case["min_run_time"], first_run_s, case["repeats"])
    return {
        # the minimum: on a shared CPU, other processes only ever add time (the median and max are kept too)
        "ms": min(times),
        "ms_stat": f"min of {len(times)}",
        "ms_median": statistics.median(times),
        "ms_lo": min(times),
        "ms_hi": max(times),
        "peak_mb": after_peak - base_peak,
        # the baseline high-water mark above the current RSS: a rise smaller than this would go unseen
        "baseline_slack_mb": base_peak - base_current,
    }


def run_case_cuda(case: dict) -> dict:
    import triton.testing

    dtype = getattr(torch, case["dtype"])
    device = torch.device("cuda")
    if case["impl"] == "matmul":
        step = setup_matmul(case["N"], case["H"], case["V"], dtype, device)
    else:
        step = setup_logprob(
            case["N"], case["H"], case["V"], dtype, device, case["impl"], case["mode"], case["chunk_size"]
        )
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms, ms_lo, ms_hi = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
    del step
    torch.cuda.empty_cache()
    return {
        "ms": ms,
        "ms_stat": "median (p20, p80)",
        "ms_median": ms,
        "ms_lo": ms_lo,
        "ms_hi": ms_hi,
        "peak_mb": peak / 2**20,
        "baseline_slack_mb": 0.0,
    }


def run_case(case: dict, device: torch.device) -> dict:
    if device.type == "cuda":
        return run_case_cuda(case)
    out = subprocess.run(
        [sys.executable, __file__, "--_case", json.dumps(case)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name} ({torch.get_num_threads()} threads)"
        kind = "cpu"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_kind": kind,
        "torch": torch.__version__,
        "commit": commit or "unknown",
    }


COLUMNS = [
    "date", "device", "device_kind", "torch", "commit", "dtype", "impl", "mode", "N", "H", "V", "chunk_size",
    "ms", "ms_stat", "ms_median", "ms_lo", "ms_hi", "gflops", "pct_of_matmul", "peak_mb", "logits_mb",
    "baseline_slack_mb",
]  # fmt: skip


TABLE_HEAD = (
    f"{'N×H×V':>17} {'mode':>8} {'impl':>13} {'ms':>10} {'GFLOP/s':>9} {'% mm':>6} {'peak MB':>9} {'logits MB':>10}"
)


def table_line(r: dict) -> str:
    shape = f"{r['N']}×{r['H']}×{r['V']}"
    return (
        f"{shape:>17} {r['mode']:>8} {r['impl']:>13} {r['ms']:>10.1f} {r['gflops']:>9.1f} "
        f"{r['pct_of_matmul']:>6.1f} {r['peak_mb']:>9.0f} {r['logits_mb']:>10.0f}"
    )


def write_csv(rows: list[dict], path: Path) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.4g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["N"], r["H"], r["V"]) for r in rows}, key=lambda s: (s[0] * s[2], s))
    labels = [f"{n}×{h}×{v}" for n, h, v in shapes]
    x = range(len(shapes))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in MODES:
        for impl, style in zip(IMPLS, ("-o", "--s")):
            sel = {(r["N"], r["H"], r["V"]): r for r in rows if r["mode"] == mode and r["impl"] == impl}
            if not sel:
                continue
            ys = [sel.get(s, {}) for s in shapes]
            ax_t.plot(x, [y.get("ms", float("nan")) for y in ys], style, label=f"{impl} {mode}")
            ax_m.plot(x, [y.get("peak_mb", float("nan")) for y in ys], style, label=f"{impl} {mode}")
    logits = {(r["N"], r["H"], r["V"]): r["logits_mb"] for r in rows}
    ax_m.plot(x, [logits[s] for s in shapes], ":k", label="N×V float32 logits")
    for ax, ylabel in ((ax_t, "time (ms)"), (ax_m, "measured peak memory (MB)")):
        ax.set_xticks(list(x), labels, rotation=20)
        ax.set_yscale("log")
        ax.set_xlabel("N × H × V")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int]:
    n, h, v = (int(x) for x in text.lower().split("x"))
    return n, h, v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default", help="shape grid (N, H, V)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="NxHxV shapes, instead of --grid")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--chunk-size", type=int, default=1024, help="token rows per chunk of linear_logprob")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timed runs per case (CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls of a step slower than --min-run-time")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--_case", help=argparse.SUPPRESS)  # internal: run one CPU case in this process
    args = parser.parse_args()

    if args._case:
        print(json.dumps(run_case_cpu(json.loads(args._case))))
        return

    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    shapes = args.shapes or GRIDS[args.grid]
    env = environment(device)
    base = {"dtype": dtype, "chunk_size": args.chunk_size, "min_run_time": args.min_run_time, "repeats": args.repeats}

    ceiling_case = dict(base, impl="matmul", mode="fwd", N=CEILING_SHAPE[0], H=CEILING_SHAPE[1], V=CEILING_SHAPE[2])
    ceiling = run_case(ceiling_case, device)
    ceiling_gflops = 2 * CEILING_SHAPE[0] * CEILING_SHAPE[1] * CEILING_SHAPE[2] / ceiling["ms"] / 1e6
    print(f"{env['device']}, torch {env['torch']}, commit {env['commit']}, {dtype}, chunk_size {args.chunk_size}")
    print(f"matmul ceiling ({'×'.join(map(str, CEILING_SHAPE))}): {ceiling_gflops:.1f} GFLOP/s\n")
    print(TABLE_HEAD)
    print("-" * len(TABLE_HEAD), flush=True)

    rows = []
    for n, h, v in shapes:
        for mode in args.modes:
            for impl in args.impls:
                case = dict(base, impl=impl, mode=mode, N=n, H=h, V=v)
                result = run_case(case, device)
                flops = (2 if mode == "fwd" else 6) * n * h * v
                gflops = flops / result["ms"] / 1e6
                row = dict(env, **case, **result, gflops=gflops, pct_of_matmul=100 * gflops / ceiling_gflops)
                row["logits_mb"] = n * v * 4 / 2**20
                rows.append(row)
                print(table_line(row), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_logprob_{env['device_kind']}"
    csv_path, png_path = args.out / f"{stem}.csv", args.out / f"{stem}.png"
    write_csv(rows, csv_path)
    plot(rows, png_path, f"linear_logprob, {env['device']}, {dtype}, chunk {args.chunk_size}, torch {env['torch']}")

    largest = max(shapes, key=lambda s: s[0] * s[1] * s[2])
    summary = {"bench": "logprob", **env, "dtype": dtype, "ceiling_gflops": round(ceiling_gflops, 1)}
    summary["largest_shape"] = "x".join(map(str, largest))
    for r in rows:
        if (r["N"], r["H"], r["V"]) == largest:
            summary[f"{r['impl']}_{r['mode']}_ms"] = round(r["ms"], 2)
            summary[f"{r['impl']}_{r['mode']}_peak_mb"] = round(r["peak_mb"], 1)
    summary.update(csv=str(csv_path), png=str(png_path), rows=len(rows))
    print(f"\nwrote {csv_path} and {png_path}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
