"""Scoring stage: group advantages from the grader's rewards, the rows the loss is taken over, DAPO's group filter.

Rewards arrive graded (the sampling stage calls the grader). Here they become GRPO's group-normalised advantages,
``(r − mean) / (std + eps)`` or Dr. GRPO's ``r − mean`` (:func:`p2o_lightning.ops.group_advantage`), and the loss
mask: response tokens × the rows in the loss (P²O's ``drop_failed_templated`` takes failed templated rows out; they
still count in their group's advantage, :func:`p2o_lightning.step.plan.rows_in_loss`).
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


def score_groups(
    batch: RolloutBatch, ops, norm_by_std: bool = True, drop_failed_templated: bool = False
) -> RolloutBatch:
    """The batch with ``advantages`` [M] and ``loss_mask`` [M, R]."""
    advantages = ops.group_advantage(batch.rewards, norm_by_std=norm_by_std).view(-1)  # [M]
    rewards = batch.rewards.view(-1).tolist()
    in_loss = torch.tensor(rows_in_loss(batch.plan, rewards, drop_failed_templated), device=batch.rewards.device)
    loss_mask = batch.response_mask.float() * in_loss.float()[:, None]  # [M, R]
    return batch.with_(advantages=advantages, loss_mask=loss_mask)
