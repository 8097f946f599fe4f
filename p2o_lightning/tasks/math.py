r"""Competition math graded by ``math-verify``: the paper's binary reward for a correct ``\\boxed{}`` answer.

The prompt is the problem text with the usual instruction to put the final answer in ``\\boxed{}``
(:data:`BOXED_INSTRUCTION`, which :mod:`~p2o_lightning.tasks.math_data` appends); the gold answer and the response
are both parsed by math-verify and compared symbolically. math-verify's own signal-based timeouts only work on the
main thread, so they are off here: :class:`~p2o_lightning.rewards.SafeGrader` enforces the timeout.
"""

from __future__ import annotations

import logging

from p2o_lightning.tasks.base import Score, feedback_sentence

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _quiet_math_verify() -> None:
    # math-verify warns on every call when its timeouts are disabled; we time calls out ourselves.
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils"):
        logging.getLogger(name).setLevel(logging.ERROR)


class MathTask:
    r"""Math word problems with a ``\\boxed{}`` final answer, verified by math-verify."""

    name = "math"

    def __init__(self) -> None:
        from math_verify import parse, verify  # imported lazily: it pulls sympy and antlr

        _quiet_math_verify()
        self._parse, self._verify = parse, verify

    def extract_answer(self, response: str) -> str | None:
        parsed = self._parse(response, parsing_timeout=None)
        return parsed[1] if len(parsed) > 1 else None

    def score(self, response: str, answer: str) -> Score:
        gold_text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
        gold = self._parse(gold_text, parsing_timeout=None)
        pred = self._parse(response, parsing_timeout=None)
        correct = bool(gold) and bool(pred) and self._verify(gold, pred, timeout_seconds=None)
        predicted = pred[1] if len(pred) > 1 else None
        return Score(1.0 if correct else 0.0, feedback_sentence(predicted, answer, correct))
