"""P²O between searches: which prompts are hard, when the next search runs, and how long its templates live.

A plain, checkpointable class with no Lightning in it; :class:`~p2o_lightning.callbacks.P2OCallback` feeds it each
step's groups and the epoch ends, runs the searches it asks for, and hands the module its assignments.

- **Hard pool.** A prompt is a *hard sample* when at most τ−1 of its K rollouts are correct (the paper: τ=2, hard and
  near-hard; :func:`hard_groups`). Its gold answer is kept until the next search.
- **Trigger.** ``epoch``: at every epoch end (the paper); ``steps``: every ``every_n_steps`` RL steps; ``collapse``:
  when the all-wrong group share averaged over the last ``collapse_window`` steps reaches ``collapse_threshold``,
  at most once per ``every_n_steps``. A search needs ``min_hard_samples``; the pool is cleared after a search (and,
  under the epoch trigger, after an epoch too small to search: the reference collects per epoch).
- **Template lifetime.** ``epoch`` (the reference): a search's templates apply in the epoch after it only, to the
  prompts that were hard in the epoch searched; at every epoch end they expire, the new search installs the next
  epoch's, a skipped search leaves none. ``forever``: every assignment is kept for the rest of the run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from p2o_lightning.prompt.record import SearchRecord

TRIGGERS = ("epoch", "steps", "collapse")
LIFETIMES = ("epoch", "forever")
HARDNESS = ("plain", "sampled")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
    """Which prompts are hard, when a search runs, and how long its templates live.

    Args:
        tau: a prompt is hard when at most ``tau - 1`` of its K rollouts are correct (paper: 2).
        hardness: what makes a prompt hard: ``plain`` (its rollouts sampled from the plain prompt: all K of a plain
            group, the plain rollouts of a mixed templated group, with the same share τ−1 of K — a prompt its
            template solves stays hard until the plain prompt solves it) | ``sampled`` (the reference: all K
            rollouts as sampled, templated ones included; also what ``plain`` does for a group without plain rows).
        trigger: ``epoch`` (end of every epoch, the paper) | ``steps`` (every ``every_n_steps`` RL steps) |
            ``collapse`` (when the all-wrong share of the last ``collapse_window`` steps reaches
            ``collapse_threshold``; then at most once per ``every_n_steps``).
        every_n_steps: period of the ``steps`` trigger, and the minimum gap of the ``collapse`` trigger.
        collapse_threshold: all-wrong group share that fires the ``collapse`` trigger.
        collapse_window: RL steps averaged by the ``collapse`` trigger.
        min_hard_samples: skip the search below this many hard samples (paper: 100).
        template_lifetime: ``epoch`` (the reference: a search's templates apply until the end of the epoch after
            the one it ran in, then expire) | ``forever`` (every assignment is kept for the rest of the run).
        clear_pool_after_search: start a new hard pool after each search (the paper collects per epoch).
    """

    tau: int = 2
    hardness: str = "plain"
    trigger: str = "epoch"
    every_n_steps: int = 50
    collapse_threshold: float = 0.5
    collapse_window: int = 5
    min_hard_samples: int = 100
    template_lifetime: str = "epoch"
    clear_pool_after_search: bool = True

    def __post_init__(self) -> None:
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger={self.trigger!r} is unknown; choose one of {TRIGGERS}")
        if self.hardness not in HARDNESS:
            raise ValueError(f"hardness={self.hardness!r} is unknown; choose one of {HARDNESS}")
        if self.template_lifetime not in LIFETIMES:
            raise ValueError(f"template_lifetime={self.template_lifetime!r} is unknown; choose one of {LIFETIMES}")
        if self.tau < 1:
            raise ValueError(f"tau must be >= 1, got {self.tau}")
        if self.min_hard_samples < 2:
            raise ValueError(f"min_hard_samples must be >= 2 (a train and a dev problem), got {self.min_hard_samples}")
        if self.every_n_steps < 1 or self.collapse_window < 1:
            raise ValueError(f"every_n_steps and collapse_window must be >= 1, got {self.every_n_steps}, "
                             f"{self.collapse_window}")  # fmt: skip

    def check_group_size(self, num_rollouts: int) -> None:
        """``tau`` counts correct rollouts of a group of K = ``num_rollouts``: it may not exceed K."""
        if self.tau > num_rollouts:
            raise ValueError(f"P2OCallback schedule.tau={self.tau} is larger than K=num_rollouts={num_rollouts}")


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


class P2OSchedule:
    """The hard pool, the trigger's memory, the live template assignments and the search history of one run."""

    def __init__(self, settings: ScheduleSettings | None = None) -> None:
        self.settings = settings or ScheduleSettings()
        self.hard_pool: dict[str, str] = {}  # prompt -> gold answer
        self.assignments: dict[str, list[str]] = {}  # prompt -> K templates
        self.assigned_answers: dict[str, str] = {}  # prompt -> gold answer, of the prompts holding templates
        self.assigned_epoch = -1  # the epoch the current assignments were made in (they last through the next)
        self.searches: list[SearchRecord] = []  # one per search: candidates, dev scores, front, assignments, cost
        self.recent_all_wrong: list[float] = []  # the all-wrong group share of the last collapse_window steps
        self.last_search_step = -(10**9)

    # ------------------------------------------------------------------ each step
    def hard_samples(self, outputs: Mapping[str, Any]) -> list[tuple[str, str]]:
        """``(prompt, answer)`` of a step's hard groups, from the step's ``prompts``, ``answers``, ``rewards`` [B, K]
        and ``plain_rows`` [B, K] (optional; see :func:`hard_groups`).
        """
        s = self.settings
        hard = hard_groups(outputs["rewards"], outputs.get("plain_rows"), s.tau, s.hardness).tolist()  # [B]
        return [(prompt, answer) for prompt, answer, h in zip(outputs["prompts"], outputs["answers"], hard) if h]

    def collect(self, hard: Iterable[tuple[str, str]], all_wrong: float) -> None:
        """A step's hard samples ``(prompt, answer)`` (every rank's) and its all-wrong group share."""
        for prompt, answer in hard:
            self.hard_pool[prompt] = answer
        self.recent_all_wrong = [*self.recent_all_wrong, float(all_wrong)][-self.settings.collapse_window :]

    def search_due(self, step: int) -> bool:
        """Whether the ``steps`` or ``collapse`` trigger fires after RL step ``step`` (the epoch's: at epoch end)."""
        s, recent = self.settings, self.recent_all_wrong
        if s.trigger == "steps":
            return step % s.every_n_steps == 0
        collapsed = len(recent) == s.collapse_window and sum(recent) / s.collapse_window >= s.collapse_threshold
        return s.trigger == "collapse" and collapsed and step - self.last_search_step >= s.every_n_steps

    # ------------------------------------------------------------------ each epoch end
    def distilled_prompts(self, epoch: int) -> tuple[list[str], list[str]] | None:
        """The prompts whose templates applied during ``epoch`` and their answers (sorted), or None when none did:
        their plain-prompt accuracy is what the distillation taught.
        """
        if not self.assignments or self.assigned_epoch >= epoch:
            return None
        prompts = sorted(p for p in self.assignments if p in self.assigned_answers)
        return prompts, [self.assigned_answers[p] for p in prompts]

    def end_epoch(self, epoch: int) -> None:
        """Under the ``epoch`` lifetime, the templates that applied during ``epoch`` expire."""
        if self.settings.template_lifetime == "epoch" and self.assigned_epoch < epoch:
            self.assignments, self.assigned_answers = {}, {}

    # ------------------------------------------------------------------ searches
    def start_search(self, step: int) -> bool:
        """A search is due at RL step ``step``: whether the pool is large enough to run it (if not, an epoch trigger
        clears the pool as the reference does, searched or not).
        """
        s = self.settings
        self.last_search_step = step
        if len(self.hard_pool) >= s.min_hard_samples:
            return True
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:  # said once, like a search
            log.warning(
                f"P²O search due at RL step {step} skipped: {len(self.hard_pool)} hard samples < "
                f"min_hard_samples={s.min_hard_samples}"
            )
        if s.clear_pool_after_search and s.trigger == "epoch":
            self.hard_pool = {}
        return False

    def install(self, record: SearchRecord, epoch: int) -> None:
        """The search's record (the same on every rank): its assignments apply from now (under the ``epoch``
        lifetime, in place of the last search's); the pool starts afresh if ``clear_pool_after_search``.
        """
        self.searches.append(record)
        if self.settings.template_lifetime == "epoch":
            self.assignments, self.assigned_answers = {}, {}
        self.assignments.update(record.assignments)
        self.assigned_answers.update({p: self.hard_pool[p] for p in record.assignments if p in self.hard_pool})
        self.assigned_epoch = epoch
        if self.settings.clear_pool_after_search:
            self.hard_pool = {}

    def search_metrics(self) -> dict[str, float]:
        """The number of searches so far, the prompts holding templates, and what the latest search found and cost."""
        record = self.searches[-1]
        return {
            "p2o/searches": len(self.searches),
            "p2o/assigned_prompts": len(self.assignments),
            "p2o/best_dev_score": record.best_dev_score,
            "time/search_s": record.seconds,  # what the search costs: wall time, greedy evaluations
            "time/search_cpu_s": record.cpu_seconds,  # ... and this process's CPU time
            "p2o/search_metric_calls": record.metric_calls,  # examples scored (gepa's budget unit)
            "p2o/search_evaluations": record.evaluations,  # scorer calls: one generate per 64 examples
        }

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "hard_pool": dict(self.hard_pool),
            "assignments": {k: list(v) for k, v in self.assignments.items()},
            "assigned_answers": dict(self.assigned_answers),
            "assigned_epoch": self.assigned_epoch,
            "searches": [record.to_dict() for record in self.searches],
            "recent_all_wrong": list(self.recent_all_wrong),
            "last_search_step": self.last_search_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hard_pool = dict(state["hard_pool"])
        self.assignments = {k: list(v) for k, v in state["assignments"].items()}
        self.assigned_answers = dict(state.get("assigned_answers", {}))
        self.assigned_epoch = state.get("assigned_epoch", -1)
        self.searches = [SearchRecord.from_dict(record) for record in state["searches"]]
        self.recent_all_wrong = list(state["recent_all_wrong"])
        self.last_search_step = state["last_search_step"]
