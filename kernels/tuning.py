r"""The launch-config model of the log-prob kernels: bytes moved, FLOPs and occupancy → a predicted time per config.

``triton.autotune`` would time every config on first use; with this model as its ``perf_model`` it times only
the ``TOP_K`` configs the model ranks first (:mod:`.logprob`), and ``bench_logprob.py --model-gpu`` prints the
model's predictions for the A100, H100 and H200 — **a model, not a measurement**: no GPU was at hand to fit it.
It is the fallback: on a device with a tuned file (:mod:`.tuned_configs`, written by ``benchmarks/tune_logprob.py``,
which times every config) the launchers use the measured winners and autotune never runs.
The launcher hands the model what it needs — the kernel's launch space (:func:`forward_perf_model`) and the forward's
split plan, which it passes the kernel (:func:`.logprob.split_plan`) — so this module never imports it.

Per config, with the registers and shared memory the AOT compile reports for the device's architecture
(:mod:`.aot`)::

    resident = min(65536 / (regs · 32 · warps), smem_per_SM / smem, 64 / warps, 32)   programs per SM (occupancy)
    waves    = ⌈programs / (SMs · resident)⌉,   wave_eff = programs / (waves · SMs · resident)
    t_mma    = FLOPs / (peak · 0.8 · min(1, resident · warps / 8))    tensor cores (16-bit) or FMA (fp32); the
                                                                       last factor: < 8 resident warps hide
                                                                       too little latency
    t_epi    = logits · 16 / fp32_peak        the online softmax / ∂L/∂z epilogue (≈ 16 FP32 ops a logit)
    t_sm     = t_mma + t_epi  if resident == 1 (nothing to overlap with)  else  max(t_mma, t_epi)
    t_l2     = operand bytes / L2 bandwidth   each tile reloads (rows + BLOCK_V) × H inputs from L2
    t_hbm    = compulsory bytes / HBM bandwidth, the weight re-read once per GROUP_N row blocks
    t        = max(t_sm, t_l2, t_hbm) / wave_eff

Published ceilings (dense, no sparsity): A100 SXM4 312 TFLOP/s bf16, 19.5 fp32, 2.04 TB/s; H100 SXM5 989, 67,
3.35 TB/s; H200 SXM 989, 67, 4.8 TB/s. L2 bandwidth: A100 5,120 B/clk at 1.41 GHz (whitepaper); Hopper's is not
published — 10 TB/s is an assumption.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import triton

from . import _guard  # noqa: F401  (refuses the top-level name `kernels`)

__all__ = ["GPUS", "GPU", "as_config", "backward_perf_model", "forward_perf_model", "predict", "resources_of"]


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    arch: int  # compute capability × 10, the AOT target
    sms: int
    bf16_tflops: float  # dense tensor-core peak (fp16 the same)
    fp32_tflops: float  # FMA peak
    hbm_tbps: float
    l2_tbps: float
    smem_per_sm: int  # bytes
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64


GPUS = {
    "A100": GPU("A100 SXM4 80GB", 80, 108, 312.0, 19.5, 2.039, 7.2, 167936),
    "H100": GPU("H100 SXM5", 90, 132, 989.4, 66.9, 3.35, 10.0, 233472),
    "H200": GPU("H200 SXM", 90, 132, 989.4, 66.9, 4.8, 10.0, 233472),
}
_ESIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def as_config(config: dict) -> triton.Config:
    """A launch-config dict of :mod:`.logprob` as a ``triton.Config``."""
    kwargs = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(kwargs, num_warps=config["num_warps"], num_stages=config.get("num_stages", 3))


def occupancy(gpu: GPU, registers: int, shared: int, warps: int) -> int:
    """Programs resident per SM, from the AOT resource numbers (registers allocated in units of 8 per thread)."""
    regs = max(8, math.ceil(registers / 8) * 8)
    by_regs = gpu.regs_per_sm // (regs * 32 * warps)
    by_smem = gpu.smem_per_sm // shared if shared else 32
    return max(0, min(by_regs, by_smem, gpu.max_warps_per_sm // warps, 32))


def predict(
    kernel: str, gpu: GPU, dtype: str, config: dict, resources, n: int, v: int, h: int, c: int = 1,
    split: tuple[int, int] | None = None,
) -> dict:  # fmt: skip
    """Predicted time and its terms for one launch of the forward (``kernel="forward"``, C contexts of N rows, its
    ``split`` plan (splits, columns per split) from :func:`.logprob.split_plan`) or the ∂L/∂z kernel (``"backward"``,
    N rows × V columns of one slice) with ``config`` (after :func:`.logprob.per_context`).
    """
    e = _ESIZE[dtype]
    block_n, block_v, group = config["BLOCK_N"], config["BLOCK_V"], config["GROUP_N"]
    warps = config["num_warps"]
    c_pad = triton.next_power_of_2(c) if kernel == "forward" else 1
    rows = c_pad * block_n  # tile height
    row_blocks = triton.cdiv(n, block_n)
    resident = occupancy(gpu, resources.registers, resources.shared_bytes, warps)
    if kernel == "forward":  # the launcher's split plan
        splits, cols_per_split = split
        programs = row_blocks * splits
        tiles = programs * triton.cdiv(cols_per_split, block_v)
        out_bytes = 16 * c * n * splits
    else:
        programs = tiles = row_blocks * triton.cdiv(v, block_v)
        out_bytes = e * n * v  # ∂L/∂z written once
    flops = 2 * tiles * rows * block_v * h  # padded tiles
    logits = tiles * rows * block_v
    peak = (gpu.fp32_tflops if dtype == "fp32" else gpu.bf16_tflops) * 1e12
    if resident == 0:
        return dict(resident=0, model_ms=math.inf, programs=programs, waves=0, wave_eff=0.0, bound="infeasible")
    t_mma = flops / (peak * 0.8 * min(1.0, resident * warps / 8))
    t_epi = logits * 16 / (gpu.fp32_tflops * 1e12)
    t_sm = t_mma + t_epi if resident == 1 else max(t_mma, t_epi)
    t_l2 = tiles * (rows + block_v) * h * e / (gpu.l2_tbps * 1e12)
    hbm = c * n * h * e + v * h * e * triton.cdiv(row_blocks, group) + out_bytes
    t_hbm = hbm / (gpu.hbm_tbps * 1e12)
    waves = triton.cdiv(programs, gpu.sms * resident)
    wave_eff = programs / (waves * gpu.sms * resident)
    terms = {"sm": t_sm, "l2": t_l2, "hbm": t_hbm}
    bound = max(terms, key=terms.get)
    seconds = terms[bound] / wave_eff
    useful = 2 * c * n * v * h
    return dict(
        resident=resident, programs=programs, waves=waves, wave_eff=wave_eff, bound=bound, model_ms=seconds * 1e3,
        model_tflops=useful / seconds / 1e12, t_mma_ms=t_mma * 1e3, t_epi_ms=t_epi * 1e3, t_l2_ms=t_l2 * 1e3,
        t_hbm_ms=t_hbm * 1e3,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# autotune's perf_model (on CUDA): the device's GPU entry and the AOT resources of each config
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _device_gpu() -> GPU:
    """The GPUS entry of the current CUDA device, or one built from its properties (ceilings scaled by SM count)."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    for key, gpu in GPUS.items():
        if key in props.name:
            return gpu
    major, minor = torch.cuda.get_device_capability()
    base = GPUS["H100"] if major >= 9 else GPUS["A100"]
    scale = props.multi_processor_count / base.sms
    return dataclasses.replace(
        base, name=props.name, arch=10 * major + minor, sms=props.multi_processor_count,
        bf16_tflops=base.bf16_tflops * scale, fp32_tflops=base.fp32_tflops * scale,
        smem_per_sm=getattr(props, "shared_memory_per_multiprocessor", base.smem_per_sm),
    )  # fmt: skip


