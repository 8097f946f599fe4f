"""``P2OCallback``: the prompt half of P²O, wired to the Trainer. Without it, ``P2OModule`` is plain GRPO.

Hard pool, trigger and template lifetime: :class:`~p2o_lightning.prompt.schedule.P2OSchedule`; a search:
:func:`~p2o_lightning.prompt.search.run_search`. This callback feeds the schedule every rank's hard samples, runs the
searches it asks for, broadcasts their records, hands the module its assignments, logs what they found and cost and,
at each epoch end, the plain-prompt greedy accuracy of the prompts that held templates; it checkpoints the schedule.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from p2o_lightning.greedy import greedy_accuracy
from p2o_lightning.outputs import run_dir
from p2o_lightning.prompt.record import read_assignments
from p2o_lightning.prompt.reflection import OfflineProposer
from p2o_lightning.prompt.schedule import P2OSchedule, ScheduleSettings
from p2o_lightning.prompt.search import SearchSettings, run_search
from p2o_lightning.step.stats import rank_reduction
from p2o_lightning.stopwatch import Stopwatch


class P2OCallback(L.Callback):
    """GEPA prompt evolution on hard samples, and template assignment for distillation.

    Args:
        reflection: the reflection backend (``TeacherReflection`` | ``SelfReflection`` | ``OfflineProposer``).
        schedule: which prompts are hard, when a search runs, how long its templates live.
        search: how a search spends its budget, and how its templates are drawn.
        max_new_tokens: response limit when scoring templates and distilled prompts (None: the module's).
        template_pool: a ``p2o/search_*.json`` of an earlier run (or ``{"assignments": {prompt: [K templates]}}``).
        seed: seed of splits, GEPA and assignment draws.
    """

    def __init__(
        self,
        reflection: Any = None,
        schedule: ScheduleSettings = ScheduleSettings(),  # noqa: B008 (frozen; LightningCLI shows its fields)
        search: SearchSettings = SearchSettings(),  # noqa: B008
        max_new_tokens: int | None = None,
        template_pool: str | None = None,
        seed: int = 0,
    ) -> None:
        self.reflection = reflection if reflection is not None else OfflineProposer(seed=seed)
        self.schedule, self.search_settings = P2OSchedule(schedule), search
        self.max_new_tokens, self.template_pool, self.seed = max_new_tokens, template_pool, seed
        self.examples_scored = 0  # search examples this rank scored (its share of every evaluation); not saved

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        k = pl_module.rollout.num_rollouts
        self.schedule.settings.check_group_size(k)
        self.scoring_tokens = self.max_new_tokens or pl_module.rollout.max_new_tokens
        if self.template_pool is not None and not self.schedule.assignments:
            self.schedule.assignments = read_assignments(self.template_pool, k)
        if stage == "fit" and trainer.is_global_zero:
            self.reflection.check()  # an unreachable teacher fails here, before any rollout

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reflection.bind(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.template_assignments = self.schedule.assignments  # restored (FSDP2: after on_fit_start) or loaded

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        hard = self.schedule.hard_samples(outputs)
        if trainer.world_size > 1 and torch.distributed.is_initialized():  # every rank's, in rank order
            parts: list[list] = [None] * trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(parts, hard)
            hard = [sample for part in parts for sample in part]
        self.schedule.collect(hard, outputs["all_wrong"])  # the step's all-wrong share, over all ranks
        pl_module.log("p2o/hard_pool", float(len(self.schedule.hard_pool)), on_step=True)
        if self.schedule.search_due(pl_module.rollout_steps):
            self.search(trainer, pl_module)
        if self.schedule.searches:  # in every row after a search (as Lightning does within its epoch, resumed or not)
            self._log_search(pl_module, on_step=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (distilled := self.schedule.distilled_prompts(trainer.current_epoch)) is not None:  # templates applied
            watch = Stopwatch(pl_module.device)
            with watch.measure("distilled_eval"):
                accuracy = greedy_accuracy(pl_module, *distilled, self.scoring_tokens)
            pl_module.log("p2o/distilled_greedy_acc", accuracy, on_epoch=True)
            for key, seconds in watch.metrics(["distilled_eval"]).items():
                pl_module.log(key, seconds, on_epoch=True, reduce_fx=rank_reduction(key))
        self.schedule.end_epoch(trainer.current_epoch)
        pl_module.template_assignments = self.schedule.assignments
        if self.schedule.settings.trigger == "epoch":
            self.search(trainer, pl_module, in_step=False)  # epoch-end hooks may only log on_epoch

    def search(self, trainer: L.Trainer, pl_module: L.LightningModule, in_step: bool = True) -> None:
        """Search the hard pool (GEPA on rank 0, every rank scoring), then broadcast and install its record."""
        step, epoch, schedule = pl_module.rollout_steps, trainer.current_epoch, self.schedule
        if not schedule.start_search(step):
            return
        record, scored = run_search(
            pl_module, schedule.hard_pool, self.reflection, self.search_settings, schedule.searches, seed=self.seed,
            num_rollouts=pl_module.rollout.num_rollouts, max_new_tokens=self.scoring_tokens, rollout_step=step,
            epoch=epoch, folder=run_dir(trainer) / "p2o",
        )  # fmt: skip
        self.examples_scored += scored
        schedule.install(trainer.strategy.broadcast(record, src=0), epoch)
        pl_module.template_assignments = schedule.assignments
        if not in_step:  # a search in a step is logged by on_train_batch_end
            self._log_search(pl_module, on_step=False)

    def _log_search(self, pl_module: L.LightningModule, on_step: bool) -> None:
        for key, value in self.schedule.search_metrics().items():
            pl_module.log(key, float(value), on_step=on_step, on_epoch=not on_step)

    def state_dict(self) -> dict[str, Any]:
        reflection = {"reflection": self.reflection.state_dict()} if hasattr(self.reflection, "state_dict") else {}
        return {**self.schedule.state_dict(), **reflection}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)
        if "reflection" in state and hasattr(self.reflection, "load_state_dict"):
            self.reflection.load_state_dict(state["reflection"])
