"""Benchmark: GRPO group advantage and the PPO-clip + KL policy loss — Triton kernels vs the torch reference, in GB/s.

Both ops are memory-bound: a handful of FLOPs per element. So, as in the Triton tutorials, they are measured in
**GB/s from the bytes the op must move** — its compulsory traffic, the inputs read once and the outputs written
once — against the device's copy bandwidth measured in the same run (``y.copy_(x)`` of 256 MiB: read + write):

- ``group_advantage``, rewards (B, K) float32: read 4·B·K, write 4·B·K (+ B collapse flags for the kernel);
- ``policy_loss`` on (B, T) tokens, float32 log-probs, a bool mask, per-sequence advantages: ``fwd`` reads logp,
  old_logp (+ ref_logp, context_logp) at 4 bytes and the mask at 1 byte per token; ``fwd+bwd`` reads them twice and
  writes ∂loss/∂logp (4 bytes per token). ``plain`` is PPO-clip alone; ``p2o`` adds the k3 KL term to a reference,
  dual-clip and P²O's context ratio mask.

For the torch reference the script also **counts** what it really moves: a dispatch hook sums the bytes of every
input and output tensor of every aten op and counts the ops (each a kernel launch on a GPU) — an upper bound on
its DRAM traffic, since caches may serve some reads; ``moved GB/s`` is that count over the time.

On CUDA both implementations are timed (``triton.testing.do_bench``, median) and reported as GB/s on the
compulsory bytes and as a share of the measured copy bandwidth. On CPU the Triton kernels cannot be benchmarked
(the interpreter runs numpy), so the torch reference is timed (``torch.utils.benchmark``, the minimum of the runs,
on one thread by default: with another job on this 2-core machine, OpenMP's barriers made these small elementwise
ops 10–30× slower and erratic at two threads) and a **model, not measured**, puts both on an H100 (published
3.35 TB/s HBM3, ~4 µs per kernel launch): kernels = compulsory bytes / bandwidth + their launches (1 for the
advantage; 2 forward and 1 backward for the loss); reference = counted bytes / bandwidth + ops × 4 µs.

    python benchmarks/bench_loss.py                  # ~1 min on 2 CPU cores
    python benchmarks/bench_loss.py --grid gpu       # the default on CUDA

Writes (appends) ``benchmarks/results/bench_loss_<device kind>.csv``, draws ``bench_loss_<device kind>.png``;
the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from common import environment, impl_unavailable, versions, write_csv  # noqa: E402

from p2o_lightning import ops  # noqa: E402
from p2o_lightning.kernels.tuning import GPUS  # noqa: E402
from p2o_lightning.loss import LossSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRIDS = {  # advantage: (B prompts, K rollouts); loss: (B·K sequences, T tokens)
    "default": {"advantage": [(512, 16), (8192, 64)], "loss": [(256, 2048), (1024, 4096)]},
    "gpu": {"advantage": [(1024, 16), (16384, 64)], "loss": [(1024, 8192), (4096, 8192)]},
}
LOSS_CONFIGS = {  # the loss's settings, and which of π_ref / the context log-probs it reads
    "plain": dict(settings=LossSettings(clip_high=0.2)),
    "p2o": dict(settings=LossSettings(kl_coef=0.05, kl_estimator="k3", clip_ratio_c=3.0), ref=True, context=True),
}
LAUNCH_US = 4.0  # a typical kernel launch + tail


# ----------------------------------------------------------------------------------------------------------------
# setup shared by the modes
# ----------------------------------------------------------------------------------------------------------------


def compulsory_bytes(op: str, config: str, mode: str, b: int, t: int) -> int:
    """Bytes the op must move: its inputs read once, its outputs written once (per pass)."""
    if op == "group_advantage":
        return 4 * b * t + 4 * b * t + b  # rewards in, advantages out (+ the kernel's B collapse flags)
    options = LOSS_CONFIGS[config]
    per_token = 4 + 4 + 1 + 4 * options.get("ref", False) + 4 * options.get("context", False)  # logp, old, mask, …
    if mode == "fwd":
        return per_token * b * t + 4 * b  # + the per-sequence advantages
    return (2 * per_token + 4) * b * t + 8 * b  # the backward reads the inputs again and writes ∂loss/∂logp


def setup_advantage(b: int, k: int, impl: str, device: torch.device) -> Callable[[], object]:
    """One call on rewards (B, K) of 0/1."""
    rewards = (torch.rand(b, k, device=device, generator=torch.Generator(device).manual_seed(0)) > 0.7).float()
    if impl == "triton":
        from p2o_lightning.kernels.advantage import group_advantage_and_collapse

        return lambda: group_advantage_and_collapse(rewards)
    return lambda: ops.group_advantage(rewards)


def setup_loss(b: int, t: int, config: str, mode: str, impl: str, device: torch.device) -> Callable[[], object]:
    """One policy_loss call (and its backward in fwd+bwd) on (B, T) tokens."""
    gen = torch.Generator(device).manual_seed(0)
    options = dict(LOSS_CONFIGS[config])
    logp = torch.randn(b, t, device=device, generator=gen) * 0.3 - 1.0  # (B, T)
    old_logp = logp + torch.randn(b, t, device=device, generator=gen) * 0.1
    mask = torch.rand(b, t, device=device, generator=gen) > 0.2  # (B, T) bool
    advantages = torch.randn(b, device=device, generator=gen)  # (B,)
    if options.pop("ref", False):
        options["ref_logp"] = logp + torch.randn(b, t, device=device, generator=gen) * 0.1
    if options.pop("context", False):
        options["context_logp"] = old_logp + torch.randn(b, t, device=device, generator=gen)
    if impl == "triton":
        from p2o_lightning.kernels.functional import policy_loss as loss_fn
    else:
        loss_fn = ops.policy_loss
    if mode == "fwd":

        def step() -> object:
            with torch.no_grad():
                return loss_fn(logp, old_logp, advantages, mask, **options)

        return step
    logp.requires_grad_(True)

    def step() -> object:
        loss, _ = loss_fn(logp, old_logp, advantages, mask, **options)
        return torch.autograd.grad(loss, logp)

    return step


# ----------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------


class CountBytes(TorchDispatchMode):
    """Σ bytes of the input and output tensors of every aten op (views excluded) and the number of such ops."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable and any(a.alias_info for a in func._schema.returns):
            return out  # a view: no data moved
        tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(x, Tensor)]
        self.bytes += sum(x.numel() * x.element_size() for x in tensors)
        self.ops += 1
        return out


