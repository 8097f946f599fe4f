"""Benchmark: per-token log-prob from hidden states and the LM head — time, TFLOP/s and MEASURED peak memory.

The op behind every log-prob of the trainer (policy, frozen reference, P²O's context ratio mask) turns last hidden
states (N, H) and the LM head (V, H) into one log-prob per token. Implementations compared:

- ``materialised``: ``(hidden @ weight.T).float().log_softmax(-1).gather(...)``, the (N, V) logits in full;
- ``chunked``: :func:`p2o_lightning.ops.linear_logprob`, the reference op (float32, chunks of ``--logits-budget``
  logits, at most ``--chunk-size`` rows when given);
- ``chunked-tokens``: the same op chunked by a token count alone (``--chunk-size``, default 1024 rows, no budget):
  what the op did before its chunks were sized by a logits budget, for ``--vocab-sweep``;
- ``compiled``: ``torch.compile`` of the chunked op (runs on CPU too; the compile is not timed);
- ``triton``: :func:`p2o_lightning.kernels.functional.linear_logprob`, the fused kernel (CUDA only: the interpreter
  that runs it on CPU is a correctness tool, not a benchmark);
- ``liger``: Liger-Kernel's fused linear cross-entropy, ``reduction="none"`` (its per-token loss is −log-prob);
- ``cce``: Apple's cut-cross-entropy ``linear_cross_entropy``, ``reduction="none"``.
The last two run where installed and on CUDA; otherwise the table says why they were skipped.

Modes: ``fwd`` is a forward under ``torch.no_grad`` (old-policy and reference log-probs); ``fwd+bwd`` a forward
and backward to hidden and weight (the policy update). TFLOP/s are counted on the useful work, 2·N·H·V (fwd) and
6·N·H·V (fwd+bwd); the recompute of chunked / fused backwards is not credited. ``% mm`` compares with a plain
matmul of the same dtype on the same device, measured in the same run (the ceiling). Peak memory is measured: on
CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU every case runs in a fresh subprocess and reports
the rise of the resident set's high-water mark (reset through ``/proc/self/clear_refs``) over its post-setup
value — for ``compiled`` after one warm-up call that compiles. ``logits MB`` is the size of the (N, V) float32
logits, for comparison. Times on CPU are the minimum of the timed runs (on a shared 2-core machine other
processes only ever add time; the median is in the CSV), on CUDA the median of ``triton.testing.do_bench``.

Every run also prints a **model, not measured**: FLOPs and HBM bytes of materialised / chunked / triton on the GPU
grid (N ∈ {4096, 16384}, H 4096, V 151,936, bf16), against the published H100 SXM ceilings — what a GPU run of
this script should be compared with, never a substitute for one.

    python benchmarks/bench_logprob.py                     # CPU: default grid (~6 min on 2 cores); CUDA: GPU grid
    python benchmarks/bench_logprob.py --grid full         # CPU: N up to 8192, H 1024, V 32768
    python benchmarks/bench_logprob.py --shapes 4096x1024x32768 --modes fwd+bwd --impls chunked triton
    python benchmarks/bench_logprob.py --vocab-sweep       # CPU: peak memory against the vocabulary, budget vs tokens
    python benchmarks/bench_logprob.py --model-gpu         # the launch-config model for A100 / H100 / H200, no GPU

``--vocab-sweep`` measures the peak memory of the chunked op at N=1024, H=128 for V from 8,192 to 151,936, with
chunks sized by the logits budget and by 1,024 tokens (writes ``bench_logprob_vocab_<device kind>.csv``).
``--model-gpu`` prints, for each log-prob kernel, GPU and launch config, the registers and shared memory of its
AOT compile and the time the model of :mod:`p2o_lightning.kernels.tuning` predicts — a model, not a measurement —
and which configs autotune would time (writes ``bench_logprob_config_model.csv``).

Writes (appends) ``benchmarks/results/bench_logprob_<device kind>.csv`` and ``bench_logprob_model_h100.csv``,
draws this run's ``bench_logprob_<device kind>.png``; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from common import environment, impl_unavailable, versions, write_csv  # noqa: E402

from p2o_lightning.kernels.tuning import GPUS  # noqa: E402
from p2o_lightning.ops import LOGITS_BUDGET, chunk_rows, linear_logprob  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRIDS = {  # (N, H, V)
    "default": [(1024, 512, 32768), (2048, 512, 32768), (4096, 512, 32768)],
    "full": [(n, 1024, 32768) for n in (1024, 2048, 4096, 8192)] + [(4096, 1024, 8192), (4096, 512, 32768)],
    "gpu": [(4096, 4096, 151936), (16384, 4096, 151936)],  # Qwen's vocabulary, a 7-8B model's width
}
IMPLS = ("chunked", "compiled", "materialised", "triton", "fused-head", "liger", "cce", "cce-nofilter")
# the logits' spread: "std1" (hidden N(0, 1), head N(0, 1/H): logits of std 1, a near-uniform softmax) or
# "realistic" (logits of std LOGIT_STD, each token's target logit uniform in TARGET_LOGITS: a peaked softmax whose
# target is the likeliest token, as for rollouts sampled from the policy itself)
LOGITS = ("realistic", "std1")
LOGIT_STD, TARGET_LOGITS = 3.0, (10.0, 25.0)
VOCAB_SWEEP = [(1024, 128, v) for v in (8192, 32768, 65536, 151936)]
MODES = ("fwd", "fwd+bwd")
CEILING_SHAPE = {"cpu": (1024, 1024, 32768), "cuda": (4096, 4096, 32768)}  # the plain matmul of "% mm"

# Published H100 SXM5 ceilings (NVIDIA H100 Tensor Core GPU datasheet): dense, i.e. without structured sparsity
H100 = GPUS["H100"]


# ----------------------------------------------------------------------------------------------------------------
# setup shared by all modes
# ----------------------------------------------------------------------------------------------------------------


def unavailable(impl: str, device: torch.device, dry_run: bool) -> str | None:
    """Why ``impl`` cannot run here (None when it can); a dry run runs the Triton kernels in the interpreter."""
    base = {"cce-nofilter": "cce", "fused-head": "triton"}.get(impl, impl)
    if dry_run and base == "triton":
        return None
    return impl_unavailable(base, device)


def case_unsafe(impl: str, n: int, v: int, device: torch.device) -> str | None:
    """Why a case must not run in this process (None when it may): one that corrupts the CUDA context would take
    every later case with it.
    """
    if impl == "compiled" and device.type == "cuda" and n * v >= 2**31:
        # seen on an H200 (torch 2.11.0+cu130, 2026-12-04): torch.compile of the chunked op at 16384×151936 raised
        # "an illegal memory access" (N·V ≥ 2³¹ elements: an int32 index overflow is the likely cause, not proven)
        return "torch.compile of the chunked op crashed the CUDA context at N·V ≥ 2^31 (torch 2.11, H200)"
    return None


def materialised_logprob(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """The naive path: (N, V) logits in float32, log_softmax, gather."""
    return (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)


def logprob_fn(
    impl: str, targets: Tensor, chunk_size: int | None, logits_budget: int = LOGITS_BUDGET
) -> Callable[[Tensor, Tensor], Tensor]:
    """(hidden, weight) → per-token log-prob (N,) of ``impl``."""
    chunking = dict(chunk_size=chunk_size, logits_budget=logits_budget)
    if impl == "materialised":
        return lambda hd, w: materialised_logprob(hd, w, targets)
    if impl == "chunked":
        return lambda hd, w: linear_logprob(hd, w, targets, **chunking)[0]
    if impl == "chunked-tokens":  # chunks of a token count whatever the vocabulary: the op before its budget
        return lambda hd, w: linear_logprob(hd, w, targets, chunk_size=chunk_size or 1024, logits_budget=2**62)[0]
    if impl == "compiled":
        return torch.compile(lambda hd, w: linear_logprob(hd, w, targets, **chunking)[0], dynamic=False)
    if impl == "triton":
        from p2o_lightning.kernels.functional import linear_logprob as fused

        return lambda hd, w: fused(hd, w, targets, **chunking)[0]
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda hd, w: -loss(w, hd, targets)
    if impl in ("cce", "cce-nofilter"):  # "cce": its default gradient filter (filter_eps="high"); or none
        from cut_cross_entropy import linear_cross_entropy

        eps = {"filter_eps": None} if impl == "cce-nofilter" else {}
        return lambda hd, w: -linear_cross_entropy(hd, w, targets, reduction="none", **eps)
    raise ValueError(f"unknown impl {impl!r}")


def fused_head_loss(targets: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """(hidden, weight) → the fused head's loss (:mod:`p2o_lightning.kernels.fused_head`): a token-mean PPO loss
    at ratio 1 with random advantages, its gradient taken in the forward (fwd+bwd only: that is what it fuses).
    """
    from p2o_lightning.fused_head import RatioOneLoss
    from p2o_lightning.kernels.functional import fused_linear_policy_loss
    from p2o_lightning.loss import LossSettings

    gen = torch.Generator(targets.device).manual_seed(1)
    advantages = torch.randn(1, targets.numel(), device=targets.device, generator=gen)
    loss = RatioOneLoss.of(advantages, torch.ones(1, targets.numel(), device=targets.device), LossSettings())
    return lambda hd, w: fused_linear_policy_loss(hd[None], w, targets[None], loss)[0]


def make_inputs(
    n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, logits: str = "realistic", seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden (N, H), weight (V, H), targets (N,)) whose logits have the spread ``logits`` names (see LOGITS).

    "realistic": head N(0, LOGIT_STD²/H), hidden N(0, 1), then each hidden row moved along its target's head row so
    that the target's logit is a draw of U(TARGET_LOGITS) (the other logits move by ~Δ/√H). Built in place where
    it can be: the CPU benchmark's baseline is the high-water mark after this.
    """
    if logits not in LOGITS:
        raise ValueError(f"logits {logits!r}: expected one of {LOGITS}")
    gen = torch.Generator(device).manual_seed(seed)
    std = LOGIT_STD if logits == "realistic" else 1.0
    hidden = torch.empty(n, h, dtype=dtype, device=device).normal_(generator=gen)  # (N, H)
    weight = torch.empty(v, h, dtype=dtype, device=device).normal_(std=std * h**-0.5, generator=gen)  # (V, H)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)  # (N,)
    if logits == "realistic":
        low, high = TARGET_LOGITS
        for rows in torch.arange(n, device=device).split(4096):  # bounded float32 temporaries
            w_t = weight[targets[rows]].float()  # (R, H)
            want = torch.empty(len(rows), device=device).uniform_(low, high, generator=gen)
            have = (hidden[rows].float() * w_t).sum(-1)
            step = (want - have) / (w_t * w_t).sum(-1)  # (R,)
            hidden[rows] = (hidden[rows].float() + step[:, None] * w_t).to(dtype)
    return hidden, weight, targets


