"""Rollout planning: under which prompt each of a step's M = B·K rollouts is sampled, and under which it is trained.

This is P²O's central move in one place. A prompt x without templates is GRPO's: its K rollouts are sampled from x
and trained on x. A *hard* prompt that holds K templates (assigned by :class:`~p2o_lightning.callbacks.P2OCallback`)
is sampled from ``template_k(x)`` and — with context distillation — trained on x: the policy learns to produce the
template-induced response without the template (paper Eq. 4). Without distillation (the paper's ablation) it is
trained on the templated prompt it was sampled from.

**Mixed groups** (``plain_rollouts`` = m): the last m rollouts of a templated group are sampled from x itself (the
reference's ``left_1_no_template_rollout`` is m = 1). Group advantages sum to zero, so with ratio 1 a token whose
context is the same in all K rollouts gets Σ_i A_i ∇log π(token | x) = 0: if every templated rollout opens the
same way, that opening is never taught to x. Plain rollouts in the group, which mostly fail on a hard prompt, give
the contrast that moves the shared part (their context ratio ρ is 1: they are sampled from x).

Rows are grouped: group g is rows g·K … g·K + K − 1, in the order of the batch's prompts. Everything here is pure
Python, so the plan is tested by writing its expected rows down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from p2o_lightning.tasks import apply_template


@dataclass(frozen=True)
class RolloutPlan:
    """The prompts of a step's M = B·K rollout rows."""

    prompts: list[str]  # [M] the plain prompt x of each row
    templates: list[str]  # [M] the template a row is sampled under; "" = sampled from x itself
    sampled_prompts: list[str]  # [M] what the engine is given: template(x), or x
    trained_prompts: list[str]  # [M] what the row's log-probs are computed on: x when distilling
    templated_groups: list[bool]  # [B] the prompt held templates this step

    @property
    def any_templated(self) -> bool:
        return any(self.templated_groups)

    @property
    def templated_rows(self) -> list[bool]:
        """[M] the row is sampled under a non-empty template."""
        return [bool(t.strip()) for t in self.templates]

    @property
    def distilled_rows(self) -> list[bool]:
        """[M] the row is sampled under one prompt and trained under another (needs the context ratio mask)."""
        return [s != t for s, t in zip(self.sampled_prompts, self.trained_prompts)]


def plan_rollouts(
    prompts: Sequence[str],
    assignments: Mapping[str, Sequence[str]],
    num_rollouts: int,
    plain_rollouts: int = 0,
    distill: bool = True,
) -> RolloutPlan:
    """The rollout plan of a batch of ``prompts`` given P²O's template ``assignments`` (prompt → K templates).

    ``plain_rollouts`` of the K rows of every templated group are sampled from the plain prompt (the last ones).
    """
    k = num_rollouts
    if not 0 <= plain_rollouts <= k:
        raise ValueError(f"plain_rollouts={plain_rollouts} must be in [0, num_rollouts={k}]")
    rows_x, rows_t, groups = [], [], []
    for prompt in prompts:
        templates = assignments.get(prompt)
        if templates is not None and len(templates) != k:
            raise ValueError(f"{len(templates)} templates assigned to prompt {prompt[:40]!r} but num_rollouts={k}")
        templates = list(templates) if templates else [""] * k
        if plain_rollouts:
            templates[k - plain_rollouts :] = [""] * plain_rollouts
        rows_x += [prompt] * k
        rows_t += templates
        groups.append(any(t.strip() for t in templates))
    sample = [apply_template(t, x) for t, x in zip(rows_t, rows_x)]
    return RolloutPlan(
        prompts=rows_x,
        templates=rows_t,
        sampled_prompts=sample,
        trained_prompts=list(rows_x) if distill else list(sample),
        templated_groups=groups,
    )


def rows_in_loss(plan: RolloutPlan, rewards: Sequence[float], drop_failed_templated: bool = False) -> list[bool]:
    """[M] the rows the loss is taken over: all, or (the reference's ``drop_failed_template_rollout``) all but the
    templated rows that failed (reward <= 0). A dropped row still counts in its group's advantage.
    """
    if len(rewards) != len(plan.templates):
        raise ValueError(f"{len(rewards)} rewards for a plan of {len(plan.templates)} rows")
    if not drop_failed_templated:
        return [True] * len(rewards)
    return [not (templated and r <= 0) for templated, r in zip(plan.templated_rows, rewards)]
