"""What a verifiable task is: a dataset of problems plus a grader, with no torch in sight.

A task formats nothing itself: the prompt a model sees is the problem's ``prompt`` (the user message), optionally
behind a P²O template (``template.strip() + "\\n\\n" + prompt``), rendered by the tokenizer's chat template when it
has one. The task only extracts and scores answers, and says why an answer was wrong (GEPA's feedback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Problem:
    """One verifiable problem."""

    prompt: str  # the user message, e.g. "4821+77="
    answer: str  # the gold answer, e.g. "4898"


@dataclass(frozen=True)
class Score:
    """A reward in [0, 1] and the feedback GEPA's reflection reads."""

    reward: float
    feedback: str


@runtime_checkable
class Task(Protocol):
    """A verifiable task: ``score`` must be a pure function of (response, answer)."""

    name: str

    def extract_answer(self, response: str) -> str | None:
        """The final answer written in ``response``, or None when there is none."""
        ...

    def score(self, response: str, answer: str) -> Score:
        """0/1 reward of ``response`` against the gold ``answer``, with a feedback sentence."""
        ...


def apply_template(template: str, prompt: str) -> str:
    """P²O's template application: ``template.strip() + "\\n\\n" + prompt``; the empty template is the identity."""
    template = template.strip()
    return f"{template}\n\n{prompt}" if template else prompt


def feedback_sentence(predicted: str | None, answer: str, correct: bool) -> str:
    """The paper's feedback for an example, as GEPA's reflection reads it."""
    if correct:
        return f"Your final answer is correct. The correct answer is '{answer}'."
    if predicted is None:
        return f"No final answer could be found in your response. The correct answer is '{answer}'."
    return f"Your final answer '{predicted}' is incorrect. The correct answer is '{answer}'."
