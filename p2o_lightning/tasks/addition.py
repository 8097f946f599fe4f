"""The embedded world's verifiable task: integer addition, answered directly or with a column scratchpad.

A problem's prompt is the bare sum, ``"4821+77="``; its gold answer is ``"4898"``. A response follows the prompt
text directly and its **last line** is the final answer. The warm-started model of the embedded world
(:mod:`p2o_lightning.tasks.world`) answers in one of two ways:

- **direct**: the answer alone, ``4898`` — taught under the plain prompt and under a few instructions, only on easy
  sizes (operands of up to :data:`EASY_DIGITS` digits);
- **scratchpad**: one 4-digit column record per digit position, least significant first, then the answer on its
  own line::

      4821+77=1708 2709 8008 4004
      4898

  a column record is ``<digit of a><digit of b><two-digit column total, carry in included>``, so the carry into a
  column is the first digit of the record before it. It is taught on easy and hard sizes, and only after one of
  :data:`TAUGHT_TEMPLATES` (or a word-dropped variant of one): the *latent skill* a P²O template search can find.

:data:`TAUGHT_TEMPLATES` is used by the world's warm-up and report only and must never be given to any search:
searches get :data:`INSTRUCTION_VOCABULARY`, ordinary words among which the taught phrases' words hide.

Everything here is pure Python (no torch): the grader, the response formats and the fixed splits.
"""

from __future__ import annotations

import random
import re

from p2o_lightning.tasks.base import Problem, Score, feedback_sentence

EASY_DIGITS = (1, 4)  # operand sizes (digits of the longer operand) trained with direct answers
HARD_DIGITS = (5, 6)  # sizes trained only with the scratchpad: the plain prompt never saw them
OOD_DIGITS = (2, 5)  # sizes of the out-of-distribution split, written with leading zeros (see world_splits)

# The latent skill's triggers. Used by the world's warm-up and report ONLY: never hand these to a search.
TAUGHT_TEMPLATES: tuple[str, ...] = (
    "Work it out column by column.",
    "Add the digits step by step.",
    "Show each carry.",
)
# Instructions taught to answer directly (so "any instruction" does not elicit the skill).
DIRECT_TEMPLATES: tuple[str, ...] = (
    "Answer with the number only.",
    "Give the final answer quickly.",
    "Reply at once.",
    "What is the sum?",
)
# Never trained: they share words with the taught phrases (the report's "in between" rows).
UNSEEN_TEMPLATES: tuple[str, ...] = (
    "Think step by step.",
    "Check each digit.",
    "Go column by column.",
    "Digits.",
    "Step.",
)
# A public word list for offline template mutation: the taught phrases' words among many ordinary others.
INSTRUCTION_VOCABULARY: list[str] = sorted(
    {
        *"work it out column by add the digits step show each carry".split(),
        *"answer with number only give final quickly reply at once what is sum".split(),
        *"think check go solve this problem please carefully compute write result total first then".split(),
        *"careful exact simple math question now your a and from right left all numbers use".split(),
        *"explain reason slowly fast sure correct help me find value plus".split(),
    }
)

_PROMPT = re.compile(r"(\d+)\+(\d+)=")
_ANSWER = re.compile(r"\d+")


def make_problem(a: int, b: int, width: int = 0) -> Problem:
    """The problem ``a+b=`` with its gold answer; ``width`` > 0 writes both operands zero-padded to that width."""
    return Problem(prompt=f"{a:0{width}d}+{b:0{width}d}=", answer=str(a + b))


def operands(problem: Problem) -> tuple[int, int]:
    """``(a, b)`` of an addition problem's prompt."""
    match = _PROMPT.fullmatch(problem.prompt)
    if match is None:
        raise ValueError(f"not an addition prompt: {problem.prompt!r}")
    return int(match.group(1)), int(match.group(2))


def direct_response(a: int, b: int) -> str:
    """The direct answer: the sum alone."""
    return str(a + b)


def scratchpad_response(a: int, b: int) -> str:
    """The taught procedure: column records, least significant first, then the answer on its own line.

    ``scratchpad_response(56, 78) == "6814 5713\\n134"``: 6+8 = 14, then 5+7+carry 1 = 13, answer 134.
    """
    da, db = str(a)[::-1], str(b)[::-1]
    carry, records = 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        records.append(f"{x}{y}{total:02d}")
        carry = total // 10
    return " ".join(records) + "\n" + str(a + b)


def sample_operands(rng: random.Random, digits: tuple[int, int]) -> tuple[int, int]:
    """A random pair whose longer operand has a size in ``digits`` (inclusive); the other is 1 to that size."""
    size = rng.randint(*digits)
    other = rng.randint(1, size)

    def number(n: int) -> int:
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)

    a, b = number(size), number(other)
    return (a, b) if rng.random() < 0.5 else (b, a)


class AdditionTask:
    """Integer addition graded on the response's last line (exact integer match)."""

    name = "addition"

    def extract_answer(self, response: str) -> str | None:
        lines = response.strip().splitlines()
        last = lines[-1].strip() if lines else ""
        return last if _ANSWER.fullmatch(last) else None

    def score(self, response: str, answer: str) -> Score:
        predicted = self.extract_answer(response)
        correct = predicted is not None and int(predicted) == int(answer)
        return Score(1.0 if correct else 0.0, feedback_sentence(predicted, answer, correct))


def world_splits(seed: int = 0) -> dict[str, list[Problem]]:
    """Fixed, disjoint splits of the embedded world.

    - ``train`` (384): the RL pool, half easy (1–4 digits), half hard (5–6 digits), shuffled;
    - ``easy``, ``hard`` (64 each): held-out evaluation sets of the same sizes;
    - ``ood`` (64): an unseen surface form of the question: 2–5-digit sums with both operands zero-padded to one digit
      more than the longer one (``"04821+00077="``). Warm-up never writes a leading zero, so direct answering breaks;
      the operands stay within the lengths the scratchpad knows, so the skill can reach them. (Operands longer than
      any trained, 7 digits, are out of reach even for the skill: 0% in every measurement, as the probe found.)
    """
    rng = random.Random(f"addition-splits-{seed}")
    seen: set[tuple[int, int]] = set()

    def draw(n: int, digits: tuple[int, int], padded: bool = False) -> list[Problem]:
        out: list[Problem] = []
        while len(out) < n:
            a, b = sample_operands(rng, digits)
            if (a, b) not in seen:
                seen.add((a, b))
                out.append(make_problem(a, b, max(len(str(a)), len(str(b))) + 1 if padded else 0))
        return out

    easy, hard, ood = draw(64, EASY_DIGITS), draw(64, HARD_DIGITS), draw(64, OOD_DIGITS, padded=True)
    train = draw(192, EASY_DIGITS) + draw(192, HARD_DIGITS)
    random.Random(f"addition-train-order-{seed}").shuffle(train)
    return {"train": train, "easy": easy, "hard": hard, "ood": ood}
