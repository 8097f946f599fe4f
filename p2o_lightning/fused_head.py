r"""The fused head of a single PPO update: the policy loss's gradient taken inside the log-prob pass (reference op).

When a step makes one PPO update (one epoch, one mini-batch: :func:`~p2o_lightning.step.update.single_update`), π_old
is π_θ detached and every token's ratio is exactly 1. There the loss of :func:`p2o_lightning.ops.policy_loss` is a
sum of per-token terms whose derivative w.r.t. the token's log-prob is known the moment the log-prob is:

    ratio = 1 lies in [1 − clip_low, 1 + clip_high]:  pg = −A·ratio,  ∂pg/∂logp = −A·ratio = −A
    dual-clip caps −A·ratio at −A·c (c > 1) only where ratio > c: never at ratio 1
    P²O's context ratio mask c_t = [low ≤ exp(logp_t − ctx_t) ≤ high] reads the detached log-prob: a 0/1 constant
    the KL term (β > 0), with d = ref − logp:  k1 = −d, k1' = 1;  k2 = ½d², k2' = −d;  k3 = e^d − 1 − d, k3' = 1 − e^d

With m_t the token mask and a_t the aggregation's weight (token-mean 1/Σm, seq-mean-token-mean 1/(Σ_t m_bt · B),
seq-mean-token-sum 1/B; ``num_tokens`` / ``num_seqs`` replace Σm and B as in ``policy_loss``)::

    L   = Σ_t m_t a_t (−A_t c_t + β k(logp_t, ref_t))                        # the loss at ratio 1
    g_t = ∂L/∂logp_t = m_t a_t (−A_t c_t + β k'(logp_t, ref_t))              # elementwise in logp_t

:class:`RatioOneLoss` holds those per-token weights. :func:`fused_linear_policy_loss` then runs the head's backward
in its forward, chunk of token rows by chunk (as Liger-Kernel's fused linear cross-entropy does for its loss): with
z = h Wᵀ / T, lse = log Σ e^z and p = softmax(z)::

    logp      = z_y − lse                  → g = g(logp)
    ∂L/∂z     = g (onehot(y) − p)
    grad_h    = ∂L/∂z · W / T              (C, H) rows of the (N, H) gradient
    grad_W   += ∂L/∂zᵀ · h / T             (V, H), accumulated in float32

What it saves against :func:`~p2o_lightning.ops.linear_logprob` + ``policy_loss`` through autograd: that path
computes each chunk's logits in forward (one (C, V) matmul), then recomputes them in backward before its two
gradient matmuls; here each chunk's logits are computed once: 3 matmuls a chunk instead of 4, and one softmax
exponentiation instead of two. Memory is the same bound: one (C, V) chunk of ~``logits_budget`` logits alive, and the
(N, H) and (V, H) float32 gradients, which the autograd path also builds (held here from the forward to the
backward, which in the update follows at once). The backward only scales the stored gradients by the loss's
upstream gradient.

Not covered, and decided in one place (:meth:`p2o_lightning.step.update.PPOUpdate.plan`, which then runs the unfused
path): ratio ≠ 1 (several epochs or mini-batches; TIS, which weights the advantages with π_old before the update),
the ``tokens`` scope of the context ratio mask on distilled rows (its means divide by the tokens the mask keeps),
and P²O's skill anchor (a second loss, on log π(y|t(x)), with its own gradient).

**bf16 head** (``head_dtype=torch.bfloat16``): the three matmuls take bf16 operands (the weight cast once per call,
each hidden chunk as it is used); the logits are upcast to float32 before the softmax, and the gradients are
accumulated in float32. Meant for CPUs with bf16 matrix units (AMX, AVX512-BF16) and GPUs; its error against the
float32 head is measured by ``benchmarks/bench_head_dtype.py``. torch's CPU matmul returns bf16 logits (no float32
output on CPU), so they are rounded to bf16 before the upcast: that rounding is most of the measured error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from p2o_lightning.loss import KL_ESTIMATORS, LossSettings, aggregation_weights, context_ratio_mask
from p2o_lightning.ops import LOGITS_BUDGET, _float32_region, chunk_rows, kl_penalty

__all__ = ["HEAD_DTYPES", "RatioOneLoss", "fused_linear_policy_loss", "kl_derivative", "softmax_chunk"]

HEAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the settings' names


def kl_derivative(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """∂/∂logp of :func:`p2o_lightning.ops.kl_penalty`, with d = ref_logp − logp: k1 → 1, k2 → −d, k3 → −(e^d − 1)."""
    if estimator == "k1":
        return torch.ones_like(logp)
    diff = ref_logp - logp
    if estimator == "k2":
        return -diff
    if estimator == "k3":
        return -torch.expm1(diff)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


@dataclass(frozen=True)
class RatioOneLoss:
    """:func:`p2o_lightning.ops.policy_loss` at ratio 1, as per-token weights (every tensor (B, T), no gradient).

    ``L = Σ_t pg_t · c_t + kl_t · k(logp_t, ref_t)``, with c_t the context ratio mask of the token (1 without
    ``context_logp`` or without ``settings.context_ratio_bounds``). Build it with :meth:`of`, from the arguments
    ``policy_loss`` takes.
    """

    pg: Tensor  # (B, T) −A_t m_t a_t: the PPO term's value and its derivative at ratio 1
    kl: Tensor | None  # (B, T) β m_t a_t; None without the KL term
    ref_logp: Tensor | None  # (B, T) log π_ref(y_t), with ``kl``
    settings: LossSettings
    context_logp: Tensor | None = None  # (B, T) log π_old(y_t | t(x)): the ratio mask's other log-prob

    @classmethod
    def of(
        cls,
        advantages: Tensor,  # (B,) or (B, T)
        mask: Tensor,  # (B, T)
        settings: LossSettings,
        *,
        ref_logp: Tensor | None = None,
        num_tokens: Tensor | float | None = None,
        num_seqs: Tensor | float | None = None,
        context_logp: Tensor | None = None,
    ) -> RatioOneLoss:
        """The weights of ``policy_loss(logp, logp.detach(), advantages, mask, settings, ...)`` (the clip settings do
        not matter at ratio 1; a_t are :func:`~p2o_lightning.loss.aggregation_weights`). The context ratio mask
        applies once ``context_logp`` is given (here or by :meth:`with_context`).
        """
        if settings.kl_coef > 0 and ref_logp is None:
            raise ValueError(f"kl_coef={settings.kl_coef} > 0 needs ref_logp (the reference model's log-probs)")
        m = mask.float()  # (B, T)
        weight = m * aggregation_weights(m, settings.loss_agg, num_tokens, num_seqs)  # m_t a_t
        adv = (advantages if advantages.ndim == 2 else advantages[:, None]).float()  # (B, T) or (B, 1)
        with_kl = settings.kl_coef > 0
        loss = cls(
            pg=(-adv * weight).detach(),
            kl=(settings.kl_coef * weight).detach() if with_kl else None,
            ref_logp=ref_logp.detach().float() if with_kl else None,
            settings=settings,
        )
        return loss if context_logp is None else loss.with_context(context_logp)

    def with_context(self, context_logp: Tensor) -> RatioOneLoss:
        """These weights with the context ratio mask's log π_old(y | t(x)) (unused without ``context_ratio_bounds``).
        The ``tokens`` scope divides by the tokens the mask keeps, which depend on the log-probs: refused.
        """
        scope = self.settings.context_mask_scope
        if self.settings.context_ratio_bounds is not None and scope != "policy_gradient":
            raise ValueError(
                f"context_mask_scope={scope!r}: its means divide by the tokens the context ratio mask "
                "keeps, not known before the log-probs; the fused head supports the 'policy_gradient' scope"
            )
        return dataclasses.replace(self, context_logp=context_logp.detach().float())

    def narrow(self, width: int) -> RatioOneLoss:
        """The first ``width`` token columns (a trimmed micro-batch: the dropped columns are masked in every row)."""
        cut = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v[:, :width] for k, v in cut.items() if isinstance(v, Tensor)})

    def flat(self) -> RatioOneLoss:
        """Every tensor flattened to (B·T,): the token rows of the fused op."""
        cut = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v.reshape(-1) for k, v in cut.items() if isinstance(v, Tensor)})

    @property
    def masked(self) -> bool:
        return self.settings.context_ratio_bounds is not None and self.context_logp is not None

    def terms(self, logp: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        """``(l_t, ∂L/∂logp_t)`` of the flat token ``rows`` (after :meth:`flat`) at their log-probs ``logp``."""
        pg = self.pg[rows].to(logp.dtype)
        if self.masked:
            pg = pg * context_ratio_mask(logp, self.context_logp[rows], self.settings.context_ratio_bounds)
        if self.kl is None:
            return pg, pg
        kl, ref = self.kl[rows].to(logp.dtype), self.ref_logp[rows].to(logp.dtype)
        estimator = self.settings.kl_estimator
        return pg + kl * kl_penalty(logp, ref, estimator), pg + kl * kl_derivative(logp, ref, estimator)


def softmax_chunk(
    z: Tensor,  # (C, V) the chunk's logits z = h Wᵀ / T, in the matmul's dtype
    targets: Tensor,  # (C,) int64
    loss: RatioOneLoss,  # flat
    rows: slice,  # the chunk's token rows
    ignore_index: int,
    return_entropy: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One chunk's ``(logp, entropy or None, token losses, ∂L/∂z)``: softmax in float32, the loss terms at the
    log-probs, then ∂L/∂z = g (onehot(y) − p) in the dtype of ``z`` (the Triton twin: ``kernels/fused_head.py``).
    """
    valid = targets != ignore_index  # (C,)
    safe_targets = targets.masked_fill(~valid, 0)[:, None]  # (C, 1)
    z32 = z.float()  # (C, V); no copy for a float32 head
    z_max = z32.amax(dim=-1, keepdim=True)  # (C, 1)
    z_target = z32.gather(1, safe_targets).squeeze(1)  # (C,)
    p = (z32 - z_max).exp_() if return_entropy else z32.sub_(z_max).exp_()  # (C, V) unnormalised
    sum_exp = p.sum(dim=-1)  # (C,)
    lse = z_max.squeeze(1) + sum_exp.log()  # (C,)
    logp = (z_target - lse) * valid
    entropy = (lse - torch.linalg.vecdot(p, z32) / sum_exp) * valid if return_entropy else None  # lse − Σ p z
    del z32
    value, g = loss.terms(logp, rows)  # (C,) each: the token losses and ∂L/∂logp
    g = g * valid
    dz = p.mul_((-g / sum_exp)[:, None])  # (C, V): −g·softmax, in place of the exponentials
    dz.scatter_add_(1, safe_targets, g[:, None])  # + g·onehot(y) → ∂L/∂z
    return logp, entropy, value * valid, dz.to(z.dtype)


