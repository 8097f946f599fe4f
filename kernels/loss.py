r"""Fused PPO-clip + KL policy loss with P²O's context ratio mask, forward and backward, in Triton.

Why
---
The reference :func:`p2o_lightning.ops.policy_loss` is ~40 elementwise torch ops over the (B, T) token grid:
ratio, two clipped branches, their max, the dual-clip cap, the KL estimator, the context ratio mask, the masked
sums of the loss and of eight statistics — each op reads one or two (B, T) tensors and writes one. Counted with a
dispatch hook (``benchmarks/bench_loss.py``, P²O's setting: KL k3, dual-clip, context ratio mask) the forward is
100 ops moving ~400 bytes per token, where its compulsory traffic is 17 (logp, old_logp, ref_logp, context_logp at
4 bytes, the mask at 1); forward and backward are 131 ops and ~650 bytes per token against 38 — and autograd keeps
a dozen (B, T) intermediates alive between the two. On a GPU that is ~130 launches of a few µs each besides.

Three kernels replace it (two launches forward, one backward, no torch op in between):

- ``_policy_loss_forward_kernel``: one program per sequence walks its T tokens once and writes 12 sums of the
  sequence (loss, PPO term, mask, KL, clipped, dual-clipped, ratio, ½ log-ratio², response tokens, present
  tokens, min and max ratio). Reads the 4–5 (B, T) inputs once (4 bytes a token each, the mask 1), writes 12·B.
- ``_policy_loss_finalize_kernel``: one program reduces the (B, 12) sums to the loss of the chosen aggregation,
  the 9 statistics of the reference (a (9,) float32 vector: the stats dict holds views of it, no extra launch)
  and the weight w_b of each sequence in the loss, which is all the backward needs.
- ``_policy_loss_backward_kernel``: one program per (sequence, tile of tokens) recomputes the per-token derivative
  and writes ∂loss/∂logp. Reads the inputs again, writes B·T. Nothing of size (B, T) is saved between the two.

Per token (m the response mask, c the context ratio mask), with r = exp(logp − old_logp) and A the advantage::

    pg_u = −A·r,   pg_c = −A·clip(r, 1 − clip_low, 1 + clip_high),   pg = max(pg_u, pg_c)   (PPO-clip)
    pg   = −A·c                  where A < 0 and pg > −A·c                                   (dual-clip, c > 1)
    k    = k(logp, ref)          k1 = −d,  k2 = ½ d²,  k3 = e^d − 1 − d,  d = ref − logp        (KL, β > 0)
    c    = [log low ≤ old_logp − context_logp ≤ log high]                                   (context ratio mask)
    l    = c·m·pg + β·n·k,   n = m  (PG_ONLY: the reference)   or   n = c·m  (the mask removes the whole token)

Aggregations (B sequences; n the denominator mask; ``num_tokens`` / ``num_seqs`` replace Σn / B when given)::

    token-mean            L = Σ_bt l / Σ_bt n                   w_b = 1 / Σ_bt n
    seq-mean-token-mean   L = Σ_b (Σ_t l / Σ_t n) / B           w_b = 1 / (Σ_t n_bt · B)
    seq-mean-token-sum    L = Σ_b Σ_t l / B                     w_b = 1 / B

Backward. L = Σ_bt w_b·l_bt, so ∂L/∂logp_bt = g·w_b·(c·m·∂pg/∂logp + β·n·∂k/∂logp), g the upstream grad:

    ∂pg/∂logp = −A·r                 where pg_u > pg_c (the unclipped branch is the max), or r ∈ [1 − ε_l, 1 + ε_h]
              = 0                    where the clipped branch is the strict max, or dual-clip caps the token
              = −A·r / 2             where pg_u = pg_c with r outside the clip range (A = 0: torch.maximum
                                     splits a tie's gradient in halves; kept for exact parity)
    ∂k1/∂logp = 1,   ∂k2/∂logp = −d,   ∂k3/∂logp = −(e^d − 1)

This is exactly what autograd gives for ``logp`` through the reference. ``old_logp``, ``ref_logp``,
``advantages`` and ``context_logp`` get no gradient: they come from no-grad rollout / reference passes, and the
op raises ValueError if one of them requires grad while grad mode is on rather than silently dropping it.
Masked tokens contribute exactly 0 (selected with ``where``, so a non-finite log-prob under a 0 mask cannot turn the
loss into NaN as ``0 · inf`` would). Computed in float32 (float64 for float64 log-probs) like the reference; the
gradient comes back in ``logp``'s dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from p2o_lightning.loss import KL_ESTIMATORS, LOSS_AGGS, LossSettings
from p2o_lightning.ops import check_policy_loss_args

from . import _guard  # noqa: F401  (refuses the top-level name `kernels`)
from .aot import KernelSpace

__all__ = ["policy_loss"]

# columns of the (B, 12) per-sequence partial sums written by the forward kernel
STATS = ("loss", "pg", "mask", "kl", "clip", "dual", "ratio", "approx_kl", "response", "present", "rmin", "rmax")
# the scalar hyper-parameters, passed as one tensor of the compute dtype (exact in float64, no recompilation)
PARAMS = ("ratio_low", "ratio_high", "clip_c", "kl_coef", "log_context_low", "log_context_high")
# the statistics of the reference, in the order the finalize kernel writes them
STAT_KEYS = (
    "pg_loss", "kl", "clip_frac", "dual_clip_frac", "ratio_mean", "ratio_min", "ratio_max", "approx_kl_old",
    "context_masked_frac",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _expm1(x):
    """e^x − 1 to a few ulps without expm1 (Kahan): (u − 1)·x / log u with u = e^x."""
    u = tl.exp(x)
    um1 = u - 1.0
    log_u = tl.log(u)
    y = um1 * x / tl.where(log_u == 0.0, 1.0, log_u)
    y = tl.where(um1 == 0.0, x, y)  # |x| below half an ulp of 1: e^x − 1 = x
    y = tl.where(um1 == -1.0, -1.0, y)  # e^x underflowed
    return tl.where(u == float("inf"), u, y)


@triton.jit
def _token_terms(
    logp,  # log π(y_t), compute dtype
    old,  # log π_old(y_t)
    adv,  # advantage
    ref,  # log π_ref(y_t) (ignored unless HAS_REF)
    ratio_low,  # 1 − clip_low
    ratio_high,  # 1 + clip_high
    clip_c,  # dual-clip bound c (ignored unless DUAL)
    DUAL: tl.constexpr,  # dual-clip on
    HAS_REF: tl.constexpr,  # ref_logp given: compute the KL estimator
    KL_EST: tl.constexpr,  # 1, 2, 3: k1, k2, k3
):
    """Per-token terms and their derivatives wrt logp: (pg, kl, ratio, log_ratio, clipped, dual, d_pg, d_kl)."""
    log_ratio = logp - old
    ratio = tl.exp(log_ratio)
    pg_u = -adv * ratio
    pg_c = -adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
    pg = tl.maximum(pg_u, pg_c)
    in_range = (ratio >= ratio_low) & (ratio <= ratio_high)
    d_pg = tl.where(pg_u > pg_c, pg_u, tl.where(pg_u == pg_c, tl.where(in_range, pg_u, 0.5 * pg_u), 0.0))
    clipped = pg_c > pg_u
    if DUAL:
        pg_cap = -adv * clip_c
        dual = (adv < 0) & (pg > pg_cap)
        pg = tl.where(dual, pg_cap, pg)
        d_pg = tl.where(dual, 0.0, d_pg)
    else:
        dual = tl.zeros_like(ratio) != 0.0  # all False, with the shape of the tile
    kl = tl.zeros_like(logp)
    d_kl = tl.zeros_like(logp)
    if HAS_REF:
        d = ref - logp
        if KL_EST == 1:
            kl = -d
            d_kl = tl.zeros_like(d) + 1.0
        elif KL_EST == 2:
            kl = 0.5 * d * d
            d_kl = -d
        else:
            em1 = _expm1(d)
            kl = em1 - d
            d_kl = -em1
    return pg, kl, ratio, log_ratio, clipped, dual, d_pg, d_kl


@triton.jit
def _load_mask(
    MASK_ptr,  # pointer to the response mask, (B, T)
    CTX_ptr,  # pointer to context_logp, (B, T) (read only if HAS_CTX)
    idx,  # the tile's flat token indices
    ok,  # the tile's in-range tokens
    old,  # the tile's old_logp, compute dtype
    log_low,  # log of the context ratio's lower bound
    log_high,  # log of its upper bound
    HAS_CTX: tl.constexpr,  # apply the context ratio mask
    COMPUTE: tl.constexpr,  # compute dtype
):
    """(response mask, mask after the context ratio mask) of a tile of tokens."""
    response = tl.load(MASK_ptr + idx, mask=ok, other=0).to(COMPUTE)
    mask = response
    if HAS_CTX:
        log_rho = old - tl.load(CTX_ptr + idx, mask=ok, other=0.0).to(COMPUTE)
        mask = tl.where((log_rho >= log_low) & (log_rho <= log_high), response, 0.0)
    return response, mask


@triton.jit
def _policy_loss_forward_kernel(
    LOGP_ptr,  # pointer to logp, (B, T) contiguous
    OLD_ptr,  # pointer to old_logp, (B, T)
    ADV_ptr,  # pointer to the advantages, (B,) or (B, T)
    MASK_ptr,  # pointer to the response mask, (B, T), float or uint8
    REF_ptr,  # pointer to ref_logp, (B, T) (read only if HAS_REF)
    CTX_ptr,  # pointer to context_logp, (B, T) (read only if HAS_CTX)
    PARAMS_ptr,  # pointer to the 6 scalar hyper-parameters (see PARAMS), compute dtype
    PART_ptr,  # out: pointer to the per-sequence sums, (B, 12) compute dtype (see STATS)
    T,  # tokens per sequence
    ADV_PER_TOKEN: tl.constexpr,  # advantages are (B, T) rather than (B,)
    DUAL: tl.constexpr,  # dual-clip on
    HAS_REF: tl.constexpr,  # ref_logp given
    KL_EST: tl.constexpr,  # 1, 2, 3: k1, k2, k3
    KL_IN_LOSS: tl.constexpr,  # kl_coef > 0
    HAS_CTX: tl.constexpr,  # context_logp given
    PG_ONLY: tl.constexpr,  # the context ratio mask cuts the PPO term only (KL and denominators keep the token)
    COMPUTE: tl.constexpr,  # tl.float32 or tl.float64
    BLOCK_T: tl.constexpr,  # tokens per step of the loop
):
    b = tl.program_id(0)  # one sequence per program
    ratio_low = tl.load(PARAMS_ptr + 0)
    ratio_high = tl.load(PARAMS_ptr + 1)
    clip_c = tl.load(PARAMS_ptr + 2)
    kl_coef = tl.load(PARAMS_ptr + 3)
    log_low = tl.load(PARAMS_ptr + 4)
    log_high = tl.load(PARAMS_ptr + 5)
    row = b.to(tl.int64) * T
    if not ADV_PER_TOKEN:
        adv_b = tl.load(ADV_ptr + b).to(COMPUTE)

    zero = tl.zeros((BLOCK_T,), COMPUTE)
    acc_loss, acc_pg, acc_mask, acc_kl, acc_clip, acc_dual = zero, zero, zero, zero, zero, zero
    acc_ratio, acc_akl, acc_resp, acc_present = zero, zero, zero, zero
    r_min = tl.full((BLOCK_T,), float("inf"), COMPUTE)
    r_max = tl.full((BLOCK_T,), float("-inf"), COMPUTE)
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        ok = offs < T
        idx = row + offs
        logp = tl.load(LOGP_ptr + idx, mask=ok, other=0.0).to(COMPUTE)
        old = tl.load(OLD_ptr + idx, mask=ok, other=0.0).to(COMPUTE)
        ref = logp
        if HAS_REF:
            ref = tl.load(REF_ptr + idx, mask=ok, other=0.0).to(COMPUTE)
        if ADV_PER_TOKEN:
            adv = tl.load(ADV_ptr + idx, mask=ok, other=0.0).to(COMPUTE)
        else:
            adv = zero + adv_b  # broadcast the sequence's advantage over the tile
        response, m = _load_mask(MASK_ptr, CTX_ptr, idx, ok, old, log_low, log_high, HAS_CTX, COMPUTE)
        pg, kl, ratio, log_ratio, clipped, dual, _, _ = _token_terms(
            logp, old, adv, ref, ratio_low, ratio_high, clip_c, DUAL, HAS_REF, KL_EST
        )
        n = response if PG_ONLY else m  # the KL term's and the denominators' mask
        on = m != 0.0
        pg_m = tl.where(on, pg * m, 0.0)
        kl_n = tl.where(n != 0.0, kl * n, 0.0)
        if KL_IN_LOSS:
            acc_loss += pg_m + kl_coef * kl_n
        else:
            acc_loss += pg_m
        acc_pg += pg_m
        acc_mask += m
        acc_kl += kl_n
        acc_clip += tl.where(on & clipped, m, 0.0)
        acc_dual += tl.where(on & dual, m, 0.0)
        acc_ratio += tl.where(on, ratio * m, 0.0)
        acc_akl += tl.where(on, 0.5 * log_ratio * log_ratio * m, 0.0)
        acc_resp += response
        present = m > 0.0
        acc_present += tl.where(present, 1.0, 0.0)
        r_min = tl.minimum(r_min, tl.where(present, ratio, float("inf")))
        r_max = tl.maximum(r_max, tl.where(present, ratio, float("-inf")))

    out = PART_ptr + b.to(tl.int64) * 12  # the column order of STATS
    tl.store(out + 0, tl.sum(acc_loss, axis=0))
    tl.store(out + 1, tl.sum(acc_pg, axis=0))
    tl.store(out + 2, tl.sum(acc_mask, axis=0))
    tl.store(out + 3, tl.sum(acc_kl, axis=0))
    tl.store(out + 4, tl.sum(acc_clip, axis=0))
    tl.store(out + 5, tl.sum(acc_dual, axis=0))
    tl.store(out + 6, tl.sum(acc_ratio, axis=0))
    tl.store(out + 7, tl.sum(acc_akl, axis=0))
    tl.store(out + 8, tl.sum(acc_resp, axis=0))
    tl.store(out + 9, tl.sum(acc_present, axis=0))
    tl.store(out + 10, tl.min(r_min, axis=0))
    tl.store(out + 11, tl.max(r_max, axis=0))


@triton.jit
def _policy_loss_backward_kernel(
    LOGP_ptr,  # pointer to logp, (B, T) contiguous
    OLD_ptr,  # pointer to old_logp, (B, T)
    ADV_ptr,  # pointer to the advantages, (B,) or (B, T)
    MASK_ptr,  # pointer to the response mask, (B, T)
    REF_ptr,  # pointer to ref_logp, (B, T) (read only if HAS_REF and KL_IN_LOSS)
    CTX_ptr,  # pointer to context_logp, (B, T) (read only if HAS_CTX)
    PARAMS_ptr,  # pointer to the 6 scalar hyper-parameters, compute dtype
    W_ptr,  # pointer to each sequence's weight w_b in the loss, (B,) compute dtype
    G_ptr,  # pointer to the upstream grad of the loss, a () tensor
    GRAD_ptr,  # out: pointer to ∂loss/∂logp, (B, T) compute dtype
    T,  # tokens per sequence
    ADV_PER_TOKEN: tl.constexpr,  # advantages are (B, T)
    DUAL: tl.constexpr,  # dual-clip on
    HAS_REF: tl.constexpr,  # ref_logp given and in the loss
    KL_EST: tl.constexpr,  # 1, 2, 3
    KL_IN_LOSS: tl.constexpr,  # kl_coef > 0
    HAS_CTX: tl.constexpr,  # context_logp given
    PG_ONLY: tl.constexpr,  # the context ratio mask cuts the PPO term only
    COMPUTE: tl.constexpr,  # tl.float32 or tl.float64
    BLOCK_T: tl.constexpr,  # tokens per program
):
    b = tl.program_id(0)  # sequence
    offs = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # tile of its tokens
    ok = offs < T
    idx = b.to(tl.int64) * T + offs
    ratio_low = tl.load(PARAMS_ptr + 0)
    ratio_high = tl.load(PARAMS_ptr + 1)
    clip_c = tl.load(PARAMS_ptr + 2)
    kl_coef = tl.load(PARAMS_ptr + 3)
    logp = tl.load(LOGP_ptr + idx, mask=ok, other=0.0).to(COMPUTE)
    old = tl.load(OLD_ptr + idx, mask=ok, other=0.0).to(COMPUTE)
    log_low = tl.load(PARAMS_ptr + 4)
    log_high = tl.load(PARAMS_ptr + 5)
    ref = logp
    if HAS_REF:
        ref = tl.load(REF_ptr + idx, mask=ok, other=0.0).to(COMPUTE)
    if ADV_PER_TOKEN:
        adv = tl.load(ADV_ptr + idx, mask=ok, other=0.0).to(COMPUTE)
    else:
        adv = tl.zeros((BLOCK_T,), COMPUTE) + tl.load(ADV_ptr + b).to(COMPUTE)  # the sequence's, over the tile
    response, m = _load_mask(MASK_ptr, CTX_ptr, idx, ok, old, log_low, log_high, HAS_CTX, COMPUTE)
    _, _, _, _, _, _, d_pg, d_kl = _token_terms(
        logp, old, adv, ref, ratio_low, ratio_high, clip_c, DUAL, HAS_REF, KL_EST
    )
    w = tl.load(W_ptr + b) * tl.load(G_ptr).to(COMPUTE)  # g·w_b
    grad = tl.where(m != 0.0, w * m * d_pg, 0.0)
    if KL_IN_LOSS:
        n = response if PG_ONLY else m
        grad += tl.where(n != 0.0, w * kl_coef * n * d_kl, 0.0)
    tl.store(GRAD_ptr + idx, grad, mask=ok)


@triton.jit
def _policy_loss_finalize_kernel(
    PART_ptr,  # pointer to the per-sequence sums, (B, 12) compute dtype (see STATS)
    DEN_ptr,  # pointer to num_tokens (token-mean) / num_seqs (otherwise) given as a tensor; read if DEN_TENSOR
    den_value,  # the same given as a number; used if HAS_DEN and not DEN_TENSOR
    LOSS_ptr,  # out: pointer to the loss, () compute dtype
    STATS_ptr,  # out: pointer to the statistics, (9,) float32 in the order of STAT_KEYS
    W_ptr,  # out: pointer to each sequence's weight w_b in the loss, (B,) compute dtype
    B,  # sequences
    AGG: tl.constexpr,  # 0 token-mean, 1 seq-mean-token-mean, 2 seq-mean-token-sum
    HAS_DEN: tl.constexpr,  # num_tokens / num_seqs given
    DEN_TENSOR: tl.constexpr,  # … as a tensor
    HAS_REF: tl.constexpr,  # ref_logp given: report the KL
    PG_ONLY: tl.constexpr,  # denominators count the response tokens (else the tokens the context mask keeps)
    COMPUTE: tl.constexpr,  # tl.float32 or tl.float64
    BLOCK_B: tl.constexpr,  # sequences per step of the loop
):
    offs = tl.arange(0, BLOCK_B)
    zero = tl.zeros((BLOCK_B,), COMPUTE)
    s_loss, s_pg, s_mask, s_kl, s_clip, s_dual = zero, zero, zero, zero, zero, zero
    s_ratio, s_akl, s_resp, s_present, seq_loss, seq_pg = zero, zero, zero, zero, zero, zero
    r_min = tl.full((BLOCK_B,), float("inf"), COMPUTE)
    r_max = tl.full((BLOCK_B,), float("-inf"), COMPUTE)
    for b0 in range(0, B, BLOCK_B):  # one program: the column sums of the (B, 12) partials
        ok = b0 + offs < B
        row = PART_ptr + (b0 + offs).to(tl.int64) * 12
        loss_b = tl.load(row + 0, mask=ok, other=0.0)
        pg_b = tl.load(row + 1, mask=ok, other=0.0)
        mask_b = tl.load(row + 8 if PG_ONLY else row + 2, mask=ok, other=0.0)  # the sequence's denominator
        s_loss += loss_b
        s_pg += pg_b
        s_mask += tl.load(row + 2, mask=ok, other=0.0)
        seq_loss += loss_b / tl.where(mask_b == 0.0, 1.0, mask_b)  # Σ_t l·m / Σ_t m, 0 for an empty sequence
        seq_pg += pg_b / tl.where(mask_b == 0.0, 1.0, mask_b)
        s_kl += tl.load(row + 3, mask=ok, other=0.0)
        s_clip += tl.load(row + 4, mask=ok, other=0.0)
        s_dual += tl.load(row + 5, mask=ok, other=0.0)
        s_ratio += tl.load(row + 6, mask=ok, other=0.0)
        s_akl += tl.load(row + 7, mask=ok, other=0.0)
        s_resp += tl.load(row + 8, mask=ok, other=0.0)
        s_present += tl.load(row + 9, mask=ok, other=0.0)
        r_min = tl.minimum(r_min, tl.load(row + 10, mask=ok, other=float("inf")))
        r_max = tl.maximum(r_max, tl.load(row + 11, mask=ok, other=float("-inf")))

    n_masked = tl.sum(s_mask, axis=0)
    scalar_zero = tl.sum(zero, axis=0)  # a 0 of the compute dtype, to promote the scalar arguments
    if HAS_DEN:
        if DEN_TENSOR:
            den = tl.load(DEN_ptr).to(COMPUTE)
        else:
            den = scalar_zero + den_value
    elif AGG == 0:
        den = tl.sum(s_resp, axis=0) if PG_ONLY else n_masked
    else:
        den = scalar_zero + B
    den = tl.where(den == 0.0, 1.0, den)  # an empty batch: 0, never NaN
    if AGG == 1:
        loss = tl.sum(seq_loss, axis=0) / den
        pg_loss = tl.sum(seq_pg, axis=0) / den
    else:
        loss = tl.sum(s_loss, axis=0) / den
        pg_loss = tl.sum(s_pg, axis=0) / den
    tl.store(LOSS_ptr, loss)

    n_safe = tl.where(n_masked == 0.0, 1.0, n_masked)  # means over masked tokens
    has_tokens = tl.sum(s_present, axis=0) > 0.0
    n_resp = tl.sum(s_resp, axis=0)
    tl.store(STATS_ptr + 0, pg_loss.to(tl.float32))
    if HAS_REF:
        n_kl = n_resp if PG_ONLY else n_masked
        tl.store(STATS_ptr + 1, (tl.sum(s_kl, axis=0) / tl.where(n_kl == 0.0, 1.0, n_kl)).to(tl.float32))
    else:
        tl.store(STATS_ptr + 1, 0.0)
    tl.store(STATS_ptr + 2, (tl.sum(s_clip, axis=0) / n_safe).to(tl.float32))
    tl.store(STATS_ptr + 3, (tl.sum(s_dual, axis=0) / n_safe).to(tl.float32))
    tl.store(STATS_ptr + 4, tl.where(has_tokens, tl.sum(s_ratio, axis=0) / n_safe, 1.0).to(tl.float32))
    tl.store(STATS_ptr + 5, tl.where(has_tokens, tl.min(r_min, axis=0), 1.0).to(tl.float32))
    tl.store(STATS_ptr + 6, tl.where(has_tokens, tl.max(r_max, axis=0), 1.0).to(tl.float32))
    tl.store(STATS_ptr + 7, (tl.sum(s_akl, axis=0) / n_safe).to(tl.float32))
    tl.store(STATS_ptr + 8, ((n_resp - n_masked) / tl.where(n_resp == 0.0, 1.0, n_resp)).to(tl.float32))

    for b0 in range(0, B, BLOCK_B):  # each sequence's weight in the loss, for the backward
        ok = b0 + offs < B
        if AGG == 1:
            mask_b = tl.load(PART_ptr + (b0 + offs).to(tl.int64) * 12 + (8 if PG_ONLY else 2), mask=ok, other=1.0)
            w = 1.0 / tl.where(mask_b == 0.0, 1.0, mask_b) / den
        else:
            w = zero + 1.0 / den
        tl.store(W_ptr + b0 + offs, w, mask=ok)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    return not isinstance(_policy_loss_forward_kernel, triton.runtime.JITFunction)


# The launch configs of a GPU launch (tokens / sequences per step of a program's loop, 4 warps): compiled for sm_80,
# sm_90 and sm_100 by the AOT test (SPACES below). Below 128 a tile would leave threads idle anyway; 1024 spilled
# (float64 forward: 656 bytes a thread; finalize).
BLOCK_TS = (128, 256, 512)
NUM_WARPS = 4

# The launch spaces (:class:`.aot.KernelSpace`): what the launchers below may pass each kernel.
_DTYPES = {
    "fp32": ("fp32", {"COMPUTE": tl.float32}),
    "bf16": ("fp32", {"COMPUTE": tl.float32}),
    "fp16": ("fp32", {"COMPUTE": tl.float32}),
    "fp64": ("fp64", {"COMPUTE": tl.float64}),
}
_POINTERS = dict(LOGP_ptr="in", OLD_ptr="in", ADV_ptr="in", MASK_ptr="*u8", REF_ptr="in", CTX_ptr="in",
                 PARAMS_ptr="compute")  # fmt: skip
_FEATURES = dict(
    ADV_PER_TOKEN=(True, False), DUAL=(True, False), HAS_REF=(True, False), KL_EST=(3, 1, 2),
    KL_IN_LOSS=(True, False), HAS_CTX=(True, False), PG_ONLY=(True, False),
)  # fmt: skip
_BLOCK_T_CONFIGS = tuple(dict(BLOCK_T=b, num_warps=NUM_WARPS, num_stages=3) for b in BLOCK_TS)
SPACES = (
    KernelSpace(
        "policy_loss_forward",
        _policy_loss_forward_kernel,
        pointers=dict(_POINTERS, PART_ptr="compute"),
        configs=_BLOCK_T_CONFIGS,
        dtypes=_DTYPES,
        features=_FEATURES,
    ),
    KernelSpace(
        "policy_loss_backward",
        _policy_loss_backward_kernel,
        pointers=dict(_POINTERS, W_ptr="compute", G_ptr="compute", GRAD_ptr="compute"),
        configs=_BLOCK_T_CONFIGS,
        dtypes=_DTYPES,
        features=_FEATURES,
    ),
    KernelSpace(
        "policy_loss_finalize",
        _policy_loss_finalize_kernel,
        pointers=dict(PART_ptr="compute", DEN_ptr="compute", LOSS_ptr="compute", STATS_ptr="*fp32", W_ptr="compute"),
        scalars=dict(den_value="fp32"),
        configs=tuple(dict(BLOCK_B=b, num_warps=NUM_WARPS, num_stages=3) for b in BLOCK_TS),
        dtypes={k: (c, {"COMPUTE": v["COMPUTE"]}) for k, (c, v) in _DTYPES.items() if k in ("fp32", "fp64")},
        features=dict(
            AGG=(1, 0, 2), HAS_DEN=(True, False), DEN_TENSOR=(True, False), HAS_REF=(True, False), PG_ONLY=(True, False)
        ),
    ),
)


def _block_t(t: int) -> int:
    """Tokens (or sequences) per tile: the smallest of BLOCK_TS that holds ``t``, else the largest (a GPU launch);
    up to 4096 in the interpreter, where fewer, larger tiles are faster.
    """
    if _interpreted():
        return min(triton.next_power_of_2(max(t, 1)), 4096)
    return min(max(triton.next_power_of_2(max(t, 1)), BLOCK_TS[0]), BLOCK_TS[-1])


@functools.lru_cache(maxsize=64)
def _params(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The scalar hyper-parameters as a device tensor of the compute dtype (exact in float64).

    Built once per setting: a host-to-device copy per call would cost more than the kernels.
    """
    return torch.tensor(values, dtype=dtype, device=device)


