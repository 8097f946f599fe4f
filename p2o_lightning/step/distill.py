"""Context distillation stage: rows sampled under template(x) are re-prompted with x before their log-probs.

P²O trains a response sampled from template(x) as a response to x (paper Eq. 4): the batch keeps both prompts,
``sampled_prompt_ids`` (what the row was sampled under: the context of log π(y|t(x)), which feeds the context ratio
mask) and ``prompt_ids`` (what it is trained under), re-encoded here from the plan's trained prompts. A batch without
distilled rows comes back unchanged. The ratio mask itself is applied inside the loss
(:func:`p2o_lightning.ops.policy_loss`, ``context_logp``), from the log-probs of :mod:`.logprobs`.

**Skill anchor** (``anchor_weight`` = w > 0; not in the paper, off by default): each distilled row is also trained
where it was sampled. Its loss gets w × the PPO loss of the same response under t(x), with the same advantage, no
ratio mask (that term is on-policy) and the mini-batch's token-mean denominator:
L = L_PPO(y | x; mask) + w · L_PPO(y | t(x)). Distillation alone moves the weights that the templated skill runs on
with gradients taken in another context; measured on the embedded world, it wore the skill down (templated success
on hard problems 0.88 → 0.34) and each later search then found weaker templates. The anchor is GRPO on the
templated prompt (the paper's no-distillation ablation) added to the distillation loss: one more backward through
the context forward the ratio mask runs anyway.

**Opening gate** (``opening_tokens`` = n > 0, ``opening_gate`` = γ; not in the paper, off by default): the first n
response tokens of a distilled row (where the templated behaviour is chosen, e.g. a scratchpad instead of a direct
answer) stay out of its policy-gradient term unless the plain prompt has nothing to lose on that prompt (its group
holds plain rollouts and all of them failed) or it already continues the row about as well as its template does
(the geometric mean of the context ratio ρ = π(y_t|x) / π(y_t|t(x)) over the row's remaining tokens is at least γ).
A prompt the plain prompt still solves is taught the templated *skill* (the continuation) but not to *switch* to
it, so the plain prompt does not trade answers it gets right for a behaviour it cannot yet carry out; each row
opens on its own evidence, from the rewards and the log-probs the ratio mask reads anyway (no extra pass, no state).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from p2o_lightning.loss import context_ratio_mask
from p2o_lightning.step.batch import RolloutBatch

EncodeFn = Callable[[list[str], torch.device], tuple[Tensor, Tensor]]  # prompts -> left-padded ids, mask


def reprompt(batch: RolloutBatch, encode: EncodeFn) -> RolloutBatch:
    """The batch with ``prompt_ids`` / ``prompt_mask`` encoded from each row's trained prompt."""
    if not batch.reprompted:
        return batch
    prompt_ids, prompt_mask = encode(batch.plan.trained_prompts, batch.response_ids.device)
    return batch.with_(prompt_ids=prompt_ids, prompt_mask=prompt_mask)


def needs_context_logp(
    batch: RolloutBatch,
    context_ratio_bounds: tuple[float, float] | None,
    anchor_weight: float = 0.0,
    opening_tokens: int = 0,
) -> bool:
    """Some row is distilled, and log π(y|t(x)) is needed: for the context ratio mask, as the π_old that the
    engine's sampling log-probs are compared with (the row was sampled under t(x)), for the skill anchor or for the
    opening gate.
    """
    needed = context_ratio_bounds is not None or batch.sampling_logp is not None or anchor_weight > 0
    needed = needed or opening_tokens > 0
    return batch.reprompted and needed


def context_mask(
    batch: RolloutBatch, context_ratio_bounds: tuple[float, float] | None, rows: Tensor | None = None
) -> Tensor | None:
    """[m, R] bool: the tokens of ``rows`` (all rows by default) that P²O's context ratio mask keeps, from π_old under
    the trained and the sampled prompt (:func:`p2o_lightning.loss.context_ratio_mask`, the rule the loss applies to
    its own inputs); None when no mask applies (no bounds, or no context log-probs).
    """
    if context_ratio_bounds is None or batch.context_logp is None:
        return None
    old, context = batch.old_logp, batch.context_logp  # [M, R]
    if rows is not None:
        old, context = old[rows], context[rows]
    return context_ratio_mask(old, context, context_ratio_bounds)


def anchor_mask(batch: RolloutBatch) -> Tensor:
    """[M, R] the tokens of the skill anchor's loss: those in the loss, of distilled rows only."""
    return batch.loss_mask * batch.distilled[:, None].float()


def opening_gate(
    old_logp: Tensor,  # [m, R] log π_old(y_t | x), the trained (plain) prompt
    context_logp: Tensor,  # [m, R] log π_old(y_t | t(x)), the prompt the row was sampled under
    loss_mask: Tensor,  # [m, R] the response tokens in the loss
    distilled: Tensor,  # [m] bool
    opening_tokens: int,
    gate: float,
    nothing_to_lose: Tensor | None = None,  # [m] bool: the row's group has plain rollouts and none succeeded
) -> Tensor:
    """[m, R] float: 0 on the first ``opening_tokens`` tokens of the distilled rows whose continuation the plain
    prompt does not yet carry (geometric-mean context ratio of the tokens after the opening < ``gate``) and whose
    prompt it still solves (not ``nothing_to_lose``), 1 elsewhere. A row with no token after its opening counts as
    carried.
    """
    positions = torch.arange(loss_mask.shape[1], device=loss_mask.device)[None, :]  # [1, R]
    opening = positions < opening_tokens  # [1, R]
    rest = loss_mask.float() * ~opening  # [m, R]
    log_rho = (old_logp - context_logp).float() * rest  # [m, R]
    mean_log_rho = log_rho.sum(1) / rest.sum(1).clamp(min=1)  # [m]
    closed = distilled & (mean_log_rho < math.log(gate))  # [m]
    if nothing_to_lose is not None:
        closed = closed & ~nothing_to_lose
    return 1.0 - (closed[:, None] & opening).float()


def opening_open_rows(keep: Tensor, distilled: Tensor, opening_tokens: int) -> Tensor:
    """How many distilled rows have their opening taught (``keep`` from :func:`opening_gate`)."""
    return (distilled & (keep[:, :opening_tokens] > 0).all(1)).sum().float()


def plain_failed_groups(batch: RolloutBatch) -> Tensor:
    """[G] bool: the group holds rollouts sampled from the plain prompt and none of them succeeded."""
    plain = batch.plain_rows.view(batch.num_groups, batch.group_size).to(batch.rewards.device)  # [G, K]
    solved = ((batch.rewards >= 1.0) & plain).any(1)  # [G]
    return plain.any(1) & ~solved