class FusedLinearPolicyLoss(torch.autograd.Function):
    """The loss of :class:`RatioOneLoss` from hidden states and the LM head, its gradients computed in forward.

    Per chunk of token rows: the logits by one matmul, ``chunk(z, …)`` → (logp, entropy, token losses, ∂L/∂z)
    (:func:`softmax_chunk`, or the Triton kernel's launcher), then grad_hidden's rows and grad_weight's sum by two
    matmuls. Backward scales the stored gradients by the loss's upstream gradient.
    """

    @staticmethod
    @_float32_region
    def forward(
        ctx,
        hidden: Tensor,  # (N, H)
        weight: Tensor,  # (V, H)
        targets: Tensor,  # (N,) int64
        loss: RatioOneLoss,  # flat: every tensor (N,)
        temperature: float,
        return_entropy: bool,
        ignore_index: int,
        chunk_size: int,
        head_dtype: torch.dtype,  # the matmuls' operand dtype
        chunk: Callable,  # softmax_chunk or its Triton twin
    ) -> tuple[Tensor, ...]:
        n_tokens, h = hidden.shape
        w = weight.to(head_dtype)  # (V, H); no copy when the weight is in the head's dtype already
        logp = hidden.new_empty(n_tokens, dtype=torch.float32)  # (N,)
        entropy = torch.empty_like(logp) if return_entropy else None  # (N,)
        total = hidden.new_zeros((), dtype=torch.float32)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = hidden.new_empty(n_tokens, h, dtype=torch.float32) if need_hidden else None  # (N, H)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None  # (V, H)
        for start in range(0, n_tokens, chunk_size):
            rows = slice(start, min(start + chunk_size, n_tokens))
            h_t = (hidden[rows].float() / temperature).to(head_dtype)  # (C, H): z = h_t Wᵀ
            z = h_t @ w.T  # (C, V): the chunk's only logits, computed once
            logp[rows], chunk_entropy, token_loss, dz = chunk(
                z, targets[rows], loss, rows, ignore_index, return_entropy
            )
            del z
            if entropy is not None:
                entropy[rows] = chunk_entropy
            total += token_loss.sum()
            if grad_hidden is not None:
                grad_hidden[rows] = (dz @ w).float() / temperature  # (C, H)
            if grad_weight is None:
                pass
            elif head_dtype == torch.float32:
                grad_weight.addmm_(dz.T, h_t)  # (V, H): Σ_chunks ∂L/∂zᵀ h / T
            else:
                grad_weight += dz.T @ h_t  # a (V, H) 16-bit product, summed in float32
            del dz

        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.in_dtypes, ctx.used = (hidden.dtype, weight.dtype), False
        ctx.set_materialize_grads(False)
        if entropy is None:
            ctx.mark_non_differentiable(logp)
            return total, logp
        ctx.mark_non_differentiable(logp, entropy)
        return total, logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor | None, *_unused):  # the log-probs and entropy carry no gradient
        if ctx.used:
            raise RuntimeError("the fused head's backward runs once: it scales its stored gradients in place")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 10
        scale = grad_loss.float()
        # in place: a (V, H) float32 copy of grad_weight would raise the step's peak memory by its size
        return (
            grad_hidden.mul_(scale).to(ctx.in_dtypes[0]) if grad_hidden is not None else None,
            grad_weight.mul_(scale).to(ctx.in_dtypes[1]) if grad_weight is not None else None,
            *(None,) * 8,
        )


