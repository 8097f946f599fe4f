"""Reference ops of the GRPO / P²O loss in plain torch: the oracle of every Triton kernel and the path used on CPU.

Four op families, each written once here and imported by the trainer (through
:func:`p2o_lightning.backend.get_ops`), the kernel tests and the benchmarks:

- :func:`linear_logprob` — per-token log π(y_t | ·) (and optionally the entropy) straight from the last hidden
  states and the LM head weight, **chunked over tokens** so the tokens × vocab logits never exist whole: a
  Qwen3 response of 12k tokens × 152k vocab is 7 GiB of float32 logits per sequence, and the policy, the frozen
  reference model and P²O's context ratio mask each need such log-probs. A chunk holds at most
  ``logits_budget`` logits (elements, not tokens: :func:`chunk_rows`), so its memory does not grow with the
  vocabulary.
- :func:`group_advantage` / :func:`collapsed_groups` — GRPO's group-normalised advantage over K rollouts of a
  prompt, and the groups whose rewards have no spread (P²O's *advantage collapse*).
- :func:`kl_penalty` — Schulman's k1 / k2 / k3 estimators of KL(π ‖ π_ref) per token.
- :func:`policy_loss` — PPO-clip with separate low/high clip (DAPO's clip-higher), optional dual-clip, optional
  KL term, and the three usual ways of aggregating token losses.

The fifth op, :func:`p2o_lightning.fused_head.fused_linear_policy_loss` (the loss of a single PPO update with the
head's backward run inside the log-prob pass), builds on these and lives in its own module.

:func:`p2o_lightning.backend.get_ops` chooses between these and the Triton kernels of ``p2o_lightning.kernels``; the
LightningModule only ever calls ops through it and never imports triton.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from p2o_lightning.loss import KL_ESTIMATORS, LossSettings, aggregate, context_ratio_mask, safe_div

__all__ = [
    "LOGITS_BUDGET",
    "chunk_rows",
    "collapsed_groups",
    "check_policy_loss_args",
    "group_advantage",
    "kl_penalty",
    "linear_logprob",
    "linear_logprob_multi",
    "policy_loss",
]

# Logits alive at once in a log-prob chunk (elements): 128 MiB of float32, the 1,024-token chunk of a 32,768-token
# vocabulary; a 151,936-token vocabulary then gets 220-token chunks and costs the same memory.
LOGITS_BUDGET = 2**25


# ----------------------------------------------------------------------------------------------------------------
# Fused linear log-prob (+ entropy), chunked over tokens
# ----------------------------------------------------------------------------------------------------------------


def chunk_rows(vocab: int, logits_budget: int = LOGITS_BUDGET, chunk_size: int | None = None) -> int:
    """Token rows per log-prob chunk: as many as ``logits_budget`` logits allow (≥ 1), capped by ``chunk_size``.

    A (rows, V) chunk then holds at most max(V, logits_budget) elements whatever the vocabulary: the budget, not a
    token count, is what bounds memory (1,024 tokens × 151,936 logits would be 622 MB of float32).
    """
    if logits_budget < 1:
        raise ValueError(f"logits_budget must be >= 1 (elements), got {logits_budget}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (tokens) or None, got {chunk_size}")
    rows = max(1, logits_budget // max(vocab, 1))
    return rows if chunk_size is None else min(rows, chunk_size)


def _float32_region(fn: Callable) -> Callable:
    """Run an autograd Function's forward / backward outside autocast: they compute in float32 by construction, and
    a 16-mixed / bf16-mixed region would recast their chunk matmuls (and break the float32 scatter of backward).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


