"""One GEPA search over templates for a pool of hard problems: a function of the policy, no Trainer needed.

:func:`search_templates` splits the hard pool into GEPA's train and dev sets (dev = ``dev_size``, or half of the pool
below 450, at most ``dev_size``), runs :func:`gepa.optimize` from a seed template (the paper: the empty one; with
``warm_start``, ours, the best template of the run's previous search, so that a search starts where the last one
ended and ``search_patience`` can stop it early) with Pareto candidate selection,
``parents_per_iteration`` parents per iteration, strict-improvement acceptance, no merge, a budget in metric calls,
optionally a stop after ``search_patience`` iterations without a better best dev score and gepa's evaluation
cache), with candidates scored by the current policy (:class:`~p2o_lightning.prompt.adapter.P2OAdapter`), and
assigns each hard prompt its K templates (:mod:`~p2o_lightning.prompt.assignment`). It returns the search's
:class:`~p2o_lightning.prompt.record.SearchRecord`: candidates, dev scores, Pareto front, discovery counts, cost
(metric calls, scorer evaluations, wall and CPU seconds) and the assignments.

:func:`run_search` is that search in a run, called on every rank: rank 0 runs GEPA while every rank scores its share
of each evaluation (:class:`~p2o_lightning.prompt.scorer.CollectiveScorer`); rank 0 places the record in the run and
writes it to the run's ``p2o/`` folder. :class:`~p2o_lightning.callbacks.P2OCallback` wires it to Lightning (when,
the broadcast, the state, the logged metrics).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from p2o_lightning.prompt.adapter import COMPONENT, P2OAdapter, score_examples
from p2o_lightning.prompt.assignment import assign_templates, template_cover
from p2o_lightning.prompt.record import SearchRecord
from p2o_lightning.prompt.reflection import ReflectionError
from p2o_lightning.prompt.scorer import CollectiveScorer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How a search spends its budget, and how its templates are drawn.

    Args:
        dev_size: GEPA dev split size (paper: 300; half of the hard set below 450, at most ``dev_size``).
        max_metric_calls: search budget in evaluated examples (paper's heavy budget: about 11k at dev 300).
        search_patience: stop a search after this many GEPA iterations without a better best dev score (gepa's
            ``NoImprovementStopper``; None: only the budget stops it, the paper).
        cache_evaluation: gepa's evaluation cache: a (template, problem) pair is scored once per search (exact: the
            policy does not change during a search, and scoring is greedy), so the budget buys only new scorings.
        parents_per_iteration: W, parents (each with its own minibatch) proposed from per iteration (paper: 16).
        reflection_minibatch_size: train problems per proposal (paper: 3).
        group_diversity: the K rollouts of a prompt draw their templates independently (False: one for all K).
        warm_start: seed each search with the best template of the previous search that found one (ours; the paper
            seeds every search with the empty template); with ``search_patience`` a search that cannot better it
            stops early.
    """

    dev_size: int = 300
    max_metric_calls: int = 11000
    search_patience: int | None = None
    cache_evaluation: bool = False
    parents_per_iteration: int = 16
    reflection_minibatch_size: int = 3
    group_diversity: bool = True
    warm_start: bool = False

    def __post_init__(self) -> None:
        if self.search_patience is not None and self.search_patience < 1:
            raise ValueError(f"search_patience must be >= 1 or null, got {self.search_patience}")


