"""``P2OCallback``: the prompt half of P²O. Without it, :class:`~p2o_lightning.module.P2OModule` is plain GRPO.

Each training step it collects the *hard samples* — prompts with at most τ−1 correct rollouts out of K (the paper:
τ=2, hard and near-hard) — from every rank. When the trigger fires (the end of an epoch as the paper, every N steps,
or when the running all-wrong collapse rate passes a threshold) and at least ``min_hard_samples`` were collected, rank
0 runs one template search over them (:func:`~p2o_lightning.prompt.search.search_templates`: GEPA from the empty
template, candidates scored by the *current* policy, greedy, 0/1, every rank scoring its share of each evaluation
through :class:`~p2o_lightning.prompt.scorer.CollectiveScorer`; the reflection backend of
:mod:`~p2o_lightning.prompt.reflection` writes children; ``search_patience`` and ``cache_evaluation`` cut its cost).

The search's set cover + weighted K-template assignment (:mod:`~p2o_lightning.prompt.assignment`) gives each hard
prompt its templates; rank 0 writes the search's :class:`~p2o_lightning.prompt.record.SearchRecord` to the run's
``p2o/search_<i>.json`` and broadcasts it, and every rank hands its assignments to the module, keyed by prompt text
(the collapse trigger reads the all-wrong share the module returns with each step's outputs). The
module samples those prompts' rollouts from templated prompts and distils them into the plain prompt (context
distillation; :mod:`p2o_lightning.step.plan`).

**Template lifetime** (``template_lifetime: epoch``, the reference): a search's templates apply in the epoch after
it only, to the prompts that were hard in the epoch searched. At every epoch end they expire; the new search, scored
by the current policy on this epoch's hard set, installs the next epoch's; a skipped search leaves none, and a prompt
no longer hard goes back to plain rollouts. ``forever`` keeps every assignment for the rest of the run.

At every epoch end, before the templates expire, the plain-prompt greedy accuracy of the prompts that held them is
logged as ``p2o/distilled_greedy_acc``: the direct measure of what the distillation taught. It is one of P²O's extra
costs over GRPO, logged with its wall and CPU seconds (``time/distilled_eval_s``, ``time/distilled_eval_cpu_s``)
as the search is (``time/search_s``, ``time/search_cpu_s``).

The callback is stateful: the hard pool, every search's candidates with their dev scores, the Pareto front, the
assignments and the search history are in the checkpoint, so a resumed run continues with them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from p2o_lightning.greedy import greedy_accuracy
from p2o_lightning.outputs import run_dir
from p2o_lightning.prompt.adapter import score_examples
from p2o_lightning.prompt.record import SearchRecord
from p2o_lightning.prompt.reflection import OfflineProposer, ReflectionError
from p2o_lightning.prompt.scorer import CollectiveScorer
from p2o_lightning.prompt.search import SearchSettings, search_templates
from p2o_lightning.step.stats import rank_reduction
from p2o_lightning.stopwatch import Stopwatch

log = logging.getLogger(__name__)
TRIGGERS = ("epoch", "steps", "collapse")
LIFETIMES = ("epoch", "forever")
HARDNESS = ("plain", "sampled")


class P2OCallback(L.Callback):
    """Collapse-triggered GEPA prompt evolution on hard samples, and template assignment for distillation.

    Args:
        reflection: the reflection backend (``TeacherReflection`` | ``SelfReflection`` | ``OfflineProposer``).
        tau: a prompt is hard when at most ``tau - 1`` of its K rollouts are correct (paper: 2).
        trigger: ``epoch`` (end of every epoch, the paper) | ``steps`` (every ``every_n_steps`` RL steps) |
            ``collapse`` (when the all-wrong share of the last ``collapse_window`` steps reaches
            ``collapse_threshold``; then at most once per ``every_n_steps``).
        every_n_steps: period of the ``steps`` trigger, and the minimum gap of the ``collapse`` trigger.
        collapse_threshold: all-wrong group share that fires the ``collapse`` trigger.
        collapse_window: RL steps averaged by the ``collapse`` trigger.
        min_hard_samples: skip the search below this many hard samples (paper: 100).
        dev_size: GEPA dev split size (paper: 300; half of the hard set below 450, at most ``dev_size``).
        max_metric_calls: search budget in evaluated examples (paper's heavy budget: about 11k at dev 300).
        search_patience: stop a search after this many GEPA iterations without a better best dev score (gepa's
            ``NoImprovementStopper``; None: only the budget stops it, the paper).
        cache_evaluation: gepa's evaluation cache: a (template, problem) pair is scored once per search (exact: the
            policy does not change during a search, and scoring is greedy), so the budget buys only new scorings.
        warm_start: seed each search with the best template of the previous search that found one (ours; the paper
            seeds every search with the empty template); with ``search_patience`` a search that cannot better it
            stops early.
        parents_per_iteration: W, parents (each with its own minibatch) proposed from per iteration (paper: 16).
        reflection_minibatch_size: train problems per proposal (paper: 3).
        max_new_tokens: response limit when scoring templates (None: the module's ``max_new_tokens``).
        group_diversity: the K rollouts of a prompt draw their templates independently (False: one for all K).
        hardness: what makes a prompt hard: ``plain`` (its rollouts sampled from the plain prompt: all K of a plain
            group, the plain rollouts of a mixed templated group, with the same share τ−1 of K — a prompt its
            template solves stays hard until the plain prompt solves it) | ``sampled`` (the reference: all K
            rollouts as sampled, templated ones included; also what ``plain`` does for a group without plain rows).
        template_lifetime: ``epoch`` (the reference: a search's templates apply until the end of the epoch after
            the one it ran in, then expire) | ``forever`` (every assignment is kept for the rest of the run).
        clear_pool_after_search: start a new hard pool after each search (the paper collects per epoch).
        template_pool: a JSON file of template assignments to start from: a ``p2o/search_*.json`` of an earlier
            run, or ``{"assignments": {prompt: [K templates]}}``; checked before training.
        seed: seed of splits, GEPA and assignment draws.
    """

    def __init__(
        self,
        reflection: Any = None,
        tau: int = 2,
        trigger: str = "epoch",
        every_n_steps: int = 50,
        collapse_threshold: float = 0.5,
        collapse_window: int = 5,
        min_hard_samples: int = 100,
        dev_size: int = 300,
        max_metric_calls: int = 11000,
        search_patience: int | None = None,
        cache_evaluation: bool = False,
        warm_start: bool = False,
        parents_per_iteration: int = 16,
        reflection_minibatch_size: int = 3,
        max_new_tokens: int | None = None,
        group_diversity: bool = True,
        hardness: str = "plain",
        template_lifetime: str = "epoch",
        clear_pool_after_search: bool = True,
        template_pool: str | None = None,
        seed: int = 0,
    ) -> None:
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger={trigger!r} is unknown; choose one of {TRIGGERS}")
        if hardness not in HARDNESS:
            raise ValueError(f"hardness={hardness!r} is unknown; choose one of {HARDNESS}")
        if template_lifetime not in LIFETIMES:
            raise ValueError(f"template_lifetime={template_lifetime!r} is unknown; choose one of {LIFETIMES}")
        if tau < 1:
            raise ValueError(f"tau must be >= 1, got {tau}")
        if search_patience is not None and search_patience < 1:
            raise ValueError(f"search_patience must be >= 1 or null, got {search_patience}")
        if min_hard_samples < 2:
            raise ValueError(f"min_hard_samples must be >= 2 (a train and a dev problem), got {min_hard_samples}")
        self.reflection = reflection if reflection is not None else OfflineProposer(seed=seed)
        self.tau = tau
        self.trigger = trigger
        self.every_n_steps = every_n_steps
        self.collapse_threshold = collapse_threshold
        self.collapse_window = collapse_window
        self.min_hard_samples = min_hard_samples
        self.search_settings = SearchSettings(
            dev_size=dev_size,
            max_metric_calls=max_metric_calls,
            search_patience=search_patience,
            cache_evaluation=cache_evaluation,
            warm_start=warm_start,
            parents_per_iteration=parents_per_iteration,
            reflection_minibatch_size=reflection_minibatch_size,
            group_diversity=group_diversity,
        )
        self.max_new_tokens = max_new_tokens
        self.template_lifetime = template_lifetime
        self.hardness = hardness
        self.clear_pool_after_search = clear_pool_after_search
        self.template_pool = template_pool
        self.seed = seed
        # state (checkpointed)
        self.hard_pool: dict[str, str] = {}  # prompt -> gold answer
        self.assignments: dict[str, list[str]] = {}  # prompt -> K templates
        self.assigned_answers: dict[str, str] = {}  # prompt -> gold answer, of the prompts holding templates
        self.assigned_epoch = -1  # the epoch the current assignments were made in (they last through the next)
        self.searches: list[SearchRecord] = []  # one per search: candidates, dev scores, front, assignments, cost
        self.recent_all_wrong: list[float] = []
        self.last_search_step = -(10**9)
        self.examples_scored = 0  # search examples this rank scored (its share of every evaluation); not saved

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        k = pl_module.hparams.num_rollouts
        if self.tau > k:
            raise ValueError(f"P2OCallback tau={self.tau} is larger than K=num_rollouts={k}")
        if self.template_pool is not None and not self.assignments:
            self.assignments = load_template_pool(self.template_pool, k)
        if stage == "fit" and trainer.is_global_zero:
            self.reflection.check()  # an unreachable teacher fails here, before any rollout

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reflection.bind(pl_module)
        pl_module.template_assignments = self.assignments

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a sharded (FSDP2) checkpoint is restored after on_fit_start: hand the module the restored assignments
        pl_module.template_assignments = self.assignments

    # ------------------------------------------------------------------ collection
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        hard = hard_groups(outputs["rewards"], outputs.get("plain_rows"), self.tau, self.hardness)  # [B]
        local = [(p, a) for p, a, h in zip(outputs["prompts"], outputs["answers"], hard.tolist()) if h]
        for prompt, answer in _gather(trainer, local):
            self.hard_pool[prompt] = answer
        self.recent_all_wrong.append(float(outputs["all_wrong"]))  # the step's all-wrong share over all ranks
        self.recent_all_wrong = self.recent_all_wrong[-self.collapse_window :]
        pl_module.log("p2o/hard_pool", float(len(self.hard_pool)), on_step=True)
        step = pl_module.rollout_steps
        if self.trigger == "steps" and step % self.every_n_steps == 0:
            self.search(trainer, pl_module)
        elif (
            self.trigger == "collapse"
            and len(self.recent_all_wrong) == self.collapse_window
            and sum(self.recent_all_wrong) / self.collapse_window >= self.collapse_threshold
            and step - self.last_search_step >= self.every_n_steps
        ):
            self.search(trainer, pl_module)
        if self.searches:
            # the latest search's numbers in every row after it: Lightning repeats a value logged at one step in the
            # later rows of its epoch anyway, and a run resumed mid-epoch would otherwise write other rows
            self._log_search(pl_module, on_step=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if self.assignments and self.assigned_epoch < epoch:  # they applied during this epoch
            watch = Stopwatch(pl_module.device)
            with watch.measure("distilled_eval"):
                accuracy = self.distilled_accuracy(pl_module)
            pl_module.log("p2o/distilled_greedy_acc", accuracy, on_epoch=True)
            for key, seconds in watch.metrics(["distilled_eval"]).items():
                pl_module.log(key, seconds, on_epoch=True, reduce_fx=rank_reduction(key))
        if self.template_lifetime == "epoch" and self.assigned_epoch < epoch:
            self.assignments, self.assigned_answers = {}, {}  # expired: their epoch is over
            pl_module.template_assignments = self.assignments
        if self.trigger == "epoch":
            self.search(trainer, pl_module, in_step=False)  # epoch-end hooks may only log on_epoch

    def distilled_accuracy(self, pl_module: L.LightningModule) -> float:
        """Plain-prompt greedy accuracy of the prompts holding templates (every rank scores all of them)."""
        prompts = sorted(p for p in self.assignments if p in self.assigned_answers)
        max_new = self.max_new_tokens or pl_module.hparams.max_new_tokens
        return greedy_accuracy(pl_module, prompts, [self.assigned_answers[p] for p in prompts], max_new)

    # ------------------------------------------------------------------ search
    def search(self, trainer: L.Trainer, pl_module: L.LightningModule, in_step: bool = True) -> None:
        """Run GEPA on rank 0 over the hard pool, then broadcast and install the new assignments."""
        step = pl_module.rollout_steps
        self.last_search_step = step
        if len(self.hard_pool) < self.min_hard_samples:
            log.info(f"P²O: {len(self.hard_pool)} hard samples < min_hard_samples={self.min_hard_samples}; no search")
            if self.clear_pool_after_search and self.trigger == "epoch":
                self.hard_pool = {}  # the reference collects hard samples per epoch, searched or not
            return
        max_new = self.max_new_tokens or pl_module.hparams.max_new_tokens
        scorer = CollectiveScorer(partial(score_examples, pl_module, max_new_tokens=max_new))

        def run_search() -> SearchRecord:
            try:
                return self._run_search(trainer, pl_module, step, scorer, max_new)
            except ReflectionError as err:  # a teacher that went down mid-run costs this search, not the run
                log.error(f"P²O search at RL step {step} skipped: {err}")
                return SearchRecord.skipped(step, trainer.current_epoch, str(err))

        # rank 0 runs GEPA; every rank scores its share of each evaluation (under FSDP2 all run the forward)
        record = scorer.drive(run_search)
        self.examples_scored += scorer.num_scored
        record = trainer.strategy.broadcast(record, src=0)
        self.searches.append(record)
        if self.template_lifetime == "epoch":
            self.assignments, self.assigned_answers = {}, {}
        self.assignments.update(record.assignments)
        self.assigned_answers.update({p: self.hard_pool[p] for p in record.assignments if p in self.hard_pool})
        self.assigned_epoch = trainer.current_epoch
        pl_module.template_assignments = self.assignments
        if self.clear_pool_after_search:
            self.hard_pool = {}
        if not in_step:  # a search in a step is logged by on_train_batch_end
            self._log_search(pl_module, on_step=False)

    def _log_search(self, pl_module: L.LightningModule, on_step: bool) -> None:
        """The number of searches so far, the prompts holding templates, and what the latest search found and cost."""
        record = self.searches[-1]
        for key, value in (
            ("p2o/searches", len(self.searches)),
            ("p2o/assigned_prompts", len(self.assignments)),
            ("p2o/best_dev_score", record.best_dev_score),
            ("time/search_s", record.seconds),  # what the search costs: wall time, greedy evaluations
            ("time/search_cpu_s", record.cpu_seconds),  # ... and this process's CPU time
            ("p2o/search_metric_calls", record.metric_calls),  # examples scored (gepa's budget unit)
            ("p2o/search_evaluations", record.evaluations),  # scorer calls: one generate per 64 examples
        ):
            pl_module.log(key, float(value), on_step=on_step, on_epoch=not on_step)

    def _run_search(self, trainer, pl_module, step: int, scorer: CollectiveScorer, max_new_tokens: int) -> SearchRecord:
        """:func:`~p2o_lightning.prompt.search.search_templates` on the hard pool, placed in the run and written to
        its ``p2o/`` folder (rank 0).
        """
        index = len(self.searches)
        found = search_templates(
            pl_module, self.hard_pool, self.reflection, self.search_settings,
            num_rollouts=pl_module.hparams.num_rollouts, max_new_tokens=max_new_tokens,
            seed=self.seed, index=index, scorer=scorer, seed_template=self.seed_template(),
        )  # fmt: skip
        record = dataclasses.replace(found, rollout_step=step, epoch=trainer.current_epoch)
        best = record.best
        log.warning(
            f"P²O search {index} at RL step {record.rollout_step}: {record.num_hard} hard samples, "
            f"{len(record.templates)} candidates, {record.metric_calls} metric calls ({record.evaluations} "
            f"evaluations) in {record.seconds:.0f}s; best dev {record.best_dev_score:.3f} "
            f"({record.templates[best]!r}); {len(record.assignments)} prompts assigned templates"
        )
        record.write(run_dir(trainer) / "p2o", index)
        return record

    def seed_template(self) -> str:
        """GEPA's seed candidate: the empty template (the paper), or with ``warm_start`` the best template of the last
        search that found candidates.
        """
        if self.search_settings.warm_start:
            for record in reversed(self.searches):
                if record.best is not None and record.templates[record.best]:
                    return record.templates[record.best]
        return ""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {
            "hard_pool": dict(self.hard_pool),
            "assignments": {k: list(v) for k, v in self.assignments.items()},
            "assigned_answers": dict(self.assigned_answers),
            "assigned_epoch": self.assigned_epoch,
            "searches": [record.to_dict() for record in self.searches],
            "recent_all_wrong": list(self.recent_all_wrong),
            "last_search_step": self.last_search_step,
        }
        if hasattr(self.reflection, "state_dict"):
            state["reflection"] = self.reflection.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hard_pool = dict(state["hard_pool"])
        self.assignments = {k: list(v) for k, v in state["assignments"].items()}
        self.assigned_answers = dict(state.get("assigned_answers", {}))
        self.assigned_epoch = state.get("assigned_epoch", -1)
        self.searches = [SearchRecord.from_dict(record) for record in state["searches"]]
        self.recent_all_wrong = list(state["recent_all_wrong"])
        self.last_search_step = state["last_search_step"]
        if "reflection" in state and hasattr(self.reflection, "load_state_dict"):
            self.reflection.load_state_dict(state["reflection"])


def hard_groups(rewards: torch.Tensor, plain_rows: torch.Tensor | None, tau: int, hardness: str) -> torch.Tensor:
    """[B] which groups are hard samples: at most a share (τ−1)/K of their counted rollouts correct.

    ``rewards`` [B, K]; ``plain_rows`` [B, K] bool, the rows sampled from the plain prompt (None: all of them).
    With ``hardness="plain"`` a group's plain rows are counted (all K rows when it has none); with ``sampled``
    all K rows are.
    """
    correct = rewards >= 1.0  # [B, K]
    k = rewards.shape[1]
    counted = torch.ones_like(correct)
    if hardness == "plain" and plain_rows is not None:
        has_plain = plain_rows.any(dim=1, keepdim=True)  # [B, 1]
        counted = torch.where(has_plain, plain_rows.bool(), counted)
    # c / n <= (τ − 1) / K, in integers: c · K <= (τ − 1) · n
    return (correct & counted).sum(dim=1) * k <= (tau - 1) * counted.sum(dim=1)


def load_template_pool(path: str, k: int) -> dict[str, list[str]]:
    """Assignments ``{prompt: [K templates]}`` from a JSON file; errors name the file and what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"template_pool {path}: cannot be read ({err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"template_pool {path}: not valid JSON ({err})") from err
    assignments = data.get("assignments") if isinstance(data, dict) else None
    if not isinstance(assignments, dict):
        raise ValueError(f"template_pool {path}: expected an object with an 'assignments' mapping")
    for prompt, templates in assignments.items():
        if not (isinstance(templates, list) and len(templates) == k and all(isinstance(t, str) for t in templates)):
            raise ValueError(
                f"template_pool {path}: prompt {prompt[:40]!r} must map to a list of K={k} template strings"
            )
    return {p: list(t) for p, t in assignments.items()}


def _gather(trainer: L.Trainer, items: list) -> list:
    """Every rank's ``items``, concatenated in rank order (the local list when not distributed)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return items
    gathered: list[list] = [None] * trainer.world_size  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]