def counted(step: Callable[[], object]) -> tuple[int, int]:
    with CountBytes() as counter:
        step()
    return counter.bytes, counter.ops


def time_ms(step: Callable[[], object], device: torch.device, min_run_time: float) -> tuple[float, str]:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(step), "median"
    from torch.utils.benchmark import Timer

    step()
    m = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return min(m.raw_times) / m.number_per_run * 1e3, f"min of {len(m.raw_times)}"


def copy_bandwidth_gbs(device: torch.device, min_run_time: float) -> float:
    """The device's measured copy bandwidth: y.copy_(x) of 256 MiB reads and writes 512 MiB."""
    x = torch.empty(64 * 2**20, device=device)  # 256 MiB of float32
    y = torch.empty_like(x)
    ms, _ = time_ms(lambda: y.copy_(x), device, min_run_time)
    return 2 * x.numel() * 4 / ms / 1e6


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

COLUMNS = [
    "date", "device", "device_kind", "torch", "triton_version", "commit", "op", "config", "mode", "impl", "B", "T",
    "status", "ms", "ms_stat", "compulsory_mb", "gbs", "pct_of_copy", "copy_gbs", "counted_mb", "counted_ops",
    "model_h100_us", "model_source",
]  # fmt: skip
TABLE_HEAD = (
    f"{'op':>16} {'config':>6} {'mode':>8} {'shape':>11} {'impl':>7} {'ms':>9} {'GB/s':>8} {'% copy':>7} "
    f"{'moved MB':>9} {'moved GB/s':>10} {'ops':>5} {'H100 µs (model)':>16}"
)