def resources_of(space):
    """The AOT resources of ``space``'s cases for an arch: ``(dtype, config items, feature items, arch) →``
    :class:`.aot.Resources`, compiled once per case in the process.
    """

    @functools.cache
    def resources(dtype: str, config: tuple, features: tuple, arch: int):
        from . import aot

        return aot.compile_case(aot.find_case(space, dtype, dict(config), dict(features)), arch)

    return resources


def _dtype_name(tensor) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[tensor.dtype]


def _config_of(kwargs: dict) -> dict:
    keys = ("BLOCK_N", "BLOCK_V", "BLOCK_H", "GROUP_N", "num_warps", "num_stages")
    return {k: kwargs[k] for k in keys}


def forward_perf_model(space) -> Callable[..., float]:
    """Autotune's perf_model for the forward kernel of ``space``: the predicted ms (smaller is better) of a launch,
    with the split plan the launcher passed the kernel (``n_splits``, ``cols_per_split``).
    """
    resources = resources_of(space)

    def model(**kwargs) -> float:
        gpu, dtype = _device_gpu(), _dtype_name(kwargs["H_ptr"])
        config = _config_of(kwargs)
        # the AOT case's BLOCK_N is per context after per_context(): recover the one-context BLOCK_N it came from
        base = dict(config, BLOCK_N=config["BLOCK_N"] * kwargs["C_PAD"])
        feats = (("ENTROPY", kwargs["ENTROPY"]), ("C_PAD", kwargs["C_PAD"]), ("EVEN_H", kwargs.get("EVEN_H", False)))
        res = resources(dtype, tuple(base.items()), feats, gpu.arch)
        split = (kwargs["n_splits"], kwargs["cols_per_split"])
        n, v, h, c = kwargs["N"], kwargs["V"], kwargs["H"], kwargs["C"]
        return predict("forward", gpu, dtype, config, res, n, v, h, c, split=split)["model_ms"]

    return model


def backward_perf_model(space) -> Callable[..., float]:
    """Autotune's perf_model for the ∂L/∂z kernel of ``space``: the predicted ms of one vocabulary slice."""
    resources = resources_of(space)

    def model(**kwargs) -> float:
        gpu, dtype = _device_gpu(), _dtype_name(kwargs["H_ptr"])
        config = _config_of(kwargs)
        feats = (("ENTROPY", kwargs["ENTROPY"]), ("EVEN_H", kwargs.get("EVEN_H", False)))
        res = resources(dtype, tuple(config.items()), feats, gpu.arch)
        return predict("backward", gpu, dtype, config, res, kwargs["R"], kwargs["Vc"], kwargs["H"])["model_ms"]

    return model
