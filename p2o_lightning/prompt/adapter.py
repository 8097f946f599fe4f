"""The ``gepa`` adapter: a candidate is one template, scored by the *current* policy on hard problems.

GEPA evolves ``{"template": text}``. :meth:`P2OAdapter.evaluate` puts the template in front of each problem
(``template.strip() + "\\n\\n" + prompt``), decodes greedily with the policy being trained (one sample, eval mode,
no grad; the engine restores training mode after), and grades the answer 0/1. :meth:`make_reflective_dataset` gives
the reflection LM what the paper gives it: the problem, the response, the reward and a feedback sentence that names
the correct answer. As gepa's contract asks, a failing example never raises: it scores 0 and says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from gepa import EvaluationBatch

from p2o_lightning.greedy import Scored, greedy_scores
from p2o_lightning.policy import gathered
from p2o_lightning.tasks import apply_template

COMPONENT = "template"


def score_examples(
    module, examples: Sequence[Mapping[str, str]], template: str, max_new_tokens: int, batch_size: int = 64
) -> list[Scored]:
    """``(response, reward, feedback)`` of each example under ``template``: the module's current policy, greedy
    (:func:`~p2o_lightning.greedy.greedy_scores`).

    Never raises for a failing chunk: it scores 0 and says why. The policy's parameters are gathered once for all
    chunks (FSDP2), also for an empty list: that all-gather is a collective every rank takes in each evaluation.
    """
    prompts = [apply_template(template, ex["prompt"]) for ex in examples]
    with gathered(module.policy):
        return greedy_scores(module, prompts, [ex["answer"] for ex in examples], max_new_tokens, batch_size, True)


class P2OAdapter:
    """Scores templates with a :class:`~p2o_lightning.module.P2OModule`'s current policy (greedy, 0/1 reward).

    ``scorer(examples, template)`` scores a batch (default: :func:`score_examples` on this process; the P²O
    callback passes a :class:`~p2o_lightning.prompt.scorer.CollectiveScorer`, which shares it among the ranks).
    """

    propose_new_texts = None  # proposals come from the reflection backend (gepa's reflection_lm or custom proposer)

    def __init__(self, module, max_new_tokens: int, batch_size: int = 64, scorer: Callable | None = None) -> None:
        self.module = module
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.scorer = scorer or partial(score_examples, module, max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.num_examples = 0  # examples evaluated: the search's cost in metric calls

    def evaluate(
        self, batch: list[Mapping[str, str]], candidate: dict[str, str], capture_traces: bool = False
    ) -> EvaluationBatch:
        scored = self.scorer(batch, candidate.get(COMPONENT, ""))
        traces = [
            {"problem": ex["prompt"], "response": text, "reward": reward, "feedback": fb}
            for ex, (text, reward, fb) in zip(batch, scored)
        ]
        self.num_examples += len(batch)
        return EvaluationBatch(
            outputs=[text for text, _, _ in scored],
            scores=[reward for _, reward, _ in scored],
            trajectories=traces if capture_traces else None,
        )

    def make_reflective_dataset(
        self, candidate: dict[str, str], eval_batch: EvaluationBatch, components_to_update: list[str]
    ) -> dict[str, list[dict[str, Any]]]:
        records = [
            {
                "Inputs": trace["problem"],
                "Generated Outputs": trace["response"],
                "Feedback": f"{trace['feedback']} Reward: {trace['reward']:g}.",
                "Score": trace["reward"],
            }
            for trace in eval_batch.trajectories or []
        ]
        return {name: records for name in components_to_update}