class _LinearLogprob(torch.autograd.Function):
    r"""Chunked ``log softmax(hidden @ weight.T / T)[target]`` and entropy, never holding the (N, V) logits.

    Per token n, with z = hidden_n @ weight.T / T (a V-vector), lse = log Σ_j exp z_j and p = softmax(z):

        logp_n    = z_target − lse
        entropy_n = −Σ_j p_j log p_j = lse − Σ_j p_j z_j

    Backward, with upstream grads g (on logp) and e (on entropy), s = Σ_k p_k z_k:

        ∂logp/∂z_j    = onehot(target)_j − p_j
        ∂entropy/∂z_j = −p_j (z_j − s)
        ∂L/∂z_j       = g·onehot_j − p_j (g + e (z_j − s))
        grad_hidden   = (∂L/∂z @ weight) / T                        # per chunk, (C, H)
        grad_weight   = Σ_chunks ∂L/∂z.T @ (hidden_chunk / T)       # (V, H), accumulated in float32

    The temperature is folded into the hidden chunk, z = (hidden / T) @ weight.T: a (C, H) scaling, not (C, V).

    Forward saves (hidden, weight, targets, lse) only; backward recomputes each chunk's logits. Everything is
    computed in float32 (the weight is upcast once per call: a (V, H) copy when it is not float32 already), and the
    gradients are cast back to the input dtypes. Rows with target == ignore_index give 0 and get no gradient.
    """

    @staticmethod
    @_float32_region
    def forward(
        ctx,
        hidden: Tensor,  # (N, H), any float dtype
        weight: Tensor,  # (V, H)
        targets: Tensor,  # (N,) int64
        temperature: float,
        return_entropy: bool,
        ignore_index: int,
        chunk_size: int,
    ) -> tuple[Tensor, ...]:
        n_tokens = hidden.shape[0]
        w32 = weight.float()  # (V, H); no copy when weight is float32
        valid = targets != ignore_index  # (N,)
        safe_targets = targets.masked_fill(~valid, 0)  # (N,)
        lse = hidden.new_empty(n_tokens, dtype=torch.float32)  # (N,)
        logp = hidden.new_empty(n_tokens, dtype=torch.float32)  # (N,)
        entropy = hidden.new_empty(n_tokens, dtype=torch.float32) if return_entropy else None  # (N,)

        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            # the only vocab-wide tensors ever alive: this chunk's z and exp(z − max)
            z = (hidden[start:end].float() / temperature) @ w32.T  # (C, V)
            z_max = z.amax(dim=-1, keepdim=True)  # (C, 1)
            z_target = z.gather(1, safe_targets[start:end, None]).squeeze(1)  # (C,)
            # without entropy z is not needed again: exponentiate in place, one (C, V) buffer
            exp_z = (z - z_max).exp_() if entropy is not None else z.sub_(z_max).exp_()  # (C, V)
            sum_exp = exp_z.sum(dim=-1)  # (C,)
            chunk_lse = z_max.squeeze(1) + sum_exp.log()  # (C,)  (torch.logsumexp is ~5× slower on CPU)
            lse[start:end] = chunk_lse
            logp[start:end] = z_target - chunk_lse
            if entropy is not None:
                entropy[start:end] = chunk_lse - torch.linalg.vecdot(exp_z, z) / sum_exp  # lse − Σ p z
            del z, exp_z

        logp.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.ignore_index, ctx.chunk_size = temperature, ignore_index, chunk_size
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None: skip its work
        if entropy is None:
            return (logp,)
        entropy.masked_fill_(~valid, 0.0)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_float32_region
    def backward(ctx, grad_logp: Tensor, grad_entropy: Tensor | None = None):  # each (N,) or None
        hidden, weight, targets, lse = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        n_tokens = hidden.shape[0]
        valid = targets != ctx.ignore_index  # (N,)
        safe_targets = targets.masked_fill(~valid, 0)  # (N,)
        g = grad_logp.float() * valid if grad_logp is not None else torch.zeros_like(lse)  # (N,)
        e = grad_entropy.float() * valid if grad_entropy is not None else None  # (N,)

        w32 = weight.float()  # (V, H)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if need_hidden else None  # (N, H)
        grad_weight = torch.zeros_like(w32) if need_weight else None  # (V, H) float32 accumulator
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h_t = hidden[start:end].float() / temperature  # (C, H): z = h_t @ w.T, so ∂L/∂h = (∂L/∂z @ w) / T
            z = h_t @ w32.T  # (C, V)
            g_c = g[start:end, None]  # (C, 1)
            if e is not None:
                p = z.sub(lse[start:end, None]).exp_()  # (C, V)
                s = torch.linalg.vecdot(p, z)[:, None]  # (C, 1): Σ_k p_k z_k
                dz = p.mul_(z.sub_(s).mul_(e[start:end, None]).add_(g_c)).neg_()  # (C, V): −p (g + e (z − s))
            else:
                dz = z.sub_(lse[start:end, None]).exp_().mul_(-g_c)  # (C, V): −p g, in place of z
            del z
            dz.scatter_add_(1, safe_targets[start:end, None], g_c)  # + g · onehot(target) → ∂L/∂z
            if grad_hidden is not None:
                torch.mm(dz, w32, out=grad_hidden[start:end])  # (C, H)
                if temperature != 1.0:
                    grad_hidden[start:end] /= temperature
            if grad_weight is not None:
                grad_weight.addmm_(dz.T, h_t)  # (V, H): Σ_chunks ∂L/∂z.T @ h / T
            del dz

        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


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
    r"""Per-token log-prob of ``targets`` (and entropy) under ``softmax(hidden @ weight.T / temperature)``.

    With z = hidden @ weight.T / temperature and lse = logsumexp(z):
    ``logp = z[target] − lse`` and ``entropy = lse − Σ_j softmax(z)_j z_j``, both float32 of the shape of
    ``targets``. Rows with ``target == ignore_index`` give 0 log-prob and 0 entropy and get no gradient.

    Token rows are processed :func:`chunk_rows` at a time — ``logits_budget // V`` rows, at most ``chunk_size`` when
    given — so at most one (rows, V) float32 block of ~``logits_budget`` logits is alive in forward or backward
    (plus one (V, H) float32 copy of the weight when it is not float32, and the (V, H)
    float32 grad_weight accumulator); forward saves only (hidden, weight, targets, lse). ``hidden`` and ``weight``
    may require grad independently; under ``torch.no_grad`` (a frozen reference model) nothing is kept.

    Returns ``(logp, entropy)``; ``entropy`` is None unless ``return_entropy``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} + (H,)")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}")
    rows = chunk_rows(weight.shape[0], logits_budget, chunk_size)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out_shape = targets.shape
    outs = _LinearLogprob.apply(
        hidden.reshape(-1, hidden.shape[-1]),  # (N, H)
        weight,
        targets.reshape(-1).long(),  # (N,)
        float(temperature),
        return_entropy,
        ignore_index,
        rows,
    )
    logp = outs[0].view(out_shape)
    entropy = outs[1].view(out_shape) if return_entropy else None
    return logp, entropy


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
    """Log-probs (and entropies) of the same ``targets`` under C contexts, in one call: shape (C, ...) float32.

    P²O's context ratio mask compares log π(y | x) with log π(y | template(x)) for the same response tokens:
    ``linear_logprob_multi(stack([h_x, h_tx]), W, y)`` gives both. Here the C contexts' rows are concatenated and
    go through :func:`linear_logprob` once (the weight is upcast once, the chunks run over C·N rows); the Triton
    twin streams each weight tile once for all C contexts. Equal to C calls of :func:`linear_logprob`.
    """
    if hidden.ndim < 2 or hidden.shape[1:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be (C,) + targets {tuple(targets.shape)} + (H,)")
    n_ctx = hidden.shape[0]
    logp, entropy = linear_logprob(
        hidden.reshape(n_ctx, -1, hidden.shape[-1]),  # (C, N, H)
        weight,
        targets.reshape(1, -1).expand(n_ctx, -1),  # (C, N)
        temperature=temperature,
        return_entropy=return_entropy,
        ignore_index=ignore_index,
        logits_budget=logits_budget,
        chunk_size=chunk_size,
    )
    out_shape = hidden.shape[:-1]
    return logp.view(out_shape), (entropy.view(out_shape) if entropy is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# Group advantage
# ----------------------------------------------------------------------------------------------------------------


def group_advantage(rewards: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's group-normalised advantage of K rollouts per prompt.

    ``rewards`` (B, K): B prompts × K rollouts → advantages (B, K), one per rollout (broadcast over its tokens):

        A = (r − mean_K(r)) / (std_K(r) + eps)    # GRPO, std unbiased (÷ K−1) as verl's GRPO
        A =  r − mean_K(r)                        # norm_by_std=False (Dr. GRPO)

    A group with no spread (all rollouts right or all wrong) gets A = 0: P²O's advantage collapse. K = 1 gives
    zeros (verl instead passes a lone reward through unnormalised). Integer / bool rewards become float32.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (B, K), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if rewards.shape[1] == 1:
        return torch.zeros_like(rewards)
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # (B, K)
    if not norm_by_std:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)  # unbiased std, (B, 1)


def collapsed_groups(rewards: Tensor) -> Tensor:
    """Flag the groups whose K rewards are all equal (zero spread → zero advantage): (B, K) → (B,) bool."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (B, K), got shape {tuple(rewards.shape)}")
    return rewards.amax(dim=1) == rewards.amin(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# KL penalty and PPO-clip policy loss
# ----------------------------------------------------------------------------------------------------------------


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Schulman's per-token estimators of KL(π ‖ π_ref) from sampled tokens, differentiated wrt ``logp``.

    With d = ref_logp − logp (log of π_ref/π at the sampled token):

        k1 = −d                    # unbiased, can be negative
        k2 = ½ d²                  # biased, low variance
        k3 = exp(d) − d − 1        # unbiased, ≥ 0, low variance (verl's "low_var_kl", unclamped here)
    """
    diff = ref_logp - logp
    if estimator == "k1":
        return -diff
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "k3":
        return torch.expm1(diff) - diff
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def tis_weights(old_logp: Tensor, sampling_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling: w_t = min(π_old(y_t) / π_rollout(y_t), C), a constant (no gradient).

    The rollout engine (vLLM, bf16 kernels, another attention) samples from π_rollout, which is not exactly the
    trainer's π_old of the same weights; the PPO ratio π/π_old then corrects nothing for that gap. TIS (Yao et al.
    2025; verl ``tis_imp_ratio_cap``, TRL ``vllm_importance_sampling_cap``) multiplies each token's policy-gradient
    term by the capped ratio. Computed in log space, so a large gap cannot overflow::

        w = exp(min(old_logp − sampling_logp, log C))           # (B, T), ≤ C

    Because w > 0, scaling the PPO term by w equals scaling the token's advantage by w (clip and dual-clip pick the
    same branch), which is how the trainer applies it: advantages of shape (B, T).
    """
    if cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    log_w = (old_logp.float() - sampling_logp.float()).clamp(max=math.log(cap))
    return torch.exp(log_w).detach()


def check_policy_loss_args(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    settings: LossSettings,
    ref_logp: Tensor | None,
    context_logp: Tensor | None,
) -> None:
    """The argument errors of :func:`policy_loss`, shared with the fused Triton loss so both say the same (the
    settings checked themselves when they were built).
    """
    if not isinstance(settings, LossSettings):
        raise TypeError(f"settings must be a LossSettings (p2o_lightning.loss), got {type(settings).__name__}")
    if not (logp.shape == old_logp.shape == mask.shape) or logp.ndim != 2:
        shapes = f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask {tuple(mask.shape)}"
        raise ValueError(f"{shapes}: all must be (B, T)")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (B,) or (B, T) for logp {tuple(logp.shape)}")
    if settings.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={settings.kl_coef} > 0 needs ref_logp (the reference model's log-probs)")
    for name, t in (("ref_logp", ref_logp), ("context_logp", context_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match logp {tuple(logp.shape)}")


def policy_loss(
    logp: Tensor,  # (B, T) log π(y_t) of the policy being trained
    old_logp: Tensor,  # (B, T) log π_old(y_t) of the rollout policy
    advantages: Tensor,  # (B,) or (B, T)
    mask: Tensor,  # (B, T) bool or 0/1 float: response tokens (× any extra mask, e.g. P²O's context ratio mask)
    settings: LossSettings,
    *,
    ref_logp: Tensor | None = None,  # (B, T) log π_ref(y_t), needed when kl_coef > 0
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
    context_logp: Tensor | None = None,  # (B, T) log π_old(y_t | template(x)): P²O's context ratio mask
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy-gradient loss with clip-higher, optional dual-clip and KL term; returns ``(loss, stats)``.

    With s = ``settings`` (:class:`~p2o_lightning.loss.LossSettings`), per token, ratio = exp(logp − old_logp) and A
    the advantage::

        pg = max(−A · ratio, −A · clip(ratio, 1 − s.clip_low, 1 + s.clip_high))   # PPO-clip, DAPO's clip-higher
        pg = min(pg, −A · s.clip_ratio_c)      where A < 0, if s.clip_ratio_c    # dual-clip (verl), c > 1
        l  = pg + s.kl_coef · kl_penalty(logp, ref_logp, s.kl_estimator)         # KL term only if kl_coef > 0

    aggregated over the masked tokens by :func:`~p2o_lightning.loss.aggregate` (``s.loss_agg``); ``num_tokens`` /
    ``num_seqs`` let a caller normalise micro-batches by the whole mini-batch, so that the sum of the micro-batch
    losses equals the loss of the mini-batch in one piece. Computed in float32 (or float64) whatever the dtype of
    the log-probs.

    P²O's context ratio mask: when ``context_logp`` (the rollout policy's log-probs of the same tokens under the
    templated prompt) is given and ``s.context_ratio_bounds`` is set, tokens with ρ = exp(old_logp − context_logp)
    outside the bounds are cut (c = :func:`~p2o_lightning.loss.context_ratio_mask`). ``s.context_mask_scope`` says
    what the cut removes:

        "policy_gradient"   l = c·m·pg + β·m·kl,  means divide by Σ m     (the reference: a masked token stays in
                                                                           the denominator, its KL term is kept)
        "tokens"            l = c·m·(pg + β·kl),  means divide by Σ c·m   (the token leaves the loss entirely)

    ``num_tokens`` should count the tokens a mean divides by: the response tokens (× any other mask) for
    ``policy_gradient``, the kept ones for ``tokens``.

    ``stats`` (detached float32 scalars, means over masked tokens):
    ``pg_loss`` (the PPO term alone, aggregated like the loss), ``kl`` (the estimator's mean when ``ref_logp`` is
    given, else 0), ``clip_frac`` (share of tokens where the clipped branch is taken), ``dual_clip_frac`` (share of
    tokens where dual-clip caps the loss), ``ratio_mean`` / ``ratio_min`` / ``ratio_max`` (1 when there are no
    tokens), ``approx_kl_old`` (mean of ½ (logp − old_logp)², the k2 estimate of KL(π_old ‖ π)),
    ``context_masked_frac`` (share of response tokens the context ratio mask dropped; 0 without it).
    """
    check_policy_loss_args(logp, old_logp, advantages, mask, settings, ref_logp, context_logp)
    s = settings
    clip_low, clip_high, clip_ratio_c, kl_coef = s.clip_low, s.clip_high, s.clip_ratio_c, s.kl_coef

    dtype = torch.promote_types(logp.dtype, torch.float32)  # ratios of bf16 log-probs would be far too coarse
    logp, old_logp = logp.to(dtype), old_logp.to(dtype)
    ref_logp = ref_logp.to(dtype) if ref_logp is not None else None
    response_mask = mask.to(dtype)  # (B, T)
    mask = response_mask  # the tokens of the PPO term and its statistics
    if context_logp is not None and s.context_ratio_bounds is not None:
        mask = mask * context_ratio_mask(old_logp, context_logp.to(dtype), s.context_ratio_bounds).to(dtype)
    den_mask = response_mask if s.context_mask_scope == "policy_gradient" else mask  # (B, T): denominators and KL
    adv = (advantages if advantages.ndim == 2 else advantages[:, None]).to(dtype)  # (B, T) or (B, 1)
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_unclipped = -adv * ratio  # (B, T)
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    pg = torch.maximum(pg_unclipped, pg_clipped)  # (B, T)
    if clip_ratio_c is not None:
        pg_cap = -adv * clip_ratio_c  # (B, T) or (B, 1)
        dual = (adv < 0) & (pg > pg_cap)  # (B, T)
        pg = torch.where(dual, pg_cap, pg)
    else:
        dual = torch.zeros_like(mask, dtype=torch.bool)

    masked = pg * mask  # (B, T)
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, s.kl_estimator)  # (B, T)
        if kl_coef > 0:
            masked = masked + kl_coef * kl * den_mask
    loss = aggregate(masked, den_mask, s.loss_agg, num_tokens, num_seqs)

    with torch.no_grad():
        n_masked = mask.sum()

        def masked_mean(x: Tensor) -> Tensor:
            return safe_div((x * mask).sum(), n_masked).float()

        present = mask > 0  # (B, T)
        has_tokens = present.any()  # no host sync: the ratio stats fall back to 1 with torch.where
        one = torch.ones((), device=logp.device)
        inf = torch.full((1,), torch.inf, device=logp.device)
        masked_ratio = ratio.detach().float().flatten()  # (B·T,)
        ratio_min = torch.cat([masked_ratio.masked_fill(~present.flatten(), torch.inf), inf]).min()
        ratio_max = torch.cat([masked_ratio.masked_fill(~present.flatten(), -torch.inf), -inf]).max()
        stats = {
            "pg_loss": aggregate(pg * mask, den_mask, s.loss_agg, num_tokens, num_seqs).float(),
            "kl": safe_div((kl * den_mask).sum(), den_mask.sum()).float()
            if kl is not None
            else torch.zeros((), device=logp.device),
            "clip_frac": masked_mean((pg_clipped > pg_unclipped).to(mask.dtype)),
            "dual_clip_frac": masked_mean(dual.to(mask.dtype)),
            "ratio_mean": torch.where(has_tokens, masked_mean(ratio), one),
            "ratio_min": torch.where(has_tokens, ratio_min, one),
            "ratio_max": torch.where(has_tokens, ratio_max, one),
            "approx_kl_old": masked_mean(0.5 * log_ratio.square()),
            "context_masked_frac": safe_div((response_mask - mask).sum(), response_mask.sum()).float(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}
