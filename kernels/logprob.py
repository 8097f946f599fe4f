r"""Fused linear log-prob: per-token log π(y_t | ·) and entropy from hidden states and the LM head, in Triton.

Why
---
GRPO / P²O needs the log-prob of every response token four times per step: the policy (with grad), the rollout
policy (``old_logp``), the frozen reference (KL) and, for P²O's context ratio mask, the policy under the templated
prompt. The naive torch version materialises the tokens × vocab logits; counted in bytes per logit for N tokens,
hidden size H, vocabulary V, bf16 weights and a float32 softmax::

    logits = (hidden @ weight.T).float() / T         # write 2; read 2, write 4; read 4, write 4
    logprobs = logits.log_softmax(-1)                # read 4 (≥ twice: max, sum), write 4
    logp = logprobs.gather(-1, targets[:, None])     # N reads
    entropy = -(logprobs.exp() * logprobs).sum(-1)   # read 4, write 4; read 8, write 4; read 4

≈ 50 bytes per logit: for a micro-batch of N = 16,384 tokens of Qwen (V = 151,936) that is 2.5 G logits, 10 GB
per float32 copy and ~125 GB of memory traffic (37 ms at an H100's 3.35 TB/s) around a matmul of
2·N·H·V = 20 TFLOP at H = 4096 (21 ms at its 989 TFLOP/s dense bf16 peak) — for an output of 2 floats per token.

The kernel never writes a logit. Each program owns a block of token rows and walks the vocabulary in tiles of
``BLOCK_V`` columns; for each tile it accumulates the (rows × BLOCK_V) logits with ``tl.dot`` over ``BLOCK_H``
slices of H in float32 and folds them into four running values per row — the online log-sum-exp of flash
attention, extended to the entropy. With m the running max, s = Σ exp(z − m), t = Σ exp(z − m)·z:

    m' = max(m, max_j z_j);   α = exp(m − m')
    s' = α·s + Σ_j exp(z_j − m')
    t' = α·t + Σ_j exp(z_j − m')·z_j           # the online-softmax rescaling applies to Σ p·z as well
    lse = m + log s;   Σ_j p_j z_j = t / s;   entropy = lse − t / s;   logp = z_target − lse

and z_target is picked up when its tile passes. Compulsory traffic: N·H + V·H inputs (2 B each) and ~16 bytes per
token of outputs — the kernel is a GEMM with a reduction for epilogue, compute-bound like the matmul it replaces.

Split-V. N/BLOCK_N row blocks alone do not fill 132 SMs when N is a few thousand tokens, so the vocabulary is
also split across S programs per row block; each writes its partial (m, s, t, z_target) and a few
tiny torch ops merge them: M = max_k m_k, S = Σ_k s_k·exp(m_k − M), T = Σ_k t_k·exp(m_k − M).

Several contexts sharing the weight (:func:`linear_logprob_multi`). P²O's context ratio mask compares
log π(y | x) with log π(y | template(x)) for the *same* response tokens: C hidden-state tensors, one weight, one
target sequence. The tile rows are laid out context-major, row r = c·BLOCK_N + i, so every weight tile loaded is
multiplied with the C contexts' row blocks in one ``tl.dot``: the weight is streamed once for all contexts
(a C× taller tile, i.e. C× the arithmetic intensity per weight byte, without concatenating the hidden states or
repeating the targets). The single-context op is the case C = 1 of the same kernel.

Backward
--------
With z = h Wᵀ / T, p = softmax(z), s = Σ_k p_k z_k and upstream grads g (of logp) and e (of entropy) per row:

    ∂logp/∂z_j    = onehot_j − p_j
    ∂entropy/∂z_j = −p_j (z_j − s)
    ∂L/∂z_j       = g·onehot_j − p_j (g + e (z_j − s))
    grad_hidden   = (∂L/∂z) W / T          (N, H)
    grad_weight   = (∂L/∂z)ᵀ h / T         (V, H)

Design. Both products contract over V or N but *produce* H-wide rows: a flash-attention style backward that keeps a
(BLOCK_N × H) grad_hidden accumulator on chip while recomputing logit tiles works for H = 128 (a head), not for
H = 4096 (1 MB of float32 per 64 rows, 4× an SM's register file); splitting H across programs would recompute every
logit tile H/BLOCK_H times, and accumulating with fp32 atomics (cut-cross-entropy's way) makes the weight gradient
non-deterministic and moves (1/BLOCK_N + 1/BLOCK_V)·N·V·H·8 bytes of read-modify-write. So the backward splits the
work as Liger-Kernel does, between one Triton kernel and two cuBLAS matmuls, with a bounded buffer in between: the
kernel recomputes each (BLOCK_N × BLOCK_V) logit tile from the saved lse (and Σ p z), forms ∂L/∂z / T in registers
and writes it once, in the input dtype; the matmuls give grad_hidden and grad_weight. The buffer is a *slice of
the vocabulary* for all rows, (N, Vc) with Vc ≈ logits_budget / N, at most ``logits_budget`` elements as the
reference's chunks (a budget in elements, not tokens: a 151,936-token vocabulary costs what a 32,768 one does);
slicing columns rather than rows (Liger slices rows) means each slice's grad_weight rows come from one
matmul over all N rows, written once in the weight's dtype, and the cross-slice float32 accumulation falls on
grad_hidden (N × H) instead of grad_weight (V × H, 9× larger for N = 16k tokens of Qwen: 2.5 GB of float32
read and written per slice avoided). The logits are never written, 4 of the 6·N·H·V FLOPs of forward + backward
run at cuBLAS speed and the recompute (another 2·N·H·V) in the kernel, and the result is deterministic.

L2 ordering. Both kernels map their 1-D program id to (row block, vocabulary split / tile) GROUP_N row blocks at a
time (the matmul tutorial's grouped ordering): the programs resident together share a few MB of hidden rows and a
few weight tiles, which stay in L2, instead of one weight tile and hundreds of distinct hidden blocks that do not.

Dtypes. bf16 / fp16 / fp32 inputs (fp64 is computed in fp32, as the reference); outputs are float32; gradients come
back in the input dtype. On a GPU, fp32 tiles use ``input_precision="ieee"`` (torch's matmul default, no TF32);
under ``TRITON_INTERPRET=1`` low-precision tiles are upcast to fp32 before ``tl.dot`` (the interpreter's bf16 dot is
wrong), and the interpreter's fp32 → bf16 stores truncate where a GPU rounds to nearest.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from p2o_lightning.ops import LOGITS_BUDGET, chunk_rows

from . import (
    _guard,  # noqa: F401  (refuses the top-level name `kernels`)
    tuned_configs,
)
from .aot import KernelSpace
from .tuning import as_config, backward_perf_model, forward_perf_model

__all__ = ["linear_logprob", "linear_logprob_multi"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_program(
    pid,  # this program's id in a 1-D grid of row_blocks × n_cols programs
    row_blocks,  # number of row blocks
    n_cols,  # number of column blocks (vocabulary splits, or vocabulary tiles)
    GROUP_N: tl.constexpr,  # row blocks per group
):
    """(row block, column block) of a program, GROUP_N row blocks at a time (the matmul tutorial's L2 ordering).

    The programs resident together then share GROUP_N blocks of hidden rows and ~(resident / GROUP_N) weight tiles,
    which fit in L2, rather than one weight tile and hundreds of distinct hidden blocks that do not.
    """
    width = GROUP_N * n_cols
    first = (pid // width) * GROUP_N
    size = tl.minimum(row_blocks - first, GROUP_N)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _logprob_forward_kernel(
    H_ptr,  # pointer to the hidden states: row n of context c at H_ptr + c·stride_hc + n·stride_hn, (C, N, H)
    W_ptr,  # pointer to the LM head weight, (V, H), unit stride along H
    TGT_ptr,  # pointer to the target ids, (N,) int64, shared by the C contexts
    MAX_ptr,  # out: running max m per (split, row), (S, C·N) float32
    SUM_ptr,  # out: Σ exp(z − m) per (split, row), (S, C·N) float32
    PZ_ptr,  # out: Σ exp(z − m)·z per (split, row), (S, C·N) float32; untouched unless ENTROPY
    ZT_ptr,  # out: the target's logit if it lies in this split's columns, else 0, (S, C·N) float32
    C,  # number of contexts
    N,  # token rows per context
    V,  # vocabulary size
    H,  # hidden size
    n_splits,  # vocabulary splits S
    cols_per_split,  # vocabulary columns of one split, a multiple of BLOCK_V (the last split may run past V)
    stride_hc,  # elements between contexts of hidden
    stride_hn,  # elements between rows of hidden
    stride_wv,  # elements between rows of the weight
    inv_temperature,  # 1 / T
    C_PAD: tl.constexpr,  # C rounded up to a power of 2 (tile rows are C_PAD·BLOCK_N)
    BLOCK_N: tl.constexpr,  # token rows per context in one program
    BLOCK_V: tl.constexpr,  # vocabulary columns per tile
    BLOCK_H: tl.constexpr,  # slice of H per tl.dot
    GROUP_N: tl.constexpr,  # row blocks per group of the program ordering
    ENTROPY: tl.constexpr,  # also accumulate Σ exp(z − m)·z
    EVEN_H: tl.constexpr,  # H is a multiple of BLOCK_H: the loads along H need no mask
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (the interpreter's low-precision dot is wrong)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 inputs, else None (the default)
):
    row_blocks = tl.cdiv(N, BLOCK_N)
    pid_n, pid_s = _grouped_program(tl.program_id(0), row_blocks, n_splits, GROUP_N)  # row block, vocabulary split
    rows = tl.arange(0, C_PAD * BLOCK_N)  # tile row r holds context r // BLOCK_N, token pid_n·BLOCK_N + r % BLOCK_N
    ctx = rows // BLOCK_N
    tok = pid_n * BLOCK_N + rows % BLOCK_N
    row_ok = (ctx < C) & (tok < N)
    target = tl.load(TGT_ptr + tok, mask=row_ok, other=-1)  # (ROWS,); ignore_index never matches a column
    h_rows = H_ptr + ctx.to(tl.int64) * stride_hc + tok.to(tl.int64) * stride_hn  # (ROWS,) row pointers

    m = tl.full((C_PAD * BLOCK_N,), float("-inf"), tl.float32)  # running max
    s = tl.zeros((C_PAD * BLOCK_N,), tl.float32)  # running Σ exp(z − m)
    t = tl.zeros((C_PAD * BLOCK_N,), tl.float32)  # running Σ exp(z − m)·z
    z_target = tl.zeros((C_PAD * BLOCK_N,), tl.float32)
    v_start = pid_s * cols_per_split
    for tile in range(0, cols_per_split // BLOCK_V):
        cols = v_start + tile * BLOCK_V + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        col_ok = cols < V
        w_cols = W_ptr + cols.to(tl.int64) * stride_wv  # (BLOCK_V,) row pointers of the weight
        acc = tl.zeros((C_PAD * BLOCK_N, BLOCK_V), tl.float32)
        for k in range(0, H, BLOCK_H):
            ks = k + tl.arange(0, BLOCK_H)
            if EVEN_H:  # H % BLOCK_H == 0: no mask along H
                h = tl.load(h_rows[:, None] + ks[None, :], mask=row_ok[:, None], other=0.0)  # (ROWS, BH)
                w = tl.load(w_cols[None, :] + ks[:, None], mask=col_ok[None, :], other=0.0)  # (BH, BV)
            else:
                k_ok = ks < H
                h = tl.load(h_rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_cols[None, :] + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
        z = acc * inv_temperature  # (ROWS, BLOCK_V) logits / T; 0 on padded columns
        z_max = tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1)
        m_new = tl.maximum(m, z_max)  # finite: the first tile of a split holds a valid column
        alpha = tl.exp(m - m_new)
        p = tl.where(col_ok[None, :], tl.exp(z - m_new[:, None]), 0.0)  # exp(z − m'), 0 on padded columns
        s = s * alpha + tl.sum(p, axis=1)
        if ENTROPY:
            t = t * alpha + tl.sum(p * z, axis=1)
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        m = m_new

    out = pid_s * C * N + ctx * N + tok  # (ROWS,) index into the (S, C·N) partials
    tl.store(MAX_ptr + out, m, mask=row_ok)
    tl.store(SUM_ptr + out, s, mask=row_ok)
    tl.store(ZT_ptr + out, z_target, mask=row_ok)
    if ENTROPY:
        tl.store(PZ_ptr + out, t, mask=row_ok)


@triton.jit
def _logprob_backward_kernel(
    H_ptr,  # pointer to the hidden rows, (R, H), unit stride along H
    W_ptr,  # pointer to this chunk of the LM head weight, rows [v_offset, v_offset + Vc) of (V, H)
    TGT_ptr,  # pointer to the target ids, (R,) int64
    LSE_ptr,  # pointer to the saved log-sum-exp of each row, (R,) float32
    PZ_ptr,  # pointer to the saved Σ_j p_j z_j of each row, (R,) float32; read only if ENTROPY
    G_ptr,  # pointer to the upstream grad of logp, already 0 on ignored rows, (R,) float32
    E_ptr,  # pointer to the upstream grad of the entropy, 0 on ignored rows, (R,) float32; read only if ENTROPY
    DZ_ptr,  # out: ∂L/∂z / T of the chunk's columns, (R, Vc) in the input dtype
    R,  # rows
    Vc,  # vocabulary columns in this chunk
    v_offset,  # the chunk's first column in the vocabulary (targets are global ids)
    H,  # hidden size
    stride_hn,  # elements between rows of hidden
    stride_wv,  # elements between rows of the weight
    stride_dz,  # elements between rows of DZ
    inv_temperature,  # 1 / T
    BLOCK_N: tl.constexpr,  # token rows per program
    BLOCK_V: tl.constexpr,  # vocabulary columns per program
    BLOCK_H: tl.constexpr,  # slice of H per tl.dot
    GROUP_N: tl.constexpr,  # row blocks per group of the program ordering
    ENTROPY: tl.constexpr,  # the entropy has an upstream grad
    EVEN_H: tl.constexpr,  # H is a multiple of BLOCK_H: the loads along H need no mask
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (interpreter)
    PRECISION: tl.constexpr,  # tl.dot input_precision
):
    row_blocks, v_tiles = tl.cdiv(R, BLOCK_N), tl.cdiv(Vc, BLOCK_V)
    pid_n, pid_v = _grouped_program(tl.program_id(0), row_blocks, v_tiles, GROUP_N)  # row block, vocabulary tile
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # columns of the chunk
    row_ok = rows < R
    col_ok = cols < Vc
    h_rows = H_ptr + rows.to(tl.int64) * stride_hn
    w_cols = W_ptr + cols.to(tl.int64) * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k in range(0, H, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        if EVEN_H:  # H % BLOCK_H == 0: no mask along H
            h = tl.load(h_rows[:, None] + ks[None, :], mask=row_ok[:, None], other=0.0)  # (BN, BH)
            w = tl.load(w_cols[None, :] + ks[:, None], mask=col_ok[None, :], other=0.0)  # (BH, BV)
        else:
            k_ok = ks < H
            h = tl.load(h_rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_cols[None, :] + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    z = acc * inv_temperature  # (BN, BV) logits / T, recomputed

    lse = tl.load(LSE_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(G_ptr + rows, mask=row_ok, other=0.0)
    target = tl.load(TGT_ptr + rows, mask=row_ok, other=-1)
    p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)  # softmax probabilities
    if ENTROPY:
        sum_pz = tl.load(PZ_ptr + rows, mask=row_ok, other=0.0)
        e = tl.load(E_ptr + rows, mask=row_ok, other=0.0)
        dz = -p * (g[:, None] + e[:, None] * (z - sum_pz[:, None]))  # −p (g + e (z − Σ p z))
    else:
        dz = -p * g[:, None]
    dz += tl.where(v_offset + cols[None, :] == target[:, None], g[:, None], 0.0)  # + g·onehot(target)
    dz = dz * inv_temperature  # both products carry 1/T: store ∂L/∂z / T once
    dz_ptrs = DZ_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(dz_ptrs, dz.to(DZ_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


# The launch configs a GPU launch chooses from. ``triton.autotune`` times the TOP_K of them that the bytes / FLOPs /
# occupancy model of :mod:`.tuning` ranks first for the shape and device; the AOT test compiles every one of them for
# sm_80, sm_90 and sm_100 (registers, spills, shared memory: benchmarks/results/aot_kernels.csv). BLOCK_N is the
# token rows of one context: C contexts stack max(16, BLOCK_N // C_PAD) rows each into a tile of the same height.
# fp32 tiles multiply on the FMA units (``input_precision="ieee"``), with operands in registers: smaller k-slices and
# 8 warps, or they spill (measured by the AOT test: 64 × 128 × 64 on 4 warps spills ~6 KB a thread).
_TENSOR_CORE_TILES = (  # the AOT test found 64 × 128 on 4 warps, 128 × 128 and 64 × 256 on 8 spilling (sm_100)
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, GROUP_N=16, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=64, GROUP_N=16, num_warps=4, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=3),
)
_FMA_TILES = (
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, GROUP_N=16, num_warps=8, num_stages=2),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, GROUP_N=16, num_warps=4, num_stages=2),
)
FORWARD_CONFIGS = {torch.bfloat16: _TENSOR_CORE_TILES, torch.float16: _TENSOR_CORE_TILES, torch.float32: _FMA_TILES}
BACKWARD_CONFIGS = {  # no softmax state carried across tiles: larger tiles fit (none spills, AOT test)
    torch.bfloat16: (
        dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, GROUP_N=16, num_warps=4, num_stages=3),
        dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, GROUP_N=16, num_warps=8, num_stages=3),
        dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=3),
        dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, GROUP_N=8, num_warps=4, num_stages=3),
        dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=4),
    ),
    torch.float32: _FMA_TILES,
}
BACKWARD_CONFIGS[torch.float16] = BACKWARD_CONFIGS[torch.bfloat16]
# What the measured tuning on a device (benchmarks/tune_logprob.py) times besides the configs above, 16-bit inputs:
# larger tiles, cut-cross-entropy's sm_90 tile (256 rows × 128 columns × 32 of H, 8 warps, 3 stages) among them.
# They are not in the launch spaces autotune picks from: with the softmax state of 128+ rows, the AOT compile for
# sm_90 needs 255 registers and spills a few hundred bytes a thread in some of them (ENTROPY, two contexts), which
# only a measurement can price. A candidate that wins on a device is recorded in its tuned file (.tuned_configs) and
# launched from there; tests/test_kernels_aot.py compiles each one for sm_90, tests/test_kernels.py runs each one in
# the interpreter against the float64 reference.
FORWARD_CANDIDATES = (
    dict(BLOCK_N=256, BLOCK_V=128, BLOCK_H=32, GROUP_N=8, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=32, GROUP_N=8, num_warps=8, num_stages=4),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=32, GROUP_N=8, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, GROUP_N=8, num_warps=4, num_stages=4),
)
BACKWARD_CANDIDATES = (
    dict(BLOCK_N=256, BLOCK_V=128, BLOCK_H=32, GROUP_N=8, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=3),
)
# the ∂L/∂z buffer bounds the measured tuning tries (elements): 2²⁵ is ops.LOGITS_BUDGET, 2²⁸ a 512 MB bf16 buffer
BUDGET_CANDIDATES = (2**25, 2**26, 2**27, 2**28)


def tuning_space(kernel: str, dtype: torch.dtype) -> tuple[dict, ...]:
    """Every launch config the measured tuning times for ``kernel`` ("forward" / "backward") and ``dtype``."""
    launch = (FORWARD_CONFIGS if kernel == "forward" else BACKWARD_CONFIGS)[dtype]
    if dtype not in _LOW_PRECISION:
        return launch
    return launch + (FORWARD_CANDIDATES if kernel == "forward" else BACKWARD_CANDIDATES)


TOP_K = 2  # configs timed by triton.autotune per (V, H, contexts, entropy, dtype), out of the model's ranking
# a multiple of every BLOCK_V: the forward's splits and the backward's slices do not depend on the config picked
SPLIT_UNIT = max(c["BLOCK_V"] for cs in (*FORWARD_CONFIGS.values(), *BACKWARD_CONFIGS.values()) for c in cs)


def _interpreted() -> bool:
    """Whether the kernels run in the Triton interpreter (decided when ``@triton.jit`` decorated them)."""
    return not isinstance(_logprob_forward_kernel, triton.runtime.JITFunction)


def _precision(dtype: torch.dtype) -> str | None:
    """fp32 tiles multiply in full fp32 (as torch's matmul by default, no TF32); 16-bit ones keep the default."""
    return "ieee" if dtype == torch.float32 else None


def per_context(config: dict, c_pad: int) -> dict:
    """``config`` for C_PAD stacked contexts: the same tile height, max(16, BLOCK_N // C_PAD) rows per context."""
    return dict(config, BLOCK_N=max(16, config["BLOCK_N"] // c_pad))


def _by_name(configs: dict) -> dict[str, tuple[dict, ...]]:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return {names[d]: tuple(dict(c, num_stages=c.get("num_stages", 3)) for c in cs) for d, cs in configs.items()}


# The launch spaces (:class:`.aot.KernelSpace`): what the launchers below may pass each kernel, compiled for every
# GPU architecture by the AOT test and read back by the performance model. bf16 first: the feature variants.
_HALF = {"bf16": ("fp32", {"PRECISION": None}), "fp16": ("fp32", {"PRECISION": None}),
         "fp32": ("fp32", {"PRECISION": "ieee"})}  # fmt: skip
_COMMON = dict(dtypes=_HALF, matmul=True, aligned=("H", "stride_hc", "stride_hn", "stride_wv", "stride_dz"))
FORWARD_SPACE = KernelSpace(
    "logprob_forward",
    _logprob_forward_kernel,
    pointers=dict(
        H_ptr="in", W_ptr="in", TGT_ptr="*i64", MAX_ptr="*fp32", SUM_ptr="*fp32", PZ_ptr="*fp32", ZT_ptr="*fp32"
    ),
    scalars=dict(inv_temperature="fp32"),
    configs=_by_name(FORWARD_CONFIGS),
    features=dict(ENTROPY=(True, False), C_PAD=(2, 1, 4), EVEN_H=(False, True), UPCAST=(False,)),
    adapt=lambda config, feats: per_context(config, feats["C_PAD"]),
    **_COMMON,
)
BACKWARD_SPACE = KernelSpace(
    "logprob_backward",
    _logprob_backward_kernel,
    pointers=dict(
        H_ptr="in",
        W_ptr="in",
        TGT_ptr="*i64",
        LSE_ptr="*fp32",
        PZ_ptr="*fp32",
        G_ptr="*fp32",
        E_ptr="*fp32",
        DZ_ptr="in",
    ),  # fmt: skip
    scalars=dict(inv_temperature="fp32"),
    configs=_by_name(BACKWARD_CONFIGS),
    features=dict(ENTROPY=(True, False), EVEN_H=(False, True), UPCAST=(False,)),
    **_COMMON,
)
SPACES = (FORWARD_SPACE, BACKWARD_SPACE)


def _forward_config(n: int, v: int, h: int, c_pad: int, entropy: bool, hidden: Tensor) -> dict[str, int] | None:
    """The forward kernel's fixed config: the interpreter's, else the device's tuned one (:mod:`.tuned_configs`),
    else None (autotune over FORWARD_CONFIGS).
    """
    if _interpreted():  # numpy runs one program at a time: few, large tiles
        block_n = min(64, max(16, triton.next_power_of_2(n)))
        block_v = min(512, max(16, triton.next_power_of_2(v)))
        return dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=128, GROUP_N=8, num_warps=4)
    found = tuned_configs.lookup("forward", hidden.device, hidden.dtype, n=n, v=v, h=h, entropy=entropy)
    return per_context(found, c_pad) if found is not None else None


def _backward_config(rows: int, v: int, h: int, entropy: bool, hidden: Tensor) -> dict[str, int] | None:
    """The ∂L/∂z kernel's fixed config: the interpreter's, else the device's tuned one, else None (autotune)."""
    if _interpreted():
        block_n = min(64, max(16, triton.next_power_of_2(rows)))
        block_v = min(512, max(16, triton.next_power_of_2(v)))
        return dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=128, GROUP_N=8, num_warps=4)
    return tuned_configs.lookup("backward", hidden.device, hidden.dtype, n=rows, v=v, h=h, entropy=entropy)


def _even_h(h: int, config: dict) -> bool:
    return h % config["BLOCK_H"] == 0


def prune_for_contexts(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune's early prune: the forward configs for C_PAD stacked contexts (same tile height, fewer rows each)."""
    c_pad = kwargs.get("C_PAD", 1)
    out = []
    for c in configs:
        new = per_context(dict(c.kwargs), c_pad)
        new["EVEN_H"] = _even_h(named_args["H"], new) if "H" in named_args else False
        out.append(triton.Config(new, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def prune_even_h(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune's early prune of the backward: each config with EVEN_H for the launch's H."""
    h = named_args.get("H")
    return [triton.Config(dict(c.kwargs, EVEN_H=h is not None and _even_h(h, c.kwargs)), num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in configs]  # fmt: skip


@functools.cache
def _tuned(kernel: str, dtype: torch.dtype) -> triton.runtime.Autotuner:
    """The autotuned forward / backward kernel for ``dtype``: the model of :mod:`.tuning` ranks the configs (from the
    AOT resources of this module's launch spaces), autotune times the TOP_K best on the device (once per key, in the
    process).
    """
    if kernel == "forward":
        fn, configs, key = _logprob_forward_kernel, FORWARD_CONFIGS[dtype], ["V", "H", "C_PAD", "ENTROPY"]
        prune = {"early_config_prune": prune_for_contexts, "perf_model": forward_perf_model(FORWARD_SPACE)}
    else:
        fn, configs, key = _logprob_backward_kernel, BACKWARD_CONFIGS[dtype], ["Vc", "H", "ENTROPY"]
        prune = {"early_config_prune": prune_even_h, "perf_model": backward_perf_model(BACKWARD_SPACE)}
    return triton.autotune([as_config(c) for c in configs], key=key, prune_configs_by=dict(prune, top_k=TOP_K))(fn)


def _sms(device: torch.device) -> int | None:
    """The SMs of the CUDA device a launch runs on; None in the interpreter or off CUDA (one vocabulary split)."""
    if _interpreted() or device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(row_blocks: int, v_tiles: int, group_n: int, sms: int | None) -> int:
    """Vocabulary splits: one group of row blocks × the splits ≈ 2 programs per SM (1 split without ``sms``)."""
    if sms is None:
        return 1
    return max(1, min(v_tiles, triton.cdiv(2 * sms, min(group_n, row_blocks))))


def split_plan(n: int, v: int, c_pad: int, sms: int | None, config: dict | None = None) -> tuple[int, int]:
    """The forward's split-V plan → (splits, vocabulary columns per split), for N rows of C_PAD contexts on a device
    of ``sms`` SMs (None: one split), with a fixed ``config`` or (None) whichever one autotune picks.

    The one place the plan is made: the launcher launches it and passes it to the kernel, where the performance
    model of :mod:`.tuning` reads it. Under autotune the plan cannot depend on the config picked: whole SPLIT_UNIT
    columns each (the last split partial), for a nominal 64-row tile in groups of 16 row blocks.
    """
    unit, block_n, group_n = (SPLIT_UNIT, max(16, 64 // c_pad), 16) if config is None else (
        config["BLOCK_V"], config["BLOCK_N"], config["GROUP_N"])  # fmt: skip
    v_units = triton.cdiv(v, unit)
    splits = _num_splits(triton.cdiv(n, block_n), v_units, group_n, sms)
    cols_per_split = unit * triton.cdiv(v_units, min(splits, v_units))
    return triton.cdiv(v, cols_per_split), cols_per_split  # every split starts on a column < V


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the tiles are loaded in: the common dtype of the inputs; fp64 is computed in fp32."""
    dtype = torch.promote_types(*[t.dtype for t in tensors]) if len(tensors) > 1 else tensors[0].dtype
    return dtype if dtype in (*_LOW_PRECISION, torch.float32) else torch.float32


def linear_logprob_forward(
    hidden: Tensor,  # (C, N, H), unit stride along H
    weight: Tensor,  # (V, H), unit stride along H, same dtype as hidden
    targets: Tensor,  # (N,) int64
    temperature: float,
    return_entropy: bool,
    config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the forward kernel and merge its splits → (lse, z_target, Σ p·z or None), each (C, N) float32.

    ``config``: this launch config (one context's, as in FORWARD_CONFIGS), instead of the interpreter's / the device's
    tuned one / autotune's (the measured tuning times each config through here).
    """
    n_ctx, n, h = hidden.shape
    v = weight.shape[0]
    c_pad = triton.next_power_of_2(n_ctx)
    if config is None:
        config = _forward_config(n, v, h, c_pad, return_entropy, hidden)
    else:
        config = per_context(config, c_pad)
    splits, cols_per_split = split_plan(n, v, c_pad, _sms(hidden.device), config)

    part = torch.empty(4 if return_entropy else 3, splits, n_ctx * n, device=hidden.device, dtype=torch.float32)
    part_max, part_sum, part_zt = part[0], part[1], part[2]  # each (S, C·N)
    part_pz = part[3] if return_entropy else part_sum  # a placeholder pointer when the entropy is not wanted
    args = (
        hidden, weight, targets, part_max, part_sum, part_pz, part_zt,
        n_ctx, n, v, h, splits, cols_per_split, hidden.stride(0), hidden.stride(1), weight.stride(0),
        1.0 / temperature,
    )  # fmt: skip
    flags = dict(C_PAD=c_pad, ENTROPY=return_entropy, UPCAST=_interpreted(), PRECISION=_precision(hidden.dtype))
    if config is not None:
        grid = (triton.cdiv(n, config["BLOCK_N"]) * splits,)
        _logprob_forward_kernel[grid](*args, **flags, **config, EVEN_H=_even_h(h, config))
    else:
        _tuned("forward", hidden.dtype)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)](*args, **flags)

    # merge the splits (S × C·N floats: noise next to the kernel): M = max m_k, S = Σ s_k e^{m_k − M}
    row_max = part_max.amax(dim=0)  # (C·N,)
    scale = torch.exp(part_max - row_max)  # (S, C·N)
    total = (part_sum * scale).sum(dim=0)  # (C·N,)
    lse = row_max + torch.log(total)
    z_target = part_zt.sum(dim=0)  # exactly one split holds the target
    sum_pz = (part_pz * scale).sum(dim=0) / total if return_entropy else None  # Σ_j p_j z_j
    shape = (n_ctx, n)
    return lse.view(shape), z_target.view(shape), (sum_pz.view(shape) if sum_pz is not None else None)


def _backward_grid(rows: int, cols: int, meta: dict) -> tuple[int]:
    return (triton.cdiv(rows, meta["BLOCK_N"]) * triton.cdiv(cols, meta["BLOCK_V"]),)


def backward_columns(rows: int, v: int, logits_budget: int, unit: int = SPLIT_UNIT) -> int:
    """Vocabulary columns per backward slice: the (rows, Vc) ∂L/∂z buffer holds ≤ ``logits_budget`` elements
    (whole ``unit``-column blocks, at least one), or the whole vocabulary when it fits.
    """
    if rows * v <= logits_budget:
        return v
    return max(unit, logits_budget // rows // unit * unit)


def linear_logprob_backward(
    hidden: Tensor,  # (R, H) every row, unit stride along H
    weight: Tensor,  # (V, H)
    targets: Tensor,  # (R,) int64
    lse: Tensor,  # (R,) float32
    sum_pz: Tensor | None,  # (R,) float32, needed when grad_entropy is given
    grad_logp: Tensor,  # (R,) float32, 0 on ignored rows
    grad_entropy: Tensor | None,  # (R,) float32, 0 on ignored rows
    temperature: float,
    logits_budget: int,
    need_hidden: bool,
    need_weight: bool,
    config: dict | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """grad_hidden (R, H) and grad_weight (V, H) in the input dtype, one slice of the vocabulary at a time.

    The (R, V) matrix ∂L/∂z / T is produced in column slices of :func:`backward_columns` columns, so its buffer
    holds at most ``logits_budget`` elements (the reference's bound; at least R × 256). Slicing the vocabulary
    rather than the rows lets each slice's grad_weight rows come out of one matmul over all R rows, written once,
    and leaves the cross-slice accumulation to grad_hidden, (R, H): smaller than (V, H) by V/R (float32 across
    several slices).
    """
    n_rows, h = hidden.shape
    v = weight.shape[0]
    dz_dtype = hidden.dtype  # the matmul dtype: bf16 / fp16 use the tensor cores, fp32 stays fp32
    if config is None:
        config = _backward_config(n_rows, v, h, grad_entropy is not None, hidden)
    v_chunk = backward_columns(n_rows, v, logits_budget, SPLIT_UNIT if config is None else config["BLOCK_V"])
    single = v_chunk >= v
    grad_weight = torch.empty_like(weight) if need_weight else None  # (V, H): each slice written once
    grad_hidden = None
    if need_hidden:  # (R, H): accumulated over the slices, in float32 when there are several
        grad_hidden = torch.empty_like(hidden) if single else torch.zeros_like(hidden, dtype=torch.float32)
    flags = dict(ENTROPY=grad_entropy is not None, UPCAST=_interpreted(), PRECISION=_precision(dz_dtype))
    for v0 in range(0, v, v_chunk):
        cols = min(v_chunk, v - v0)
        w_slice = weight[v0 : v0 + cols]  # (Vc, H)
        dz = torch.empty(n_rows, cols, device=hidden.device, dtype=dz_dtype)  # the only (R, Vc) buffer alive
        args = (
            hidden, w_slice, targets, lse, sum_pz if grad_entropy is not None else lse, grad_logp,
            grad_entropy if grad_entropy is not None else grad_logp, dz,
            n_rows, cols, v0, h, hidden.stride(0), weight.stride(0), dz.stride(0), 1.0 / temperature,
        )  # fmt: skip
        if config is not None:
            grid = (triton.cdiv(n_rows, config["BLOCK_N"]) * triton.cdiv(cols, config["BLOCK_V"]),)
            _logprob_backward_kernel[grid](*args, **flags, **config, EVEN_H=_even_h(h, config))
        else:
            _tuned("backward", dz_dtype)[functools.partial(_backward_grid, n_rows, cols)](*args, **flags)
        if grad_weight is not None:
            torch.mm(dz.T, hidden, out=grad_weight[v0 : v0 + cols])  # (Vc, H), one matmul over all rows
        if grad_hidden is not None:
            if single:
                torch.mm(dz, w_slice, out=grad_hidden)
            elif dz_dtype == torch.float32:
                grad_hidden.addmm_(dz, w_slice)
            else:
                grad_hidden += dz @ w_slice  # an (R, H) 16-bit partial, summed in float32
        del dz
    if grad_hidden is not None and grad_hidden.dtype != hidden.dtype:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


class LinearLogprobFunction(torch.autograd.Function):
    r"""``log softmax(h Wᵀ / T)[target]`` and entropy of C contexts sharing W and the targets, fused.

    Forward (the online log-sum-exp, no logits written): with z = h Wᵀ / T, lse = log Σ_j e^{z_j}, p = e^{z − lse}

        logp    = z_target − lse
        entropy = lse − Σ_j p_j z_j

    Backward (per chunk of rows, ∂L/∂z recomputed from the saved lse and Σ p z, then two matmuls):

        ∂L/∂z_j     = g·onehot_j − p_j (g + e (z_j − Σ_k p_k z_k))
        grad_hidden = (∂L/∂z) W / T,     grad_weight = Σ_c (∂L/∂z_c)ᵀ h_c / T

    Saves (hidden, weight, targets, lse, Σ p z); rows with target == ignore_index give 0 and no gradient.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # (C, N, H)
        weight: Tensor,  # (V, H)
        targets: Tensor,  # (N,) int64
        temperature: float,
        return_entropy: bool,
        ignore_index: int,
        logits_budget: int,
    ) -> tuple[Tensor, ...]:
        in_dtypes = (hidden.dtype, weight.dtype)
        dtype = _compute_dtype(hidden, weight)
        hidden_c = hidden.to(dtype) if hidden.stride(-1) == 1 else hidden.to(dtype).contiguous()
        weight_c = weight.to(dtype) if weight.stride(-1) == 1 else weight.to(dtype).contiguous()
        valid = targets != ignore_index  # (N,)
        lse, z_target, sum_pz = linear_logprob_forward(hidden_c, weight_c, targets, temperature, return_entropy)
        logp = (z_target - lse).masked_fill_(~valid, 0.0)  # (C, N)
        entropy = (lse - sum_pz).masked_fill_(~valid, 0.0) if return_entropy else None

        ctx.save_for_backward(hidden_c, weight_c, targets, lse, sum_pz)
        ctx.temperature, ctx.ignore_index, ctx.logits_budget = temperature, ignore_index, logits_budget
        ctx.in_dtypes = in_dtypes
        ctx.set_materialize_grads(False)
        return (logp,) if entropy is None else (logp, entropy)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None = None):  # each (C, N) or None
        hidden, weight, targets, lse, sum_pz = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        n_ctx, n, h = hidden.shape
        valid = (targets != ctx.ignore_index).repeat(n_ctx)  # (C·N,)
        no_grad = torch.zeros(n_ctx * n, device=lse.device)  # (C·N,): logp unused downstream
        g = grad_logp.reshape(-1).float() * valid if grad_logp is not None else no_grad
        e = grad_entropy.reshape(-1).float() * valid if grad_entropy is not None else None
        # the C contexts are C·N rows with the targets repeated: the single-context backward, chunk by chunk
        grad_hidden, grad_weight = linear_logprob_backward(
            hidden.reshape(n_ctx * n, h), weight, targets.repeat(n_ctx), lse.reshape(-1),
            sum_pz.reshape(-1) if e is not None else None, g, e, ctx.temperature, ctx.logits_budget,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(n_ctx, n, h).to(ctx.in_dtypes[0])
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.in_dtypes[1])
        return grad_hidden, grad_weight, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public ops (the signatures of p2o_lightning.ops)
# ----------------------------------------------------------------------------------------------------------------


def _check(hidden: Tensor, weight: Tensor, temperature: float, logits_budget: int, chunk_size: int | None) -> int:
    """The reference's argument errors; returns the backward's buffer bound in elements (the budget, capped at
    chunk_size × V when a token count is given, as the reference's chunks).
    """
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}")
    chunk_rows(weight.shape[0], logits_budget, chunk_size)  # the same errors as the reference
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits_budget if chunk_size is None else min(logits_budget, chunk_size * weight.shape[0])


def linear_logprob(
    hidden: Tensor,  # (..., H)
    weight: Tensor,  # (V, H)
    targets: Tensor,  # (...) int64
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    logits_budget: int = LOGITS_BUDGET,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Triton twin of :func:`p2o_lightning.ops.linear_logprob`: same arguments, same float32 outputs.

    ``logits_budget`` (elements; capped at ``chunk_size`` × V when a token count is given) bounds the ∂L/∂z buffer
    of the backward; the forward holds no logits at all. Left at its default (``LOGITS_BUDGET``) on a device whose
    tuned file (:mod:`.tuned_configs`) records a measured budget, the backward uses that one; any other value is
    used as given.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} + (H,)")
    logp, entropy = linear_logprob_multi(
        hidden.unsqueeze(0), weight, targets, temperature=temperature, return_entropy=return_entropy,
        ignore_index=ignore_index, logits_budget=logits_budget, chunk_size=chunk_size,
    )  # fmt: skip
    return logp[0], (entropy[0] if entropy is not None else None)


def linear_logprob_multi(
    hidden: Tensor,  # (C, ..., H): C contexts of the same response tokens
    weight: Tensor,  # (V, H)
    targets: Tensor,  # (...) int64, shared by the contexts
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    logits_budget: int = LOGITS_BUDGET,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) of the same targets under C contexts in one launch: each weight tile is loaded
    once for all C contexts. ``linear_logprob_multi(stack([h_x, h_tx]), W, y)`` gives log π(y|x) and
    log π(y|template(x)) for P²O's context ratio mask. Returns ``(logp, entropy)`` of shape (C, ...) float32;
    equal to C calls of :func:`linear_logprob` (the backward is the single-context one, row chunk by row chunk).
    """
    if hidden.ndim < 2 or hidden.shape[1:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be (C,) + targets {tuple(targets.shape)} + (H,)")
    budget = _check(hidden, weight, temperature, logits_budget, chunk_size)
    if logits_budget == LOGITS_BUDGET and chunk_size is None:  # the default bound: the device's measured one, if any
        budget = tuned_configs.logits_budget(hidden.device, _compute_dtype(hidden, weight)) or budget
    n_ctx, h = hidden.shape[0], hidden.shape[-1]
    out_shape = hidden.shape[:-1]
    n = math.prod(targets.shape)
    if n == 0 or n_ctx == 0:
        logp = hidden.new_zeros(out_shape, dtype=torch.float32)
        return logp, (torch.zeros_like(logp) if return_entropy else None)
    outs = LinearLogprobFunction.apply(
        hidden.reshape(n_ctx, n, h), weight, targets.reshape(-1).long(), float(temperature), return_entropy,
        ignore_index, budget,
    )  # fmt: skip
    logp = outs[0].view(out_shape)
    entropy = outs[1].view(out_shape) if return_entropy else None
    return logp, entropy
