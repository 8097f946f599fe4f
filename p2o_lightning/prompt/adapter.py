"""The ``gepa`` adapter: a candidate is one template, scored by the *current* policy on hard problems.

GEPA evolves ``{"template": text}``. :meth:`P2OAdapter.evaluate` puts the template in front of each problem
(``template.strip() + "\\n\\n" + prompt``), decodes greedily with the policy being trained (one sample, eval mode,
no grad; the engine restores training mode after), and grades the answer 0/1. :meth:`make_reflective_dataset` gives
the reflection LM what the paper gives it: the problem, the response, the reward and a feedback sentence that names
the correct answer. As gepa's contract asks, a failing example never raises: it scores 0 and says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gepa import EvaluationBatch

from p2o_lightning.rollout import SamplingParams
from p2o_lightning.tasks import apply_template

COMPONENT = "template"


class P2OAdapter:
    """Scores templates with a :class:`~p2o_lightning.module.P2OModule`'s current policy (greedy, 0/1 reward)."""

    propose_new_texts = None  # proposals come from the reflection backend (gepa's reflection_lm or custom proposer)

    def __init__(self, module, max_new_tokens: int, batch_size: int = 64) -> None:
        self.module = module
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.num_examples = 0  # examples evaluated: the search's cost in metric calls

    def evaluate(
        self, batch: list[Mapping[str, str]], candidate: dict[str, str], capture_traces: bool = False
    ) -> EvaluationBatch:
        template = candidate.get(COMPONENT, "")
        outputs: list[str] = []
        scores: list[float] = []
        traces: list[dict[str, Any]] = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start : start + self.batch_size]
            prompts = [apply_template(template, ex["prompt"]) for ex in chunk]
            answers = [ex["answer"] for ex in chunk]
            try:
                rollouts, grade = self.module.sample(prompts, answers, SamplingParams(1, 0.0, 1.0, self.max_new_tokens))
                texts, rewards, feedback = rollouts.texts, grade.rewards, grade.feedback
            except Exception as err:  # a broken batch scores 0 with the reason; the search goes on
                texts = [""] * len(chunk)
                rewards = [0.0] * len(chunk)
                feedback = [f"The model could not be run on this problem ({type(err).__name__}: {err})."] * len(chunk)
            for ex, text, reward, fb in zip(chunk, texts, rewards, feedback):
                outputs.append(text)
                scores.append(float(reward))
                traces.append({"problem": ex["prompt"], "response": text, "reward": float(reward), "feedback": fb})
        self.num_examples += len(batch)
        return EvaluationBatch(outputs=outputs, scores=scores, trajectories=traces if capture_traces else None)

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