def logit_stats(hidden: Tensor, weight: Tensor, rows: int = 64) -> dict:
    """Mean over ``rows`` rows of each row's logit std and max, and of the softmax's largest probability."""
    z = hidden[:rows].float() @ weight.float().T  # (rows, V)
    return {"logit_std": z.std(dim=1).mean().item(), "logit_max": z.amax(dim=1).mean().item(),
            "p_max": z.softmax(-1).amax(dim=1).mean().item()}  # fmt: skip


def setup_logprob(
    n: int,
    h: int,
    v: int,
    dtype: torch.dtype,
    device: torch.device,
    impl: str,
    mode: str,
    chunk_size: int | None,
    logits_budget: int = LOGITS_BUDGET,
    logits: str = "std1",
) -> Callable[[], object]:
    """Allocate the inputs (see :func:`make_inputs`) → a step."""
    hidden, weight, targets = make_inputs(n, h, v, dtype, device, logits)
    gen = torch.Generator(device).manual_seed(1)
    grad_out = torch.empty(n, device=device).normal_(generator=gen)  # (N,) upstream grad of the log-probs
    if impl == "fused-head":
        if mode == "fwd":
            raise ValueError("fused-head is a forward + backward (the loss's gradient taken in its forward)")
        fn, grad_out = fused_head_loss(targets), torch.ones((), device=device)
    else:
        fn = logprob_fn(impl, targets, chunk_size, logits_budget)
    if mode == "fwd":

        def step() -> object:
            with torch.no_grad():
                return fn(hidden, weight)
    else:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)

        def step() -> object:
            out = fn(hidden, weight)
            return torch.autograd.grad(out, (hidden, weight), grad_out.to(out.dtype))

    return step