def table_line(r: dict) -> str:
    shape = f"{r['B']}×{r['T']}"
    head = f"{r['op']:>16} {r['config']:>6} {r['mode']:>8} {shape:>11} {r['impl']:>7}"
    model = f"{r['model_h100_us']:>16.1f}"
    if r["status"] != "ok":
        return f"{head} {r['status'].split(' (')[0]:>54} {model}"
    moved = f"{'':>9} {'':>10} {'':>5}"  # the kernels' rows: only the reference's traffic is counted
    if r.get("counted_mb"):
        moved = f"{r['counted_mb']:>9.1f} {r['counted_mb'] / r['ms']:>10.1f} {r['counted_ops']:>5}"
    return f"{head} {r['ms']:>9.3f} {r['gbs']:>8.1f} {r['pct_of_copy']:>7.1f} {moved} {model}"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["status"] == "ok"]
    modelled = [r for r in rows if r.get("model_h100_us")]
    fig, (ax_m, ax_h) = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, sel, key, label in (
        (ax_m, measured, "gbs", "measured GB/s (compulsory bytes / time)"),
        (ax_h, modelled, "model_h100_us", "H100 µs — MODEL, not measured"),
    ):
        labels = [f"{r['op'].split('_')[-1]} {r['config']} {r['mode']} {r['B']}×{r['T']} {r['impl']}" for r in sel]
        ax.barh(range(len(sel)), [r[key] for r in sel], color=["C1" if r["impl"] == "triton" else "C0" for r in sel])
        ax.set_yticks(range(len(sel)), labels, fontsize=6)
        ax.set_xlabel(label)
        ax.set_xscale("log")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default=None, help="default: gpu on CUDA, else default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timed runs per case (CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (see the docstring)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    grid = GRIDS[args.grid or ("gpu" if device.type == "cuda" else "default")]
    env = dict(environment(device), **versions())
    copy_gbs = copy_bandwidth_gbs(device, args.min_run_time)
    triton_skip = impl_unavailable("triton", device)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton_version']}, commit {env['commit']}")
    print(f"measured copy bandwidth (256 MiB, read + write): {copy_gbs:.1f} GB/s")
    if triton_skip:
        print(f"triton: {triton_skip}; its rows below are the H100 model only")
    print()
    print(TABLE_HEAD)
    print("-" * len(TABLE_HEAD), flush=True)

    cases = [("group_advantage", "-", "fwd", b, k) for b, k in grid["advantage"]]
    cases += [("policy_loss", c, m, b, t) for b, t in grid["loss"] for c in LOSS_CONFIGS for m in ("fwd", "fwd+bwd")]
    rows = []
    for op, config, mode, b, t in cases:
        compulsory = compulsory_bytes(op, config, mode, b, t)
        for impl in ("torch", "triton"):
            row = dict(env, op=op, config=config, mode=mode, impl=impl, B=b, T=t, copy_gbs=copy_gbs, status="ok")
            row["compulsory_mb"] = compulsory / 1e6
            skip = triton_skip if impl == "triton" else None
            step = None
            if not skip:
                if op == "group_advantage":
                    step = setup_advantage(b, t, impl, device)
                else:
                    step = setup_loss(b, t, config, mode, impl, device)
            if impl == "torch":  # what the reference really moves, and its number of kernels
                moved, n_ops = counted(step)
                row.update(counted_mb=moved / 1e6, counted_ops=n_ops)
                row["model_h100_us"] = moved / (GPUS["H100"].hbm_tbps * 1e6) + n_ops * LAUNCH_US
                row["model_source"] = "model: counted bytes / 3.35 TB/s + ops × 4 µs"
            else:  # the kernels: 1 launch (advantage); forward + finalize (loss), + backward
                launches = 1 if op == "group_advantage" else (2 if mode == "fwd" else 3)
                row["model_h100_us"] = compulsory / (GPUS["H100"].hbm_tbps * 1e6) + launches * LAUNCH_US
                row["model_source"] = f"model: compulsory bytes / 3.35 TB/s + {launches} launches × 4 µs"
            if skip:
                row["status"] = f"skipped: {skip}"
            else:
                row["ms"], row["ms_stat"] = time_ms(step, device, args.min_run_time)
                row["gbs"] = compulsory / row["ms"] / 1e6
                row["pct_of_copy"] = 100 * row["gbs"] / copy_gbs
            rows.append(row)
            print(table_line(row), flush=True)
            del step

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_loss_{env['device_kind']}"
    csv_path, png_path = args.out / f"{stem}.csv", args.out / f"{stem}.png"
    write_csv(rows, csv_path, COLUMNS)
    plot(rows, png_path, f"group_advantage and policy_loss, {env['device']}, torch {env['torch']}")
    summary = {"bench": "loss", **env, "copy_gbs": round(copy_gbs, 1), "triton": triton_skip or "measured"}
    for r in rows:
        key = f"{r['op']}_{r['config']}_{r['mode']}_{r['B']}x{r['T']}_{r['impl']}".replace("_-_", "_")
        if r["status"] == "ok":
            summary[f"{key}_ms"] = round(r["ms"], 4)
            summary[f"{key}_gbs"] = round(r["gbs"], 1)
        summary[f"{key}_model_h100_us"] = round(r["model_h100_us"], 1)
    summary.update(csv=str(csv_path), png=str(png_path), rows=len(rows))
    print(f"\nwrote {csv_path} and {png_path}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