def head_dtype_of(weight: Tensor, head_dtype: torch.dtype | None, native: bool) -> torch.dtype:
    """The matmuls' operand dtype: ``head_dtype``; None: float32 (the reference, as :func:`linear_logprob`), or
    with ``native`` (a kernel) the weight's own 16-bit dtype (float32 for float32 and float64 weights).
    """
    if head_dtype is None:
        return weight.dtype if native and weight.dtype in (torch.bfloat16, torch.float16) else torch.float32
    if head_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"head_dtype={head_dtype} is not supported; choose float32, bfloat16 or float16 (or None)")
    return head_dtype


def apply_fused_head(
    chunk: Callable,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    loss: RatioOneLoss,
    temperature: float,
    return_entropy: bool,
    ignore_index: int,
    logits_budget: int,
    chunk_size: int | None,
    head_dtype: torch.dtype | None,
    native: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check the arguments and run :class:`FusedLinearPolicyLoss` with ``chunk`` (the reference's or, ``native``, a
    kernel's: see :func:`head_dtype_of`).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} + (H,)")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}")
    if loss.pg.shape != targets.shape:
        raise ValueError(f"the loss's weights {tuple(loss.pg.shape)} must have the shape of targets {targets.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = chunk_rows(weight.shape[0], logits_budget, chunk_size)
    outs = FusedLinearPolicyLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(), loss.flat(), float(temperature),
        return_entropy, ignore_index, rows, head_dtype_of(weight, head_dtype, native), chunk,
    )  # fmt: skip
    entropy = outs[2].view(targets.shape) if return_entropy else None
    return outs[0], outs[1].view(targets.shape), entropy


def fused_linear_policy_loss(
    hidden: Tensor,  # (..., H)
    weight: Tensor,  # (V, H)
    targets: Tensor,  # (...) int64
    loss: RatioOneLoss,  # its tensors of the shape of targets
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    logits_budget: int = LOGITS_BUDGET,
    chunk_size: int | None = None,
    head_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(L, logp, entropy)``: the policy loss at ratio 1 (a scalar with the gradient of hidden and weight), and the
    per-token log-probs and entropy (float32, no gradient) of ``softmax(hidden @ weight.T / temperature)``.

    ``L`` equals ``policy_loss(logp, logp.detach(), ...)`` of the arguments ``loss`` was built from, and its
    gradients equal autograd's through :func:`~p2o_lightning.ops.linear_logprob` and that loss; the head's backward
    ran in this forward (see the module's docstring). Rows with ``target == ignore_index`` give 0 and no gradient.
    ``head_dtype``: the matmuls' operand dtype (None: float32, as :func:`~p2o_lightning.ops.linear_logprob`;
    ``torch.bfloat16``: the bf16 head, with a float32 softmax and float32 accumulation of the weight's gradient).
    """
    return apply_fused_head(
        softmax_chunk, hidden, weight, targets, loss, temperature, return_entropy, ignore_index, logits_budget,
        chunk_size, head_dtype,
    )  # fmt: skip