def search_templates(
    module,
    hard_pool: Mapping[str, str],
    reflection,
    settings: SearchSettings,
    *,
    num_rollouts: int,
    max_new_tokens: int,
    seed: int,
    index: int,
    scorer: Callable | None = None,
    seed_template: str = "",
) -> SearchRecord:
    """GEPA over templates for ``hard_pool`` (prompt -> gold answer), scored by ``module``'s current policy.

    ``index`` numbers the searches of a run (it seeds the split, gepa and the assignment draws with ``seed``);
    ``scorer(examples, template)`` is the adapter's scorer (default: this process alone). Returns the record, not
    yet placed in a run (its ``rollout_step`` and ``epoch`` are the caller's). ``seed_template`` is GEPA's seed
    candidate (the paper: ``""``).
    """
    import gepa
    from gepa.strategies.proposal_sampling import IndependentSampling
    from gepa.utils.stop_condition import NoImprovementStopper

    rng = random.Random(seed * 7919 + index)
    hard = sorted(hard_pool.items())
    rng.shuffle(hard)
    n_dev = settings.dev_size if len(hard) >= 450 else min(settings.dev_size, len(hard) // 2)
    n_dev = min(n_dev, len(hard) - 1)
    dev = [{"prompt": p, "answer": a} for p, a in hard[:n_dev]]
    train = [{"prompt": p, "answer": a} for p, a in hard[n_dev:]]
    adapter = P2OAdapter(module, max_new_tokens=max_new_tokens, scorer=scorer)
    backend = dict(reflection.gepa_kwargs())
    stops = backend.pop("stop_callbacks", None)  # a teacher's own stop (it went down) joins the patience stop
    stops = [] if stops is None else list(stops) if isinstance(stops, (list, tuple)) else [stops]
    if settings.search_patience is not None:
        stops.append(NoImprovementStopper(settings.search_patience))
    start, cpu_start = time.perf_counter(), time.process_time()
    result = gepa.optimize(
        seed_candidate={COMPONENT: seed_template},
        trainset=train,
        valset=dev,
        adapter=adapter,
        candidate_selection_strategy="pareto",
        frontier_type="instance",
        reflection_minibatch_size=settings.reflection_minibatch_size,
        sampling_strategy=IndependentSampling(settings.parents_per_iteration),
        use_merge=False,
        max_metric_calls=settings.max_metric_calls,
        stop_callbacks=stops or None,
        cache_evaluation=settings.cache_evaluation,
        skip_perfect_score=True,
        acceptance_criterion="strict_improvement",
        seed=seed + index,
        raise_on_exception=True,  # the adapter never raises per example: anything else is a real failure
        display_progress_bar=False,
        logger=_QuietLogger(),
        run_dir=None,
        **backend,
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    templates = [c[COMPONENT] for c in result.candidates]
    dev_prompts = [ex["prompt"] for ex in dev]
    dev_scores = [{dev_prompts[i]: float(v) for i, v in sub.items()} for sub in result.val_subscores]
    dev_mean = [float(x) for x in result.val_aggregate_scores]
    hard_prompts = [p for p, _ in hard]
    assignments = assign_templates(hard_prompts, templates, dev_scores, num_rollouts, rng, settings.group_diversity)
    return SearchRecord(
        num_hard=len(hard),
        num_train=len(train),
        num_dev=len(dev),
        templates=templates,
        parents=[list(p) for p in result.parents],
        dev_mean=dev_mean,
        dev_scores=dev_scores,
        pareto_front={dev_prompts[i]: sorted(s) for i, s in result.per_val_instance_best_candidates.items()},
        discovery_eval_counts=list(result.discovery_eval_counts),
        metric_calls=adapter.num_examples,
        evaluations=getattr(scorer, "num_evaluations", 0),
        cover=template_cover(templates, dev_scores),
        assignments=assignments,
        seconds=seconds,
        cpu_seconds=cpu_seconds,  # this process's CPU time: with one torch thread, the search's cost on a core
    )


def pick_seed_template(previous: Sequence[SearchRecord], warm_start: bool) -> str:
    """GEPA's seed candidate: the empty template (the paper), or with ``warm_start`` the best template of the last of
    the ``previous`` searches that found candidates.
    """
    if warm_start:
        for record in reversed(previous):
            if record.best is not None and record.templates[record.best]:
                return record.templates[record.best]
    return ""


def run_search(
    module,
    hard_pool: Mapping[str, str],
    reflection,
    settings: SearchSettings,
    previous: Sequence[SearchRecord],
    *,
    num_rollouts: int,
    max_new_tokens: int,
    seed: int,
    rollout_step: int,
    epoch: int,
    folder: str | os.PathLike,
) -> tuple[SearchRecord | None, int]:
    """The next search of a run that made the ``previous`` ones, at RL step ``rollout_step`` of ``epoch``; call it on
    every rank.

    Rank 0 runs :func:`search_templates` (seeded by :func:`pick_seed_template`) while every rank scores its share of
    each evaluation (under FSDP2 all run the forward); rank 0 writes the placed record to
    ``folder/search_<index>.json`` and returns it, the other ranks None. A reflection backend that went down costs
    this search, not the run: its record is a skipped one (not written). Also returns the examples this rank scored.
    """
    index = len(previous)
    scorer = CollectiveScorer(partial(score_examples, module, max_new_tokens=max_new_tokens))

    def on_rank_zero() -> SearchRecord:
        try:
            found = search_templates(
                module, hard_pool, reflection, settings, num_rollouts=num_rollouts, max_new_tokens=max_new_tokens,
                seed=seed, index=index, scorer=scorer, seed_template=pick_seed_template(previous, settings.warm_start),
            )  # fmt: skip
        except ReflectionError as err:
            log.error(f"P²O search at RL step {rollout_step} skipped: {err}")
            return SearchRecord.skipped(rollout_step, epoch, str(err))
        record = dataclasses.replace(found, rollout_step=rollout_step, epoch=epoch)
        log.warning(
            f"P²O search {index} at RL step {rollout_step}: {record.num_hard} hard samples, "
            f"{len(record.templates)} candidates, {record.metric_calls} metric calls ({record.evaluations} "
            f"evaluations) in {record.seconds:.0f}s; best dev {record.best_dev_score:.3f} "
            f"({record.templates[record.best]!r}); {len(record.assignments)} prompts assigned templates"
        )
        record.write(folder, index)
        return record

    return scorer.drive(on_rank_zero), scorer.num_scored


class _QuietLogger:
    """gepa's logger protocol, routed to this module's logger at debug level."""

    def log(self, message: str) -> None:
        log.debug(message)
