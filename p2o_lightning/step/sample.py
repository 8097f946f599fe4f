"""Sampling stage: the rollout plan's rows through the rollout engine, graded, as a :class:`RolloutBatch`.

``sample(prompts, answers, sampling)`` is the module's :meth:`~p2o_lightning.module.P2OModule.sample` (engine +
grader, the same call validation and the GEPA adapter use). A step whose rows are all sampled from their plain
prompt asks for K rollouts of each of the G prompts (``n = K``); as soon as some row is templated every row is its
own prompt (``n = 1``, M prompts), as the plan lays them out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from p2o_lightning.policy import resolve_model_path
from p2o_lightning.rewards import GradeResult
from p2o_lightning.rollout import HFRolloutEngine, LoopRolloutEngine, Rollouts, SamplingParams
from p2o_lightning.step.batch import RolloutBatch
from p2o_lightning.step.plan import RolloutPlan

SampleFn = Callable[[list[str], list[str], SamplingParams], tuple[Rollouts, GradeResult]]


def make_engine(name: str, lm, tokenizer, model_path: str, strategy, **vllm_options):
    """The rollout engine: our decode loop or HF ``generate`` on the policy itself, or a vLLM synced from it."""
    if name == "loop":
        return LoopRolloutEngine(lm, tokenizer)
    if name != "vllm":
        return HFRolloutEngine(lm, tokenizer)
    from p2o_lightning.rollout.vllm import VLLMRolloutEngine

    if type(strategy).__name__ == "FSDPStrategy":
        raise ValueError(
            "rollout_engine='vllm' syncs full tensors from FSDP2 (FSDP2Strategy, a ModelParallelStrategy) or "
            "unsharded policies; FSDPStrategy (FSDP1) shards flat parameters it cannot hand over: use "
            "p2o_lightning.sharded.FSDP2Strategy"
        )
    return VLLMRolloutEngine(resolve_model_path(model_path), tokenizer, **vllm_options)


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
