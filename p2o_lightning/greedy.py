"""The one greedy scorer: the current policy's greedy answer to each prompt, graded 0/1.

Three readings of the policy are greedy scorings, and all three go through :func:`greedy_scores`:

- validation and test's ``greedy_acc`` (:mod:`~p2o_lightning.evaluation`), one batch in one chunk;
- each evaluation of a template search (:mod:`~p2o_lightning.prompt.adapter`): the template in front of every problem,
  a failing chunk scoring 0 with the reason instead of raising (gepa's contract for an adapter);
- the plain-prompt accuracy of the prompts that held templates (``p2o/distilled_greedy_acc``, the P²O callback).

One sample per prompt at temperature 0, through the module's rollout engine and grader (``module.sample``: the engine
puts the policy in eval mode, without grad, and restores training mode after), in chunks of ``batch_size`` prompts.
Scoring runs under a forked RNG: greedy decoding draws nothing from it in our engines, and a scoring never shifts the
training run's streams whatever an engine does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from p2o_lightning.rollout import SamplingParams

Scored = tuple[str, float, str]  # (response text, reward, feedback) of one prompt


def greedy_scores(
    module,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_new_tokens: int,
    batch_size: int | None = 64,
    never_raise: bool = False,
) -> list[Scored]:
    """``(response, reward, feedback)`` of each prompt: ``module``'s greedy answer, graded against its ``answers``.

    ``batch_size`` prompts are decoded together (None: all at once). With ``never_raise`` a chunk that fails scores 0
    and its feedback says why; otherwise the error surfaces.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    step = batch_size or max(len(prompts), 1)
    sampling = SamplingParams(1, 0.0, 1.0, max_new_tokens)
    devices = [module.device] if module.device.type == "cuda" else []
    scored: list[Scored] = []
    with torch.random.fork_rng(devices=devices):
        for start in range(0, len(prompts), step):
            chunk, truth = list(prompts[start : start + step]), list(answers[start : start + step])
            try:
                rollouts, grade = module.sample(chunk, truth, sampling)
                scored += zip(rollouts.texts, map(float, grade.rewards), grade.feedback)
            except Exception as err:
                if not never_raise:
                    raise
                reason = f"The model could not be run on this problem ({type(err).__name__}: {err})."
                scored += [("", 0.0, reason)] * len(chunk)
    return scored


def greedy_accuracy(module, prompts: Sequence[str], answers: Sequence[str], max_new_tokens: int) -> float:
    """The share of ``prompts`` the policy answers correctly, greedy (NaN for none)."""
    if not prompts:
        return float("nan")
    return sum(reward >= 1.0 for _, reward, _ in greedy_scores(module, prompts, answers, max_new_tokens)) / len(prompts)