def _pointers(inputs: dict[str, Tensor | None]) -> list[Tensor]:
    """The six input pointers; an absent optional input is replaced by logp (never read)."""
    logp = inputs["logp"]
    names = ("logp", "old_logp", "advantages", "mask", "ref_logp", "context_logp")
    return [inputs[k] if inputs[k] is not None else logp for k in names]


def _compute(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def policy_loss_forward(
    inputs: dict[str, Tensor | None],  # the (B, T) tensors, contiguous
    params: Tensor,  # (6,) see PARAMS
    flags: dict,  # the constexpr options
    loss_agg: str,
    den: Tensor | float | None,  # num_tokens (token-mean) or num_seqs (the others)
) -> tuple[Tensor, Tensor, Tensor]:
    """Two launches → (loss (), stats (9,) float32 in the order of STAT_KEYS, weights w_b (B,))."""
    n_seqs, t = inputs["logp"].shape
    compute, device = params.dtype, params.device
    part = torch.empty(n_seqs, len(STATS), device=device, dtype=compute)  # (B, 12)
    if n_seqs > 0:
        _policy_loss_forward_kernel[(n_seqs,)](
            *_pointers(inputs), params, part, t,
            COMPUTE=_compute(compute), BLOCK_T=_block_t(t), num_warps=NUM_WARPS, **flags,
        )  # fmt: skip
    loss = torch.empty((), device=device, dtype=compute)
    stats = torch.empty(len(STAT_KEYS), device=device, dtype=torch.float32)
    weights = torch.empty(n_seqs, device=device, dtype=compute)
    den_tensor = isinstance(den, Tensor)
    _policy_loss_finalize_kernel[(1,)](
        part, den if den_tensor else part, float(den) if den is not None and not den_tensor else 0.0,
        loss, stats, weights, n_seqs,
        AGG=LOSS_AGGS.index(loss_agg), HAS_DEN=den is not None, DEN_TENSOR=den_tensor, HAS_REF=flags["HAS_REF"],
        PG_ONLY=flags["PG_ONLY"], COMPUTE=_compute(compute), BLOCK_B=_block_t(n_seqs),
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return loss, stats, weights


def policy_loss_backward(
    inputs: dict[str, Tensor | None], params: Tensor, flags: dict, weights: Tensor, grad_loss: Tensor
) -> Tensor:
    """One launch → ∂loss/∂logp (B, T) in the compute dtype, from the weights w_b and the upstream grad g."""
    n_seqs, t = inputs["logp"].shape
    grad = torch.empty(n_seqs, t, device=params.device, dtype=params.dtype)
    if grad.numel() == 0:
        return grad
    block_t = _block_t(t)
    _policy_loss_backward_kernel[(n_seqs, triton.cdiv(t, block_t))](
        *_pointers(inputs), params, weights, grad_loss, grad, t,
        COMPUTE=_compute(params.dtype), BLOCK_T=block_t, num_warps=NUM_WARPS, **flags,
    )  # fmt: skip
    return grad


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


class PolicyLossFunction(torch.autograd.Function):
    r"""PPO-clip + KL loss over masked tokens; gradient to ``logp`` only.

        L = Σ_bt w_b · m_bt · (pg_bt + β k_bt),   ∂L/∂logp_bt = g · w_b · m_bt · (∂pg/∂logp + β ∂k/∂logp)

    with w_b the aggregation weight of sequence b (see the module docstring). Returns (loss, stats (9,)); three
    launches in all, nothing of size (B, T) saved beyond the inputs.
    """

    @staticmethod
    def forward(
        ctx,
        logp: Tensor,  # (B, T)
        old_logp: Tensor,  # (B, T)
        advantages: Tensor,  # (B,) or (B, T)
        mask: Tensor,  # (B, T) float or uint8
        ref_logp: Tensor | None,  # (B, T)
        context_logp: Tensor | None,  # (B, T)
        params: Tensor,  # (6,) see PARAMS
        flags: dict,
        loss_agg: str,
        den: Tensor | float | None,
    ) -> tuple[Tensor, Tensor]:
        inputs = dict(
            logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, context_logp=context_logp
        )
        loss, stats, weights = policy_loss_forward(inputs, params, flags, loss_agg, den)
        ctx.save_for_backward(logp, old_logp, advantages, mask, ref_logp, context_logp, params, weights)
        ctx.flags = flags
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros launched for the statistics' (absent) grad
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, grad_stats: Tensor | None):
        if grad_loss is None:
            return (None,) * 10
        logp, old_logp, advantages, mask, ref_logp, context_logp, params, weights = ctx.saved_tensors
        inputs = dict(
            logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, context_logp=context_logp
        )
        grad = policy_loss_backward(inputs, params, ctx.flags, weights, grad_loss)
        return (grad.to(logp.dtype),) + (None,) * 9


# ----------------------------------------------------------------------------------------------------------------
# Public op (the signature of p2o_lightning.ops.policy_loss)
# ----------------------------------------------------------------------------------------------------------------


def _check(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    settings: LossSettings,
    ref_logp: Tensor | None,
    context_logp: Tensor | None,
) -> None:
    """The reference's argument errors (the same function), then this kernel's own: it differentiates wrt logp."""
    check_policy_loss_args(logp, old_logp, advantages, mask, settings, ref_logp, context_logp)
    if torch.is_grad_enabled():
        for name, t in (("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp)):
            if t is not None and t.requires_grad:
                raise ValueError(f"the fused policy loss differentiates wrt logp only; detach {name}")
        if context_logp is not None and context_logp.requires_grad:
            raise ValueError("the fused policy loss differentiates wrt logp only; detach context_logp")


def policy_loss(
    logp: Tensor,  # (B, T) log π(y_t) of the policy being trained
    old_logp: Tensor,  # (B, T) log π_old(y_t) of the rollout policy
    advantages: Tensor,  # (B,) or (B, T)
    mask: Tensor,  # (B, T) bool or 0/1 float
    settings: LossSettings,
    *,
    ref_logp: Tensor | None = None,  # (B, T) log π_ref(y_t), needed when kl_coef > 0
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
    context_logp: Tensor | None = None,  # (B, T) log π_old(y_t | template(x)): P²O's context ratio mask
) -> tuple[Tensor, dict[str, Tensor]]:
    """Triton twin of :func:`p2o_lightning.ops.policy_loss`: the same ``(loss, stats)``, gradient to ``logp`` only."""
    _check(logp, old_logp, advantages, mask, settings, ref_logp, context_logp)
    s = settings
    compute = torch.promote_types(logp.dtype, torch.float32)  # as the reference: bf16 ratios would be too coarse
    if s.context_ratio_bounds is None:
        context_logp = None  # no context ratio mask
    low, high = s.context_ratio_bounds or (1.0, 1.0)
    values = (1.0 - s.clip_low, 1.0 + s.clip_high, s.clip_ratio_c or 0.0, s.kl_coef, math.log(low), math.log(high))
    params = _params(values, compute, logp.device)  # see PARAMS
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # zero-copy: the kernels load bytes
    flags = dict(
        ADV_PER_TOKEN=advantages.ndim == 2,
        DUAL=s.clip_ratio_c is not None,
        HAS_REF=ref_logp is not None,
        KL_EST=KL_ESTIMATORS.index(s.kl_estimator) + 1,
        KL_IN_LOSS=s.kl_coef > 0,
        HAS_CTX=context_logp is not None,
        PG_ONLY=context_logp is not None and s.context_mask_scope == "policy_gradient",
    )
    tensors = [t.contiguous() if t is not None else None for t in (logp, old_logp, advantages, mask)]
    tensors += [t.detach().contiguous() if t is not None else None for t in (ref_logp, context_logp)]
    den = num_tokens if s.loss_agg == "token-mean" else num_seqs
    loss, stats = PolicyLossFunction.apply(*tensors, params, flags, s.loss_agg, den)
    return loss, dict(zip(STAT_KEYS, stats.unbind()))
