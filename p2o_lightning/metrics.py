"""Metrics of a GRPO batch that need care across ranks: the collapse rate of P²O's premise.

A group (the K rollouts of one prompt) has *collapsed* when its rewards have no spread
(:func:`p2o_lightning.ops.collapsed_groups`, the one definition): every advantage is zero and the prompt contributes
no gradient. ``all_wrong`` groups are P²O's hard samples; ``all_right`` ones are already
solved. The metric sums counts across ranks (torchmetrics ``dist_reduce_fx="sum"``) before dividing.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from p2o_lightning.ops import collapsed_groups


class CollapseRate(Metric):
    """Share of groups whose K rewards are all equal, split into all-wrong and all-right."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, success_threshold: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.success_threshold = success_threshold  # a reward ≥ this counts as a correct rollout
        self.add_state("all_wrong", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("all_right", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("collapsed", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("groups", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, rewards: Tensor) -> None:
        """``rewards``: [B, K] for B prompts with K rollouts each."""
        if rewards.ndim != 2:
            raise ValueError(f"rewards must be [B, K], got shape {tuple(rewards.shape)}")
        correct = rewards >= self.success_threshold
        self.all_wrong += (~correct).all(dim=1).sum()
        self.all_right += correct.all(dim=1).sum()
        self.collapsed += collapsed_groups(rewards).sum()
        self.groups += rewards.shape[0]

    def compute(self) -> dict[str, Tensor]:
        groups = self.groups.clamp(min=1)
        return {
            "collapse_rate": self.collapsed / groups,
            "collapse_all_wrong": self.all_wrong / groups,
            "collapse_all_right": self.all_right / groups,
        }
