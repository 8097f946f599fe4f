"""Sampling stage: the step's data rows planned, sampled by the rollout engine and graded, as a :class:`RolloutBatch`.

Two small objects the module builds and hands to the step:

- :class:`Sampler`, prompts → rollouts and their rewards: the rollout engine (its parameters gathered under FSDP2
  when it samples with the policy's own) and the grader. The module's
  :meth:`~p2o_lightning.module.P2OModule.sample` is this sampler; validation and the P²O search call it too.
- :class:`GroupSampler`, data rows → their :class:`RolloutBatch`: the rows' rollout plan (P²O's templates,
  :mod:`p2o_lightning.step.plan`) sampled through a sample function (:func:`sample_rollouts`). Dynamic sampling
  (:mod:`p2o_lightning.step.dynamic`) calls it once per round.

A step whose rows are all sampled from their plain prompt asks for K rollouts of each of the G prompts (``n = K``);
as soon as some row is templated every row is its own prompt (``n = 1``, M prompts), as the plan lays them out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from p2o_lightning.policy import gathered, resolve_model_path
from p2o_lightning.rewards import GradeResult
from p2o_lightning.rollout import HFRolloutEngine, LoopRolloutEngine, RolloutEngine, Rollouts, SamplingParams
from p2o_lightning.step.batch import RolloutBatch
from p2o_lightning.step.plan import RolloutPlan, plan_rollouts

SampleFn = Callable[[list[str], list[str], SamplingParams], tuple[Rollouts, GradeResult]]


def make_engine(name: str, lm, tokenizer, model_path: str, strategy, **vllm_options) -> RolloutEngine:
    """The rollout engine: our decode loop or HF ``generate`` on the policy itself, or a vLLM synced from it."""
    if name == "loop":
        return LoopRolloutEngine(lm, tokenizer)
    if name != "vllm":
        return HFRolloutEngine(lm, tokenizer)
    from p2o_lightning.rollout.vllm import VLLMRolloutEngine

    if type(strategy).__name__ == "FSDPStrategy":
        raise ValueError(
            "model.rollout.engine='vllm' syncs full tensors from FSDP2 (FSDP2Strategy, a ModelParallelStrategy) or "
            "unsharded policies; FSDPStrategy (FSDP1) shards flat parameters it cannot hand over: use "
            "p2o_lightning.sharded.FSDP2Strategy"
        )
    return VLLMRolloutEngine(resolve_model_path(model_path), tokenizer, **vllm_options)


class Sampler:
    """``sampler(prompts, answers, sampling)`` → ``(rollouts, grade)``: ``sampling.n`` rollouts of each prompt from
    ``engine`` and the grader's rewards for them, [len(prompts) · n]. An engine that samples with the policy's own
    parameters runs inside :func:`~p2o_lightning.policy.gathered` (FSDP2 all-gathers them; outside its forward).
    """

    def __init__(self, engine: RolloutEngine, grader, policy) -> None:
        self.engine, self.grader, self.policy = engine, grader, policy

    def __call__(
        self, prompts: list[str], answers: list[str], sampling: SamplingParams
    ) -> tuple[Rollouts, GradeResult]:
        with gathered(self.policy) if self.engine.shares_policy else contextlib.nullcontext():
            rollouts = self.engine.generate(prompts, sampling)
        grade = self.grader.grade(rollouts.texts, [a for a in answers for _ in range(sampling.n)])
        return rollouts, grade


def sample_rollouts(sample: SampleFn, plan: RolloutPlan, answers: list[str], sampling: SamplingParams) -> RolloutBatch:
    """Sample and grade the plan's M = G·K rows; ``answers`` [G] are the groups' gold answers, ``sampling.n`` = K."""
    k, g = sampling.n, len(plan.templated_groups)
    row_answers = [a for a in answers for _ in range(k)]  # [M]
    if not plan.any_templated:
        rollouts, grade = sample(plan.prompts[::k], list(answers), sampling)
    else:
        rollouts, grade = sample(plan.sampled_prompts, row_answers, replace(sampling, n=1))
    rewards = torch.tensor(grade.rewards, dtype=torch.float32, device=rollouts.response_ids.device).view(g, k)
    return RolloutBatch(
        plan=plan,
        answers=row_answers,
        sampled_prompt_ids=rollouts.prompt_ids,
        sampled_prompt_mask=rollouts.prompt_mask,
        prompt_ids=rollouts.prompt_ids,  # trained under the sampled prompt until distillation re-prompts the rows
        prompt_mask=rollouts.prompt_mask,
        response_ids=rollouts.response_ids,
        response_mask=rollouts.response_mask,
        texts=rollouts.texts,
        rewards=rewards,
        reward_errors=grade.errors,
        reward_timeouts=grade.timeouts,
        sampling_logp=rollouts.sampling_logp,
    )


@dataclass(frozen=True)
class GroupSampler:
    """``group_sampler(rows)``: data rows (``{"prompt", "answer", ...}``) → their planned, sampled and graded
    :class:`RolloutBatch`, K = ``sampling.n`` rollouts each, under P²O's template ``assignments`` (prompt → K
    templates; :func:`~p2o_lightning.step.plan.plan_rollouts` with ``plain_rollouts`` and ``distill``).
    """

    sample: SampleFn
    sampling: SamplingParams
    assignments: Mapping[str, Sequence[str]]
    plain_rollouts: int = 0
    distill: bool = True

    def plan(self, prompts: list[str]) -> RolloutPlan:
        """Which prompt each of the rows of ``prompts`` is sampled under and trained under."""
        return plan_rollouts(prompts, self.assignments, self.sampling.n, self.plain_rollouts, self.distill)

    def __call__(self, rows: list[dict]) -> RolloutBatch:
        plan = self.plan([row["prompt"] for row in rows])
        return sample_rollouts(self.sample, plan, [row["answer"] for row in rows], self.sampling)
