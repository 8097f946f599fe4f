"""The loss's one specification: :class:`LossSettings`, the context ratio mask and the aggregation, each written once.

Every implementation of the PPO-clip loss reads these: the torch reference (:func:`p2o_lightning.ops.policy_loss`),
the fused head of a single update (:class:`p2o_lightning.fused_head.RatioOneLoss`), the Triton loss kernel and the
fused head's kernel (``p2o_lightning.kernels``), and the update stage (:mod:`p2o_lightning.step.update`), which
adds P²O's skill anchor. A loss option is a field here, its formula in the implementations, and a case of
``tests/test_loss_settings.py``, which runs every implementation over a grid of settings.

In the config they are the ``model.loss`` group (``--model.loss.clip_high 0.28``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CONTEXT_MASK_SCOPES",
    "KL_ESTIMATORS",
    "LOSS_AGGS",
    "LossSettings",
    "aggregate",
    "aggregation_weights",
    "context_ratio_mask",
    "safe_div",
]

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")
# what P²O's context ratio mask removes: the PPO term of a token (the reference), or the whole token
CONTEXT_MASK_SCOPES = ("policy_gradient", "tokens")


@dataclass(frozen=True)
class LossSettings:
    """The PPO-clip loss of GRPO / P²O, checked once, where it is built.

    Args:
        clip_low: PPO ratio clip below (1 - clip_low).
        clip_high: PPO ratio clip above (1 + clip_high); > clip_low is DAPO's clip-higher.
        clip_ratio_c: dual-clip bound for negative advantages, > 1 (None: off).
        loss_agg: ``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum`` (:func:`aggregate`).
        kl_coef: weight of the KL-to-reference term in the loss (0, the paper's setting, skips the reference).
        kl_estimator: ``k1`` | ``k2`` | ``k3`` (Schulman's estimators of KL(π ‖ π_ref)).
        context_ratio_bounds: P²O's context ratio mask: distilled tokens with ρ = π(y|x) / π(y|template(x))
            outside [low, high] are cut (:func:`context_ratio_mask`; None: no mask).
        context_mask_scope: what the context ratio mask cuts: ``policy_gradient`` (the reference: the token's PPO
            term only; it stays in the token-mean denominator and keeps its KL term) | ``tokens`` (the whole token).
        anchor_weight: P²O's skill anchor (not in the paper; 0: off): a distilled row is also trained under the
            prompt it was sampled from, with this weight, by the loss of :attr:`anchor`
            (:mod:`p2o_lightning.step.distill`).
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: float | None = None
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    context_ratio_bounds: tuple[float, float] | None = (0.01, 10.0)
    context_mask_scope: str = "policy_gradient"
    anchor_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg={self.loss_agg!r} is unknown; choose one of {LOSS_AGGS}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r} is unknown; choose one of {KL_ESTIMATORS}")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef={self.kl_coef} must be a finite number >= 0 (0: no KL term)")
        if not (self.clip_low >= 0 and self.clip_high >= 0):
            raise ValueError(f"clip_low={self.clip_low} and clip_high={self.clip_high} must be >= 0")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (dual-clip), got {self.clip_ratio_c}")
        bounds = self.context_ratio_bounds
        if bounds is not None:
            if len(bounds) != 2 or not 0 < bounds[0] <= 1 <= bounds[1]:
                raise ValueError(f"context_ratio_bounds={bounds} must be (low, high) with 0 < low <= 1 <= high")
            object.__setattr__(self, "context_ratio_bounds", (float(bounds[0]), float(bounds[1])))  # a list in YAML
        if self.context_mask_scope not in CONTEXT_MASK_SCOPES:
            scope = self.context_mask_scope
            raise ValueError(f"context_mask_scope={scope!r} is unknown; choose one of {CONTEXT_MASK_SCOPES}")
        if not (math.isfinite(self.anchor_weight) and self.anchor_weight >= 0):
            raise ValueError(f"anchor_weight={self.anchor_weight} must be a finite number >= 0 (0: no skill anchor)")

    @property
    def anchor(self) -> LossSettings:
        """The skill anchor's loss: the same PPO term on log π(y | t(x)), on-policy, without the KL term (π_ref is
        scored on x) and without the context ratio mask; the update adds ``anchor_weight`` × it.
        """
        return dataclasses.replace(self, kl_coef=0.0, context_ratio_bounds=None, anchor_weight=0.0)


def context_ratio_mask(logp: Tensor, context_logp: Tensor, bounds: tuple[float, float]) -> Tensor:
    """P²O's Context Ratio Mask: keep a token where ρ = exp(logp − context_logp) lies in ``bounds`` = [low, high].

    ``logp`` is log π(y_t | x) (the original prompt), ``context_logp`` log π(y_t | template(x)) (the prompt the
    rollout was sampled from). A token the template made far likelier than the bare prompt would (ρ < low), or far
    less likely (ρ > high), is not distilled. Compared in log space: log low ≤ logp − context_logp ≤ log high.
    """
    low, high = bounds
    if not 0 < low <= 1 <= high:
        raise ValueError(f"context ratio bounds must satisfy 0 < low <= 1 <= high, got ({low}, {high})")
    log_rho = logp - context_logp
    return (log_rho >= math.log(low)) & (log_rho <= math.log(high))


def safe_div(num: Tensor, den: Tensor | float) -> Tensor:
    """Return num / den, with 0 (and a finite gradient) where den == 0."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / torch.where(den == 0, torch.ones_like(den), den)


def aggregate(
    masked: Tensor,  # (B, T) per-token losses, already multiplied by their masks
    den_mask: Tensor,  # (B, T) float: the tokens a mean divides by
    loss_agg: str,
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
) -> Tensor:
    """The loss from its per-token terms l (m = ``den_mask``, B sequences).

    ::

        "token-mean"           Σ_bt l / Σ_bt m                   (num_tokens replaces Σ_bt m)
        "seq-mean-token-mean"  Σ_b (Σ_t l / Σ_t m) / B           (num_seqs replaces B)
        "seq-mean-token-sum"   Σ_b (Σ_t l) / B                   (num_seqs replaces B)

    ``num_tokens`` / ``num_seqs`` let a caller normalise micro-batches by the whole mini-batch. A sequence with an
    empty mask adds 0 (it still counts in B); an empty batch gives 0, never NaN.
    """
    if loss_agg == "token-mean":
        return safe_div(masked.sum(), den_mask.sum() if num_tokens is None else num_tokens)
    if loss_agg == "seq-mean-token-mean":
        per_seq = safe_div(masked.sum(dim=1), den_mask.sum(dim=1))  # (B,)
    elif loss_agg == "seq-mean-token-sum":
        per_seq = masked.sum(dim=1)  # (B,)
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGS}")
    return safe_div(per_seq.sum(), masked.shape[0] if num_seqs is None else num_seqs)


def aggregation_weights(
    den_mask: Tensor,  # (B, T)
    loss_agg: str,
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
) -> Tensor:
    """(B, T) float32: the weight a_t of each token's term in :func:`aggregate`, which is linear in them
    (L = Σ_t a_t l_t): its gradient w.r.t. the terms, taken by autograd so that the rule is written once.
    """
    den = den_mask.detach().float()
    with torch.enable_grad():
        terms = torch.zeros_like(den, requires_grad=True)
        (weights,) = torch.autograd.grad(aggregate(terms, den, loss_agg, num_tokens, num_seqs), terms)
    return weights