def setup_matmul(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device) -> Callable[[], object]:
    a = torch.empty(n, h, dtype=dtype, device=device).normal_()
    b = torch.empty(v, h, dtype=dtype, device=device).normal_()
    return lambda: a @ b.T


def setup_case(case: dict, device: torch.device) -> Callable[[], object]:
    dtype = getattr(torch, case["dtype"])
    if case["impl"] == "matmul":
        return setup_matmul(case["N"], case["H"], case["V"], dtype, device)
    return setup_logprob(
        case["N"], case["H"], case["V"], dtype, device, case["impl"], case["mode"], case["chunk_size"],
        case.get("logits_budget", LOGITS_BUDGET), case.get("logits", "std1"),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------


def _rss_mb() -> tuple[float, float]:
    """(high-water mark, current) resident set size of this process, MB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) / 1024  # kB
    return fields["VmHWM"], fields["VmRSS"]


def _reset_peak_rss() -> bool:
    """Reset the resident set's high-water mark to the current RSS (Linux ≥ 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def time_cpu(step: Callable[[], object], min_run_time: float, first_run_s: float, repeats: int) -> list[float]:
    """Times (ms) of ``step`` with torch.utils.benchmark on all of this process's threads.

    A step slower than ``min_run_time`` (judged by the untimed first run) is timed ``repeats`` times, one call each:
    a 2-core CPU cannot afford more within the default grid's minutes; quicker steps get ``blocked_autorange``.
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
    for impl in ("chunked", "materialised"):  # load every kernel (oneDNN JIT, thread pool) before the baseline
        setup_logprob(16, 16, 64, dtype, device, impl, "fwd+bwd", 8)()
    step = setup_case(case, device)
    if case["impl"] == "compiled":
        step()  # compile (and run once) before the baseline: the compiler's own memory is not the op's
    gc.collect()
    reset = _reset_peak_rss()
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
        "baseline_slack_mb": 0.0 if reset else base_peak - base_current,
    }


def run_case_cuda(case: dict) -> dict:
    import triton.testing

    device = torch.device("cuda")
    step = setup_case(case, device)
    if case["impl"] == "compiled":
        step()  # compile before measuring
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
    """Measure one case; a failure (out of memory, a baseline's API) becomes the row's status, not a crash."""
    if device.type == "cuda":
        try:
            return dict(run_case_cuda(case), status="ok")
        except Exception as err:  # report (out of memory, a baseline's API) and go on with the grid
            torch.cuda.empty_cache()
            return {"status": f"failed: {type(err).__name__}: {str(err)[:120]}"}
    out = subprocess.run(
        [sys.executable, __file__, "--_case", json.dumps(case)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        return {"status": f"failed: {out.stderr.strip().splitlines()[-1][:160] if out.stderr.strip() else 'no output'}"}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), status="ok")


# ----------------------------------------------------------------------------------------------------------------
# the bytes / FLOPs model (H100, not measured)
# ----------------------------------------------------------------------------------------------------------------


def model_case(impl: str, mode: str, n: int, h: int, v: int, chunk: int) -> dict:
    """FLOPs, HBM bytes, time and peak memory of one implementation on an H100 with bf16 inputs — a roofline model,
    an upper bound on speed: no kernel reaches the published peak (a good Triton or cuBLAS GEMM, 60–80 % of it).

    Each implementation is a sequence of kernels; time = Σ_kernels max(FLOPs / ceiling, bytes / bandwidth): a kernel
    overlaps its own loads with its math, consecutive kernels do not overlap. Bytes count every (N, V) pass of an
    elementwise op once per read and once per write (no L2 reuse across kernels); the fused kernels re-read the
    weight once per group of 16 row blocks of 64 rows (GROUP_N, the L2 ordering). The chunked reference upcasts
    to float32, so its matmuls run at the fp32 (non-tensor-core) rate, as torch's matmul does by default (no TF32).
    """
    logits, wh, nh = n * v, v * h, n * h
    chunks = -(-n // chunk)
    mm = 2 * n * h * v  # one N×H×V matmul
    bf16, fp32 = H100.bf16_tflops, H100.fp32_tflops
    bwd = mode == "fwd+bwd"
    if impl == "materialised":  # bf16 matmul → .float() → log_softmax → gather (→ autograd)
        kernels = [
            (mm, 2 * (nh + wh) + 2 * logits, bf16),  # logits written in bf16
            (0, (2 + 4 + 4 + 4) * logits, bf16),  # .float() read 2 write 4; log_softmax read 4 write 4
        ]
        if bwd:  # gather's zeros write 4; log_softmax read 8 write 4; cast read 4 write 2; 2 matmuls read 2 each
            kernels += [(0, (4 + 12 + 6) * logits, bf16), (2 * mm, 4 * logits + 4 * (nh + wh), bf16)]
        peak = (12 if bwd else 8) * logits  # float32 logits + log-probs (+ their grads)
    elif impl == "chunked":  # float32 weight copy; per chunk (chunk, V) float32 logits, max, exp, sum
        kernels = [
            (0, 6 * wh, fp32),  # weight.float(): read 2 write 4
            (mm, chunks * 4 * wh + 4 * logits, fp32),  # each chunk's matmul reads the float32 weight
            (0, (4 + 8 + 8 + 4) * logits, fp32),  # amax read 4; sub_, exp_ in place read+write 8 each; sum read 4
        ]
        peak = 4 * wh + 4 * chunk * v
        if bwd:  # cast again; recompute; exp/mul in place; dz @ w32 and grad_w32.addmm_ per chunk
            kernels += [
                (0, 6 * wh, fp32),
                (mm, chunks * 4 * wh + 4 * logits, fp32),
                (0, 3 * 8 * logits, fp32),
                (2 * mm, chunks * (4 + 8) * wh + 8 * logits + 4 * nh, fp32),
            ]
            peak += 4 * wh + 4 * nh + 2 * wh  # grad_weight's float32 accumulator, grad_hidden, the bf16 casts
    elif impl == "triton":  # fused forward; backward: ∂L/∂z kernel in vocabulary slices + 2 cuBLAS matmuls each
        passes = -(-n // (16 * 64))  # weight re-reads: one per group of 16 row blocks of 64 rows
        kernels = [(mm, passes * 2 * wh + 2 * nh + 16 * n, bf16)]
        peak = 4 * 4 * 17 * n  # the (4, splits ≈ 17, N) float32 partials
        if bwd:
            slices = chunks  # vocabulary slices of chunk·V/N columns, each read by all N rows
            kernels += [
                (mm, passes * 2 * wh + slices * 2 * nh + 2 * logits, bf16),  # recompute, write ∂L/∂z (bf16)
                (2 * mm, 4 * logits + slices * (2 + 2) * nh + 4 * wh, bf16),  # dzᵀ h and dz W: grads written once
                (0, slices * 8 * nh, bf16),  # grad_hidden's float32 accumulation across slices
            ]
            peak = 2 * chunk * v + (4 + 2) * nh + 2 * wh
    else:
        raise ValueError(impl)
    seconds = sum(max(f / (rate * 1e12), b / (H100.hbm_tbps * 1e12)) for f, b, rate in kernels)
    flops, bytes_ = sum(k[0] for k in kernels), sum(k[1] for k in kernels)
    useful = (6 if bwd else 2) * n * h * v
    return {
        "source": "model, not measured",
        "device": H100.name,
        "impl": impl,
        "mode": mode,
        "N": n,
        "H": h,
        "V": v,
        "chunk_size": chunk,
        "tflop": flops / 1e12,
        "hbm_gb": bytes_ / 1e9,
        "model_ms": seconds * 1e3,
        "model_tflops": useful / seconds / 1e12,
        "model_pct_of_bf16_peak": 100 * useful / seconds / 1e12 / bf16,
        "model_peak_gb": peak / 1e9,
        "logits_gb": 4 * logits / 1e9,
    }


MODEL_HEAD = (
    f"{'N×H×V':>18} {'mode':>8} {'impl':>13} {'TFLOP':>7} {'HBM GB':>8} {'ms':>8} {'TFLOP/s':>8} "
    f"{'% bf16':>7} {'peak GB':>8} {'logits GB':>9}"
)


def model_line(r: dict) -> str:
    shape = f"{r['N']}×{r['H']}×{r['V']}"
    return (
        f"{shape:>18} {r['mode']:>8} {r['impl']:>13} {r['tflop']:>7.1f} {r['hbm_gb']:>8.1f} "
        f"{r['model_ms']:>8.1f} {r['model_tflops']:>8.0f} {r['model_pct_of_bf16_peak']:>7.1f} "
        f"{r['model_peak_gb']:>8.2f} {r['logits_gb']:>9.1f}"
    )


# ----------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------


COLUMNS = [
    "date", "device", "device_kind", "torch", "triton_version", "liger_version", "cce_version", "commit", "dtype",
    "impl", "mode", "N", "H", "V", "chunk_size", "logits_budget", "logits", "logit_std", "logit_max", "p_max",
    "status", "ms", "ms_stat", "ms_median", "ms_lo",
    "ms_hi", "tflops",
    "pct_of_matmul", "peak_mb", "logits_mb", "baseline_slack_mb",
]  # fmt: skip
MODEL_COLUMNS = [
    "date", "commit", "source", "device", "impl", "mode", "N", "H", "V", "chunk_size", "tflop", "hbm_gb",
    "model_ms", "model_tflops", "model_pct_of_bf16_peak", "model_peak_gb", "logits_gb",
]  # fmt: skip

TABLE_HEAD = (
    f"{'N×H×V':>18} {'mode':>8} {'impl':>13} {'ms':>10} {'TFLOP/s':>8} {'% mm':>6} {'peak MB':>9} {'logits MB':>10}"
)


def table_line(r: dict) -> str:
    shape = f"{r['N']}×{r['H']}×{r['V']}"
    if r["status"] != "ok":
        return f"{shape:>18} {r['mode']:>8} {r['impl']:>13}   {r['status']}"
    return (
        f"{shape:>18} {r['mode']:>8} {r['impl']:>13} {r['ms']:>10.1f} {r['tflops']:>8.3f} "
        f"{r['pct_of_matmul']:>6.1f} {r['peak_mb']:>9.0f} {r['logits_mb']:>10.0f}"
    )


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["status"] == "ok"]
    shapes = sorted({(r["N"], r["H"], r["V"]) for r in rows}, key=lambda s: (s[0] * s[2], s))
    labels = [f"{n}×{h}×{v}" for n, h, v in shapes]
    x = range(len(shapes))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    impls = sorted({r["impl"] for r in rows})
    for mode, style in zip(MODES, ("-o", "--s")):
        for impl in impls:
            sel = {(r["N"], r["H"], r["V"]): r for r in rows if r["mode"] == mode and r["impl"] == impl}
            if not sel:
                continue
            ys = [sel.get(s, {}) for s in shapes]
            ax_t.plot(x, [y.get("ms", float("nan")) for y in ys], style, label=f"{impl} {mode}")
            ax_m.plot(x, [max(y.get("peak_mb", float("nan")), 0.5) for y in ys], style, label=f"{impl} {mode}")
    logits = {(r["N"], r["H"], r["V"]): r["logits_mb"] for r in rows}
    ax_m.plot(x, [logits[s] for s in shapes], ":k", label="N×V float32 logits")
    for ax, ylabel in ((ax_t, "time (ms)"), (ax_m, "measured peak memory (MB)")):
        ax.set_xticks(list(x), labels, rotation=20)
        ax.set_yscale("log")
        ax.set_xlabel("N × H × V")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# peak memory against the vocabulary (measured), and the launch-config model (no GPU)
# ----------------------------------------------------------------------------------------------------------------


def vocab_sweep(base: dict, device: torch.device, env: dict, out: Path) -> None:
    """Measured peak memory and time of the chunked op for V in VOCAB_SWEEP: logits-budget vs 1,024-token chunks."""
    print(f"{env['device']}, torch {env['torch']}, commit {env['commit']}, {base['dtype']}, "
          f"budget {base['logits_budget']} logits\nMEASURED: peak memory against the vocabulary")  # fmt: skip
    print(TABLE_HEAD)
    rows = []
    for n, h, v in VOCAB_SWEEP:
        for mode in MODES:
            for impl in ("chunked", "chunked-tokens"):
                case = dict(base, impl=impl, mode=mode, N=n, H=h, V=v)
                if impl == "chunked-tokens":
                    case.update(chunk_size=base["chunk_size"] or 1024, logits_budget=2**62)
                row = dict(env, **case, **run_case(case, device), logits_mb=n * v * 4 / 2**20)
                if row["status"] == "ok":
                    row["tflops"] = (2 if mode == "fwd" else 6) * n * h * v / row["ms"] / 1e9
                    row["pct_of_matmul"] = float("nan")  # no matmul ceiling measured in the sweep
                rows.append(row)
                print(table_line(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_logprob_vocab_{env['device_kind']}.csv"
    write_csv(rows, path, COLUMNS)
    summary = {f"{r['impl']}_{r['mode']}_V{r['V']}_peak_mb": round(r["peak_mb"], 1) for r in rows if "peak_mb" in r}
    print(f"\nwrote {path}")
    print(json.dumps({"bench": "logprob_vocab", **env, **summary}))


CONFIG_MODEL_COLUMNS = [
    "date", "commit", "source", "gpu", "kernel", "dtype", "N", "H", "V", "contexts", "config", "registers",
    "shared_bytes", "resident", "programs", "waves", "wave_eff", "bound", "model_ms", "model_tflops", "rank",
    "autotune_times",
]  # fmt: skip


def config_model(out: Path) -> None:
    """Print and write the launch-config model's prediction for every log-prob config on A100 / H100 / H200."""
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    from p2o_lightning.kernels import logprob, tuning

    env = environment(torch.device("cpu"))
    print("MODEL, NOT MEASURED: predicted time of each launch config of the log-prob kernels (kernels/tuning.py),")
    print("from bytes, FLOPs and the occupancy of the registers / shared memory of its AOT compile. No GPU ran this.")
    head = (f"{'GPU':>15} {'kernel':>8} {'shape (C×)N×H×V':>22} {'config BN×BV×BH/w/s':>20} {'regs':>5} {'smem KB':>8} "
            f"{'res':>4} {'waves':>6} {'bound':>5} {'model ms':>9} {'TFLOP/s':>8}  rank")  # fmt: skip
    print(head)
    print("-" * len(head))
    rows = []
    resources = {"forward": tuning.resources_of(logprob.FORWARD_SPACE)}
    resources["backward"] = tuning.resources_of(logprob.BACKWARD_SPACE)
    for gpu in tuning.GPUS.values():
        for kernel, contexts in (("forward", 1), ("forward", 2), ("backward", 1)):
            configs = (logprob.FORWARD_CONFIGS if kernel == "forward" else logprob.BACKWARD_CONFIGS)[torch.bfloat16]
            for n, h, v in GRIDS["gpu"]:
                rows_n = n * contexts
                vc = logprob.backward_columns(rows_n, v, LOGITS_BUDGET) if kernel == "backward" else v
                preds = []
                for config in configs:
                    c_pad = triton_next_pow2(contexts)
                    launched = logprob.per_context(dict(config, num_stages=config.get("num_stages", 3)), c_pad)
                    feats = (("ENTROPY", True),) + ((("C_PAD", c_pad),) if kernel == "forward" else ())
                    base = dict(config, num_stages=config.get("num_stages", 3))
                    res = resources[kernel]("bf16", tuple(base.items()), feats, gpu.arch)
                    shape = (n, v, h, contexts) if kernel == "forward" else (rows_n, vc, h, 1)  # predict's order
                    split = logprob.split_plan(shape[0], shape[1], c_pad, gpu.sms) if kernel == "forward" else None
                    pred = tuning.predict(kernel, gpu, "bf16", launched, res, *shape, split=split)
                    slices = -(-v // vc) if kernel == "backward" else 1
                    pred["model_ms"] *= slices  # every slice of the vocabulary
                    preds.append((launched, res, pred))
                order = sorted(range(len(preds)), key=lambda i: preds[i][2]["model_ms"])
                for rank, i in enumerate(order, 1):
                    launched, res, pred = preds[i]
                    cfg = f"{launched['BLOCK_N']}×{launched['BLOCK_V']}×{launched['BLOCK_H']}/{launched['num_warps']}" \
                          f"/{launched['num_stages']}"  # fmt: skip
                    timed = rank <= logprob.TOP_K
                    shape_s = f"{contexts}×{n}×{h}×{v}" if kernel == "forward" else f"{rows_n}×{h}×{v}"
                    print(f"{gpu.name:>15} {kernel:>8} {shape_s:>22} {cfg:>20} {res.registers:>5} "
                          f"{res.shared_bytes / 1024:>8.0f} {pred['resident']:>4} {pred['waves']:>6} "
                          f"{pred['bound']:>5} {pred['model_ms']:>9.2f} {pred.get('model_tflops', 0):>8.0f}"
                          f"  {rank}{' (autotune times it)' if timed else ''}")  # fmt: skip
                    rows.append(dict(
                        date=env["date"], commit=env["commit"], source="model, not measured", gpu=gpu.name,
                        kernel=kernel, dtype="bf16", N=n, H=h, V=v, contexts=contexts, config=cfg,
                        registers=res.registers, shared_bytes=res.shared_bytes, rank=rank, autotune_times=timed,
                        **{k: pred[k] for k in ("resident", "programs", "waves", "wave_eff", "bound", "model_ms")},
                        model_tflops=pred.get("model_tflops", 0.0),
                    ))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_logprob_config_model.csv"
    if path.exists():
        path.unlink()  # one run's predictions (the configs change with the kernels)
    write_csv(rows, path, CONFIG_MODEL_COLUMNS)
    best = {f"{r['gpu']}|{r['kernel']}|C{r['contexts']}|N{r['N']}": r["config"] for r in rows if r["rank"] == 1}
    print(f"\nwrote {path}")
    print(json.dumps({"bench": "logprob_config_model", "source": "model, not measured", **env, "best": best}))


def triton_next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int]:
    n, h, v = (int(x) for x in text.lower().split("x"))
    return n, h, v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default=None, help="shape grid (N, H, V); default by device")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="NxHxV shapes, instead of --grid")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--chunk-size", type=int, default=None, help="at most this many token rows per chunk")
    parser.add_argument("--logits-budget", type=int, default=LOGITS_BUDGET, help="logits (elements) per chunk")
    parser.add_argument("--vocab-sweep", action="store_true", help="peak memory against V: budget vs token chunks")
    parser.add_argument("--model-gpu", action="store_true", help="print the launch-config model (no GPU) and exit")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timed runs per case (CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls of a step slower than --min-run-time")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--logits", choices=LOGITS, default="std1", help="the logits' spread (see LOGITS)")
    parser.add_argument("--skip-ceiling", action="store_true", help="no matmul ceiling (%% mm left empty)")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="CPU under TRITON_INTERPRET=1: run the triton and fused-head cases in the interpreter (not a measurement)",
    )  # fmt: skip
    parser.add_argument("--_case", help=argparse.SUPPRESS)  # internal: run one CPU case in this process
    args = parser.parse_args()

    if args._case:
        print(json.dumps(run_case_cpu(json.loads(args._case))))
        return
    if args.model_gpu:
        config_model(args.out)
        return

    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    shapes = args.shapes or GRIDS[args.grid or ("gpu" if device.type == "cuda" else "default")]
    env = dict(environment(device), **versions())
    base = {"dtype": dtype, "chunk_size": args.chunk_size, "logits_budget": args.logits_budget,
            "min_run_time": args.min_run_time, "repeats": args.repeats, "logits": args.logits}  # fmt: skip
    if args.dry_run and (device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1"):
        parser.error("--dry-run runs on the CPU with TRITON_INTERPRET=1 (the kernels in the interpreter)")
    if args.vocab_sweep:
        vocab_sweep(base, device, env, args.out)
        return

    n_c, h_c, v_c = CEILING_SHAPE[device.type]
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton_version']}, commit {env['commit']}, {dtype}")
    ceiling_tflops = float("nan")
    if not args.skip_ceiling:
        ceiling = run_case(dict(base, impl="matmul", mode="fwd", N=n_c, H=h_c, V=v_c), device)
        ceiling_tflops = 2 * n_c * h_c * v_c / ceiling["ms"] / 1e9
        print(f"matmul ceiling ({n_c}×{h_c}×{v_c}, {dtype}), measured: {ceiling_tflops:.3f} TFLOP/s\n")
    skipped = {impl: why for impl in args.impls if (why := unavailable(impl, device, args.dry_run))}
    for impl, why in skipped.items():
        print(f"skipped {impl}: {why}")
    print("\nMEASURED on this device")
    print(TABLE_HEAD)
    print("-" * len(TABLE_HEAD), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"bench_logprob_{env['device_kind']}.csv"
    rows = []
    for n, h, v in shapes:
        stats = logit_stats(*make_inputs(min(n, 64), h, v, getattr(torch, dtype), device, args.logits)[:2])
        print(f"{n}×{h}×{v}, logits {args.logits}: " + ", ".join(f"{k} {x:.3g}" for k, x in stats.items()))
        for mode in args.modes:
            for impl in args.impls:
                case = dict(base, impl=impl, mode=mode, N=n, H=h, V=v)
                why = skipped.get(impl) or case_unsafe(impl, n, v, device)
                why = why or ("forward + backward only (it fuses the loss's gradient)" if (impl, mode) == (
                    "fused-head", "fwd") else None)  # fmt: skip
                result = {"status": f"skipped: {why}"} if why else run_case(case, device)
                if args.dry_run and result["status"] == "ok":
                    result["ms_stat"] = "dry run: CPU, the interpreter; not a measurement"
                row = dict(env, **case, **stats, **result, logits_mb=n * v * 4 / 2**20)
                if row["status"] == "ok":
                    row["tflops"] = (2 if mode == "fwd" else 6) * n * h * v / row["ms"] / 1e9
                    row["pct_of_matmul"] = 100 * row["tflops"] / ceiling_tflops
                rows.append(row)
                print(table_line(row), flush=True)
                write_csv([row], csv_path, COLUMNS)  # appended after every case: a run stopped early keeps them

    model_rows = [
        dict(
            model_case(impl, mode, n, h, v, chunk_rows(v, args.logits_budget, args.chunk_size)),
            date=env["date"],
            commit=env["commit"],
        )  # fmt: skip
        for n, h, v in GRIDS["gpu"]
        for mode in MODES
        for impl in ("materialised", "chunked", "triton")
    ]
    ceilings = f"{H100.bf16_tflops} TFLOP/s bf16 dense, {H100.fp32_tflops} fp32, {H100.hbm_tbps} TB/s"
    print(f"\nMODEL, NOT MEASURED (a roofline, an upper bound): bf16 on {H100.name}, {ceilings}")
    print("time = Σ_kernels max(FLOPs / ceiling, bytes / bandwidth)")
    print(MODEL_HEAD)
    print("-" * len(MODEL_HEAD))
    for r in model_rows:
        print(model_line(r))

    png_path = csv_path.with_suffix(".png")
    model_path = args.out / "bench_logprob_model_h100.csv"
    write_csv(model_rows, model_path, MODEL_COLUMNS)
    plot(
        rows,
        png_path,
        f"per-token log-prob, {env['device']}, {dtype}, budget {args.logits_budget}, torch {env['torch']}",
    )

    largest = max(shapes, key=lambda s: s[0] * s[1] * s[2])
    summary = {"bench": "logprob", **env, "dtype": dtype, "ceiling_tflops": round(ceiling_tflops, 4)}
    summary["largest_shape"] = "x".join(map(str, largest))
    for r in rows:
        if (r["N"], r["H"], r["V"]) == largest and r["status"] == "ok":
            summary[f"{r['impl']}_{r['mode']}_ms"] = round(r["ms"], 2)
            summary[f"{r['impl']}_{r['mode']}_peak_mb"] = round(r["peak_mb"], 1)
    summary["skipped"] = skipped
    summary["model_not_measured_h100_ms"] = {
        f"{r['impl']}_{r['mode']}_N{r['N']}": round(r["model_ms"], 1) for r in model_rows
    }
    summary.update(csv=str(csv_path), model_csv=str(model_path), png=str(png_path), rows=len(rows))
    print(f"\nwrote {csv_path}, {model_path} and {png_path}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
