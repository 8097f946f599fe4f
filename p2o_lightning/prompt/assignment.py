"""Template assignment (paper Algorithm 2): a set cover of the dev problems, then K templates per hard sample.

After a search, every candidate template has a 0/1 score on each dev problem. The greedy set cover picks, one at a
time, the template that solves the most dev problems not yet solved (ties: higher mean dev score, then the earlier
candidate), until no template adds any. Each hard sample then draws K templates *with replacement*:

- a dev problem that some chosen templates solved draws only from those, weighted by their mean dev score;
- every other hard sample draws from the whole cover, weighted by mean dev score.

The seed template (empty: the plain prompt) is a candidate like any other, as in the reference: when the plain prompt
solves dev problems the others do not (near-hard ones), it joins the cover and its rows are sampled plainly. A cover
of the seed alone gives no assignment: there is nothing to distil.

With ``group_diversity`` the K draws are independent (the K rollouts of a prompt see different templates); without
it one template is drawn and used for all K (the paper's ablation). Everything is a pure function of its inputs and
a ``random.Random``, so the assignment is reproducible and checkpointable.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence


def set_cover(solved: Sequence[set[int]], scores: Sequence[float]) -> list[int]:
    """Greedy set cover: indices of templates, in pick order, covering every dev problem any template solves.

    ``solved[c]`` is the set of dev-problem ids template ``c`` solves; ``scores[c]`` its mean dev score.
    """
    if len(solved) != len(scores):
        raise ValueError(f"{len(solved)} solved-sets but {len(scores)} scores")
    uncovered = set().union(*solved) if solved else set()
    chosen: list[int] = []
    while uncovered:
        best = max(range(len(solved)), key=lambda c: (len(solved[c] & uncovered), scores[c], -c))
        gain = solved[best] & uncovered
        if not gain:
            break
        chosen.append(best)
        uncovered -= gain
    return chosen


def _mean_scores(dev_scores: Sequence[Mapping[str, float]]) -> list[float]:
    return [sum(s.values()) / max(len(s), 1) for s in dev_scores]


def _solved_sets(dev_scores: Sequence[Mapping[str, float]]) -> list[set[str]]:
    return [{p for p, v in s.items() if v > 0} for s in dev_scores]


def template_cover(templates: Sequence[str], dev_scores: Sequence[Mapping[str, float]]) -> list[int]:
    """Candidate indices the greedy set cover picks over the dev problems (the empty seed template included)."""
    if len(templates) != len(dev_scores):
        raise ValueError(f"{len(templates)} templates but {len(dev_scores)} score maps")
    return set_cover(_solved_sets(dev_scores), _mean_scores(dev_scores))


def _weighted_draws(rng: random.Random, pool: Sequence[int], scores: Sequence[float], k: int, diverse: bool):
    weights = [max(scores[c], 1e-9) for c in pool]
    if diverse:
        return rng.choices(pool, weights=weights, k=k)
    return rng.choices(pool, weights=weights, k=1) * k


def assign_templates(
    hard_prompts: Sequence[str],
    templates: Sequence[str],
    dev_scores: Sequence[Mapping[str, float]],
    k: int,
    rng: random.Random,
    group_diversity: bool = True,
) -> dict[str, list[str]]:
    """K templates for each hard prompt, as ``{prompt: [template] * K}``.

    ``templates[c]`` is candidate c's text and ``dev_scores[c]`` its score per dev prompt (keyed by prompt text).
    The seed template (empty) may be in the cover and then drawn; a cover without any non-empty template gives no
    assignment at all (an empty dict): there is nothing to distil.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    mean = _mean_scores(dev_scores)
    solved = _solved_sets(dev_scores)
    cover = template_cover(templates, dev_scores)
    if not any(templates[c].strip() for c in cover):
        return {}
    assignments = {}
    for prompt in hard_prompts:
        solvers = [c for c in cover if prompt in solved[c]]
        pool = solvers or cover
        assignments[prompt] = [templates[c] for c in _weighted_draws(rng, pool, mean, k, group_diversity)]
    return assignments
