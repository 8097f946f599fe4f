r"""A math dataset of our own: seeded problems with exact answers in mixed formats, written as JSONL.

No dataset can be downloaded here, and the math task (math-verify on ``\boxed{}`` answers) must still be exercised
end to end on answers of the shapes competition math uses. :func:`math_problems` writes problems of seven kinds,
each answer computed exactly (``fractions.Fraction``, integer square-root factoring), never typed by hand:

==============  =====================================================  =====================
kind            example prompt (before the ``\boxed{}`` instruction)    answer
==============  =====================================================  =====================
integer         What is $37 \times 12 - 15$?                            ``429``
negative        Compute $14 - 9 \cdot 5$.                               ``-31``
fraction        Compute $\frac{1}{3} + \frac{1}{4}$ ...                 ``\frac{7}{12}``
linear          Solve for $x$: $3x + 5 = 2$.                            ``-1`` or ``\frac{..}{..}``
radical         Simplify $\sqrt{72}$.                                   ``6\sqrt{2}``
power           What is $2^{10} - 3^{4}$?                               ``943``
decimal         What is $0.25 \times 1.2$? ...                         ``0.3``
==============  =====================================================  =====================

Every prompt ends with :data:`~p2o_lightning.tasks.math.BOXED_INSTRUCTION` (as DeepScaleR's prompts do); the chat
template, when the tokenizer has one, is applied by the rollout engine.

    python -m p2o_lightning.tasks.math_data out.jsonl [--n 240] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from p2o_lightning.tasks.math import BOXED_INSTRUCTION


def latex_fraction(q: Fraction) -> str:
    r"""``-\frac{7}{12}`` for −7/12, ``5`` for 5/1."""
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def _integer(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(11, 99), rng.randint(2, 19), rng.randint(1, 99)
    return f"What is ${a} \\times {b} - {c}$?", str(a * b - c)


def _negative(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(1, 30), rng.randint(3, 12), rng.randint(3, 12)
    return f"Compute ${a} - {b} \\cdot {c}$.", str(a - b * c)


def _fraction(rng: random.Random) -> tuple[str, str]:
    p, q = Fraction(rng.randint(1, 9), rng.randint(2, 9)), Fraction(rng.randint(1, 9), rng.randint(2, 12))
    op = rng.choice(["+", "-"])
    value = p + q if op == "+" else p - q
    left, right = f"\\frac{{{p.numerator}}}{{{p.denominator}}}", f"\\frac{{{q.numerator}}}{{{q.denominator}}}"
    return f"Compute ${left} {op} {right}$. Express your answer as a common fraction.", latex_fraction(value)


def _linear(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 9), rng.randint(-20, 20), rng.randint(-20, 20)
    sign = "+" if b >= 0 else "-"
    return f"Solve for $x$: ${a}x {sign} {abs(b)} = {c}$.", latex_fraction(Fraction(c - b, a))


def _radical(rng: random.Random) -> tuple[str, str]:
    outer, inner = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7, 10, 11])
    n = outer * outer * inner
    return f"Simplify $\\sqrt{{{n}}}$.", f"{outer}\\sqrt{{{inner}}}"


def _power(rng: random.Random) -> tuple[str, str]:
    a, m, b, k = rng.randint(2, 5), rng.randint(3, 9), rng.randint(2, 4), rng.randint(2, 4)
    return f"What is ${a}^{{{m}}} - {b}^{{{k}}}$?", str(a**m - b**k)


def _decimal(rng: random.Random) -> tuple[str, str]:
    a, b = Fraction(rng.randint(1, 99), 100), Fraction(rng.randint(1, 30), 10)
    value = a * b
    text = f"{float(value):.4f}".rstrip("0").rstrip(".")
    return f"What is ${float(a):g} \\times {float(b):g}$? Give your answer as a decimal.", text


KINDS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "integer": _integer,
    "negative": _negative,
    "fraction": _fraction,
    "linear": _linear,
    "radical": _radical,
    "power": _power,
    "decimal": _decimal,
}


def math_problems(n: int = 240, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct problems ``{"prompt", "answer", "kind"}``, the kinds in turn; deterministic in ``seed``."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        kind = kinds[len(rows) % len(kinds)]
        question, answer = KINDS[kind](rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"prompt": f"{question}\n{BOXED_INSTRUCTION}", "answer": answer, "kind": kind})
    return rows


def write_math_jsonl(path: str | os.PathLike, n: int = 240, seed: int = 0) -> Path:
    """Write :func:`math_problems` to ``path`` (one JSON object a line); an existing file is an error."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose another path (this never overwrites a file)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in math_problems(n, seed):
            f.write(json.dumps(row) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a seeded math JSONL (prompt, answer, kind).")
    parser.add_argument("path", help="output file (must not exist)")
    parser.add_argument("--n", type=int, default=240, help="number of problems")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args(argv)
    print(write_math_jsonl(args.path, args.n, args.seed))


if __name__ == "__main__":
    main()
