r"""The fused head of a single PPO update in Triton: log-prob, loss at ratio 1 and ∂L/∂logits in one kernel.

Why
---
With one PPO update per step the ratio is 1 and the loss's gradient w.r.t. each token's log-prob, g_t, is an
elementwise function of that log-prob (:mod:`p2o_lightning.fused_head` derives it). The unfused path —
:mod:`.logprob`'s forward kernel, then its backward — streams the vocabulary twice and computes the logits twice:
forward (the online log-sum-exp, no logits written) and backward (each logit tile recomputed to form ∂L/∂z), i.e.
2·N·H·V FLOPs of logits twice, plus the two gradient matmuls. Here, as in Liger-Kernel's fused linear
cross-entropy, the logits of a chunk of token rows are computed **once**, by cuBLAS, into a bounded (C, V) buffer;
one kernel per chunk reads them, finds lse, logp, the entropy, the loss terms and g, and overwrites the buffer with
∂L/∂z; two more matmuls give the chunk's grad_hidden rows and add its grad_weight. Per chunk::

    z      = (h / T) Wᵀ                     # cuBLAS, (C, V): write C·V
    kernel: pass 1 over V: online max, Σ e^{z−m}, Σ e^{z−m}·z, z_y   # read C·V
            logp = z_y − lse; l, g = loss terms (pg·c + kl·k, pg·c + kl·k'); entropy = lse − Σ p z
            pass 2 over V: ∂L/∂z = g (onehot(y) − e^{z − lse})      # read C·V, write C·V (in place)
    grad_h = ∂L/∂z · W / T,   grad_W += ∂L/∂zᵀ · h / T                # cuBLAS

So 3·2·N·H·V FLOPs instead of 4·2·N·H·V, all three products at cuBLAS speed, for 3 extra passes over a chunk
buffer of ``logits_budget`` elements (Liger's trade); the unfused path writes no logits but recomputes them in
its own kernel. On CPU (``TRITON_INTERPRET=1``) the kernel runs in the interpreter and is tested against the float64
oracle; it has not been timed on a GPU yet.

Loss terms (the constexpr ``KL_EST``: 0 none, 1 / 2 / 3 for k1 / k2 / k3; ``HAS_CTX``: P²O's context ratio mask),
with d = ref − logp::

    c = [log low ≤ logp − ctx ≤ log high]        (1 without HAS_CTX)
    l = pg·c + kl·k(d),   g = pg·c + kl·k'(d)    k1 = −d, k1' = 1;  k2 = ½d², k2' = −d;  k3 = e^d − 1 − d, k3' = 1 − e^d

Dtypes: the logits buffer is in the matmul's dtype (float32, or bf16 / fp16 for 16-bit heads, as Liger's); the
kernel computes in float32 and writes ∂L/∂z back in the buffer's dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from p2o_lightning.fused_head import RatioOneLoss, apply_fused_head
from p2o_lightning.loss import KL_ESTIMATORS
from p2o_lightning.ops import LOGITS_BUDGET

from . import _guard  # noqa: F401  (refuses the top-level name `kernels`)
from .aot import KernelSpace
from .loss import _expm1

__all__ = ["fused_linear_policy_loss"]


# ----------------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _fused_head_kernel(
    Z_ptr,  # pointer to the chunk's logits z = h Wᵀ / T, (C, V); overwritten with ∂L/∂z
    TGT_ptr,  # pointer to the target ids, (C,) int64
    PG_ptr,  # pointer to the PPO term's weights −A·m·a, (C,) float32
    KL_ptr,  # pointer to the KL term's weights β·m·a, (C,) float32; read only if KL_EST
    REF_ptr,  # pointer to log π_ref, (C,) float32; read only if KL_EST
    CTX_ptr,  # pointer to log π_old(y | t(x)), (C,) float32; read only if HAS_CTX
    LOGP_ptr,  # out: log-probs, (C,) float32 (0 on ignored rows)
    ENT_ptr,  # out: entropies, (C,) float32; written only if ENTROPY
    LOSS_ptr,  # out: the token losses l, (C,) float32 (0 on ignored rows)
    V,  # vocabulary size
    stride_z,  # elements between rows of Z
    ignore_index,  # the target id of a row without a token
    log_low,  # log of the context ratio mask's lower bound
    log_high,  # log of its upper bound
    BLOCK_V: tl.constexpr,  # vocabulary columns per step of a row's two sweeps
    KL_EST: tl.constexpr,  # 0: no KL term; 1, 2, 3: k1, k2, k3
    HAS_CTX: tl.constexpr,  # the context ratio mask applies
    ENTROPY: tl.constexpr,  # write the entropy
):
    row = tl.program_id(0)  # one token row per program
    z_row = Z_ptr + row.to(tl.int64) * stride_z
    target = tl.load(TGT_ptr + row)
    valid = target != ignore_index
    # pass 1: the online log-sum-exp (and Σ e^{z−m}·z for the entropy) over the vocabulary, BLOCK_V at a time
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 beyond V
        s = s * alpha + tl.sum(e, axis=0)
        if ENTROPY:
            t = t * alpha + tl.sum(e * tl.where(cols < V, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_target = tl.load(z_row + tl.where(valid, target, 0)).to(tl.float32)
    logp = tl.where(valid, z_target - lse, 0.0)
    tl.store(LOGP_ptr + row, logp)
    if ENTROPY:
        tl.store(ENT_ptr + row, tl.where(valid, lse - t / s, 0.0))

    # the loss terms at ratio 1 and g = ∂L/∂logp
    pg = tl.load(PG_ptr + row)
    if HAS_CTX:
        log_rho = logp - tl.load(CTX_ptr + row)
        pg = tl.where((log_rho >= log_low) & (log_rho <= log_high), pg, 0.0)
    loss = pg
    g = pg
    if KL_EST != 0:
        kl_w = tl.load(KL_ptr + row)
        d = tl.load(REF_ptr + row) - logp
        if KL_EST == 1:
            loss += kl_w * -d
            g += kl_w
        elif KL_EST == 2:
            loss += kl_w * 0.5 * d * d
            g += kl_w * -d
        else:
            em1 = _expm1(d)
            loss += kl_w * (em1 - d)
            g += kl_w * -em1
    loss = tl.where(valid, loss, 0.0)
    g = tl.where(valid, g, 0.0)
    tl.store(LOSS_ptr + row, loss)

    # pass 2: ∂L/∂z = g (onehot(y) − softmax(z)), in place of the logits
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
        dz = -g * tl.exp(z - lse)
        dz = tl.where(cols == target, dz + g, dz)
        tl.store(z_row + cols, dz.to(Z_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------

# The launch configs of a GPU launch: one row per program, its vocabulary in BLOCK_V steps (Liger's cross-entropy
# kernel uses up to 32K columns and 32 warps; 4K columns on 8–16 warps keep 16–32 values a thread). Compiled for
# sm_80, sm_90 and sm_100 by the AOT test (SPACES below).
_FP32_POINTERS = ("PG_ptr", "KL_ptr", "REF_ptr", "CTX_ptr", "LOGP_ptr", "ENT_ptr", "LOSS_ptr")
CONFIGS = (dict(BLOCK_V=4096, num_warps=16, num_stages=2), dict(BLOCK_V=1024, num_warps=8, num_stages=2))
SPACES = (
    KernelSpace(
        "fused_head",
        _fused_head_kernel,
        pointers={"Z_ptr": "in", "TGT_ptr": "*i64", **dict.fromkeys(_FP32_POINTERS, "*fp32")},
        scalars=dict(log_low="fp32", log_high="fp32"),
        configs=CONFIGS,
        dtypes={"fp32": ("fp32", {}), "bf16": ("fp32", {}), "fp16": ("fp32", {})},
        features=dict(KL_EST=(3, 0, 1, 2), HAS_CTX=(True, False), ENTROPY=(True, False)),
        aligned=("stride_z",),
    ),
)


def _config(v: int) -> dict:
    """The launch config for a vocabulary of ``v``: the large step for large vocabularies, and in the interpreter
    256 columns (the tests' odd vocabularies then take several steps, the last one partial).
    """
    if not isinstance(_fused_head_kernel, triton.runtime.JITFunction):  # the interpreter: few, large steps
        return dict(BLOCK_V=min(256, triton.next_power_of_2(v)), num_warps=4)
    return CONFIGS[0] if v >= 16384 else CONFIGS[1]


def kernel_chunk(
    z: Tensor,  # (C, V) the chunk's logits, in the matmul's dtype; overwritten with ∂L/∂z
    targets: Tensor,  # (C,) int64
    loss: RatioOneLoss,  # flat
    rows: slice,  # the chunk's token rows
    ignore_index: int,
    return_entropy: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """:func:`p2o_lightning.fused_head.softmax_chunk` by the kernel: ``(logp, entropy, token losses, ∂L/∂z)``, the
    last being ``z`` itself, overwritten.
    """
    n, v = z.shape
    if z.stride(1) != 1:
        z = z.contiguous()
    out = torch.empty(3, n, device=z.device, dtype=torch.float32)  # logp, entropy, token losses
    pg = loss.pg[rows].float().contiguous()
    kl = loss.kl[rows].float().contiguous() if loss.kl is not None else pg  # placeholders where not read
    ref = loss.ref_logp[rows].float().contiguous() if loss.kl is not None else pg
    ctx = loss.context_logp[rows].float().contiguous() if loss.masked else pg
    low, high = loss.settings.context_ratio_bounds if loss.masked else (1.0, 1.0)
    kl_est = KL_ESTIMATORS.index(loss.settings.kl_estimator) + 1 if loss.kl is not None else 0
    _fused_head_kernel[(n,)](
        z, targets.contiguous(), pg, kl, ref, ctx, out[0], out[1], out[2], v, z.stride(0), ignore_index,
        math.log(low), math.log(high), KL_EST=kl_est,
        HAS_CTX=loss.masked, ENTROPY=return_entropy, **_config(v),
    )  # fmt: skip
    return out[0], (out[1] if return_entropy else None), out[2], z


def fused_linear_policy_loss(
    hidden: Tensor,  # (..., H)
    weight: Tensor,  # (V, H)
    targets: Tensor,  # (...) int64
    loss: RatioOneLoss,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    logits_budget: int = LOGITS_BUDGET,
    chunk_size: int | None = None,
    head_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Triton twin of :func:`p2o_lightning.fused_head.fused_linear_policy_loss`: same arguments, same outputs; each
    chunk's softmax, loss terms and ∂L/∂z in :func:`_fused_head_kernel`, its three products torch matmuls (cuBLAS).
    ``head_dtype`` None is the weight's dtype (as the log-prob kernel's tiles; float32 for float64). A 16-bit head
    keeps its logits and ∂L/∂z in 16 bits (as Liger's); the kernel computes in float32.
    """
    return apply_fused_head(
        kernel_chunk, hidden, weight, targets, loss, temperature, return_entropy, ignore_index, logits_budget,
        chunk_size, head_dtype, native=True,
    )  # fmt: skip
