"""Scoring stage: group advantages from the grader's rewards, the rows the loss is taken over, DAPO's group filter.

Rewards arrive graded (the sampling stage calls the grader). Here they become GRPO's group-normalised advantages,
``(r − mean) / (std + eps)`` or Dr. GRPO's ``r − mean`` (:func:`p2o_lightning.ops.group_advantage`), and the loss
mask: response tokens × the rows in the loss (P²O's ``drop_failed_templated`` takes failed templated rows out; they
still count in their group's advantage, :func:`p2o_lightning.step.plan.rows_in_loss`).

P²O's ``plain_advantage`` (ours, not the paper's): in a templated group the plain rows (``plain_rollouts``) mostly
fail and the templated rows mostly succeed, so the plain rows' advantages are near −1/std: every step pushes down,
under the plain prompt, the direct answers those rows give — also the ones easy problems need, long before the
distilled scratchpad is right under x. ``nonnegative`` keeps their advantage when it is positive (a plain row that
got it right) and sets it to 0 otherwise; the group's other rows keep theirs.
"""

from __future__ import annotations

import torch

from p2o_lightning.step.batch import RolloutBatch
from p2o_lightning.step.plan import rows_in_loss


def check_group_size(num_rollouts: int) -> None:
    """A group needs two rollouts: its advantage is each reward minus the group's mean, always 0 for one."""
    if num_rollouts < 2:
        raise ValueError(
            f"num_rollouts={num_rollouts}: GRPO needs at least 2 rollouts per prompt (a group's advantage is each"
            " reward minus the group's mean, always 0 for a group of one)"
        )


PLAIN_ADVANTAGES = ("group", "nonnegative")


def score_groups(
    batch: RolloutBatch,
    ops,
    norm_by_std: bool = True,
    drop_failed_templated: bool = False,
    plain_advantage: str = "group",
) -> RolloutBatch:
    """The batch with ``advantages`` [M] and ``loss_mask`` [M, R]."""
    advantages = ops.group_advantage(batch.rewards, norm_by_std=norm_by_std).view(-1)  # [M]
    if plain_advantage == "nonnegative" and batch.plan.any_templated:
        k = batch.group_size
        in_templated = torch.tensor(batch.plan.templated_groups, device=advantages.device).repeat_interleave(k)
        advantages = torch.where(in_templated & batch.plain_rows, advantages.clamp(min=0.0), advantages)
    rewards = batch.rewards.view(-1).tolist()
    in_loss = torch.tensor(rows_in_loss(batch.plan, rewards, drop_failed_templated), device=batch.rewards.device)
    loss_mask = batch.response_mask.float() * in_loss.float()[:, None]  # [M, R]
    return batch.with_(advantages=advantages, loss_mask=loss_mask)
