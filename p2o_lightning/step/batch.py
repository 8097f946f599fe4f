"""``RolloutBatch``: one RL step's rollouts and everything the stages attach to them, in one typed record.

M = G·K rows: G groups (prompts) of K rollouts, group g = rows g·K … g·K + K − 1. Each row names both of its
prompts (through its :class:`~p2o_lightning.step.plan.RolloutPlan`): the one it is *sampled* under
(``sampled_prompt_ids``: x, or template(x) for a P²O hard prompt) and the one it is *trained* under (``prompt_ids``:
x when distilling).
A stage takes a batch and returns ``dataclasses.replace(batch, ...)``; tensors are on the policy's device.

The three policies of verl's vocabulary, spelled out: π_rollout sampled the responses; ``old_logp`` is π_old (the
policy before this step's updates, computed once, or the current one detached when there is a single update);
π_θ is recomputed in every PPO update. ``ref_logp`` is the frozen reference model's, ``context_logp`` π_old of
the same tokens behind the prompt the row was sampled under (P²O's context ratio mask).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from p2o_lightning.step.plan import RolloutPlan


@dataclass(frozen=True)
class RolloutBatch:
    """A step's M = G·K rollout rows; the ``None`` fields are filled by later stages."""

    plan: RolloutPlan  # per row: x, its template, the prompt sampled under, the prompt trained under
    answers: list[str]  # [M] gold answer of each row
    sampled_prompt_ids: Tensor  # [M, Pg] the prompt each row is sampled under, left-padded
    sampled_prompt_mask: Tensor  # [M, Pg]
    prompt_ids: Tensor  # [M, P] the prompt each row is trained under (x when distilling), left-padded
    prompt_mask: Tensor  # [M, P]
    response_ids: Tensor  # [M, R] right-padded with the pad id
    response_mask: Tensor  # [M, R] 1 up to and including the first EOS
    texts: list[str]  # [M] decoded responses
    rewards: Tensor  # [G, K] the grader's rewards
    reward_errors: int = 0  # grader calls that raised (scored 0)
    reward_timeouts: int = 0  # grader calls that timed out (scored 0)
    sampling_logp: Tensor | None = None  # [M, R] log π_rollout(y): the engine's log-probs of the tokens it sampled
    advantages: Tensor | None = None  # [M] group-normalised rewards
    loss_mask: Tensor | None = None  # [M, R] the tokens the loss is taken over (response × rows in the loss)
    old_logp: Tensor | None = None  # [M, R] log π_old(y | trained prompt)
    entropy: Tensor | None = None  # [M, R] entropy of π_old(· | trained prompt)
    ref_logp: Tensor | None = None  # [M, R] log π_ref(y | trained prompt), when kl_coef > 0
    context_logp: Tensor | None = None  # [M, R] log π_old(y | sampled prompt), when some row is distilled

    @property
    def group_size(self) -> int:  # K
        return self.rewards.shape[1]

    @property
    def num_groups(self) -> int:  # G
        return self.rewards.shape[0]

    @property
    def truncated(self) -> Tensor:  # [M] bool: hit max_new_tokens without an EOS
        return self.response_mask.bool().all(dim=1)

    @property
    def distilled(self) -> Tensor:  # [M] bool: the row is trained under another prompt than it was sampled under
        return torch.tensor(self.plan.distilled_rows, device=self.response_ids.device)

    @property
    def plain_rows(self) -> Tensor:  # [M] bool: the row was sampled from the plain prompt (no template)
        return ~torch.tensor(self.plan.templated_rows, device=self.response_ids.device)

    @property
    def reprompted(self) -> bool:
        """Some row is trained under another prompt than it was sampled under (``prompt_ids`` ≠ its sampled one)."""
        return any(self.plan.distilled_rows)

    def outputs(self) -> dict:
        """Per group: ``prompts`` [G], ``answers`` [G], ``rewards`` [G, K] (CPU), ``templated`` [G]: a training step's
        outputs, from which the P²O callback collects hard samples.
        """
        k = self.group_size
        return {
            "prompts": self.plan.prompts[::k],
            "answers": self.answers[::k],
            "rewards": self.rewards.detach().cpu(),
            "templated": list(self.plan.templated_groups),
            "plain_rows": self.plain_rows.cpu().view(-1, k),  # [G, K] sampled from the plain prompt
        }

    def with_(self, **changes) -> RolloutBatch:
        """``dataclasses.replace``: what a stage returns."""
        return replace(self, **changes)

    def select_groups(self, groups: list[int]) -> RolloutBatch:
        """The batch of groups ``groups`` (in that order): rows, plan and every per-row tensor follow."""
        k = self.group_size
        rows = [g * k + i for g in groups for i in range(k)]
        index = torch.tensor(rows, dtype=torch.long, device=self.response_ids.device)
        plan = RolloutPlan(
            prompts=[self.plan.prompts[r] for r in rows],
            templates=[self.plan.templates[r] for r in rows],
            sampled_prompts=[self.plan.sampled_prompts[r] for r in rows],
            trained_prompts=[self.plan.trained_prompts[r] for r in rows],
            templated_groups=[self.plan.templated_groups[g] for g in groups],
        )
        changes: dict = {
            "plan": plan,
            "answers": [self.answers[r] for r in rows],
            "texts": [self.texts[r] for r in rows],
        }
        changes["rewards"] = self.rewards[torch.tensor(groups, dtype=torch.long, device=self.rewards.device)]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in changes and isinstance(value, Tensor):
                changes[f.name] = value[index]
        return replace(self, **changes)


def cat_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Sampled batches of one step (dynamic sampling's rounds) as one: prompts left-padded and responses
    right-padded to common widths, groups in order. Only before scoring: later stages run on the whole batch.
    """
    if any(b.advantages is not None or b.old_logp is not None for b in batches):
        raise ValueError("cat_batches joins freshly sampled batches (no advantages or log-probs yet)")

    def cat(name: str, value: int, left: bool) -> Tensor:
        width = max(getattr(b, name).shape[1] for b in batches)
        pads = [
            (width - getattr(b, name).shape[1], 0) if left else (0, width - getattr(b, name).shape[1]) for b in batches
        ]
        return torch.cat([F.pad(getattr(b, name), pad, value=value) for b, pad in zip(batches, pads)])

    plans = [b.plan for b in batches]
    plan = RolloutPlan(
        prompts=[p for plan in plans for p in plan.prompts],
        templates=[t for plan in plans for t in plan.templates],
        sampled_prompts=[p for plan in plans for p in plan.sampled_prompts],
        trained_prompts=[p for plan in plans for p in plan.trained_prompts],
        templated_groups=[g for plan in plans for g in plan.templated_groups],
    )
    return RolloutBatch(
        plan=plan,
        answers=[a for b in batches for a in b.answers],
        sampled_prompt_ids=cat("sampled_prompt_ids", pad_id, left=True),
        sampled_prompt_mask=cat("sampled_prompt_mask", 0, left=True),
        prompt_ids=cat("prompt_ids", pad_id, left=True),
        prompt_mask=cat("prompt_mask", 0, left=True),
        response_ids=cat("response_ids", pad_id, left=False),
        response_mask=cat("response_mask", 0, left=False),
        texts=[t for b in batches for t in b.texts],
        rewards=torch.cat([b.rewards for b in batches]),
        reward_errors=sum(b.reward_errors for b in batches),
        reward_timeouts=sum(b.reward_timeouts for b in batches),
        sampling_logp=cat("sampling_logp", 0, left=False) if batches[0].sampling_logp is not None else None,
    )
