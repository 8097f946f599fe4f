"""Step statistics, each declaring its reduction once: how micro-batches, PPO updates and ranks combine it.

Every statistic is one of five kinds, declared in :data:`REDUCTIONS` and nowhere else:

==========  =====================================================  ================  =========
kind        micro-batches of one update                            PPO updates       ranks
==========  =====================================================  ================  =========
``sum``     add (already normalised by the whole mini-batch)       mean              mean
``mean``    weighted by the micro-batch's share of the tokens      mean              mean
``min``     min                                                    min               min
``max``     max                                                    max               max
``count``   add                                                    add               add
==========  =====================================================  ================  =========

``self.log(..., reduce_fx=rank_reduction(key))`` reads the same table, so no reduction is inferred from a key's
name anywhere. An undeclared statistic is an error that names it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from p2o_lightning.metrics import CollapseRate
from p2o_lightning.ops import collapsed_groups
from p2o_lightning.step.batch import RolloutBatch
from p2o_lightning.step.distill import context_mask
from p2o_lightning.stopwatch import Stopwatch

# the step's stages and, inside them, P²O's extra costs over GRPO (p2o_lightning.stopwatch): the forward on the
# prompt a distilled row was sampled under, the skill anchor's backward, and the KL term's reference forward
STEP_TIMES = ("rollout", "logprob", "update", "context_forward", "anchor_backward", "reference_forward")

REDUCTIONS: dict[str, str] = {
    # the PPO loss and its terms (ops.policy_loss's stats)
    "loss": "sum",
    "pg_loss": "sum",
    "kl": "mean",
    "clip_frac": "mean",
    "dual_clip_frac": "mean",
    "ratio_mean": "mean",
    "ratio_min": "min",
    "ratio_max": "max",
    "approx_kl_old": "mean",
    "context_masked_frac": "mean",
    "anchor_loss": "sum",  # P²O's skill anchor: distilled rows' loss under the prompt they were sampled from
    "opening_open_rows": "count",  # P²O's opening gate: distilled rows whose opening tokens are taught
    # on-policy hygiene (π_old against the engine's π_rollout)
    "rollout_logprob_diff": "mean",
    "tis_weight_mean": "mean",
    "tis_capped_frac": "mean",
    # per update
    "grad_norm": "mean",
    "skipped_steps": "count",
    "padding_share": "mean",  # the update's decoder positions that are padding, over its real tokens (packing.py)
    # per step (train/...)
    "reward": "mean",
    "accuracy": "mean",
    "entropy": "mean",
    "response_length": "mean",
    "response_length_max": "max",
    "truncated": "mean",
    "reward_errors": "mean",
    "reward_timeouts": "mean",
    "lr": "mean",
    "rollout_step": "mean",
    "reward_plain": "mean",
    "sampling_rounds": "mean",
    "dropped_groups": "count",
    # per step (time/...): the wall and CPU seconds of :data:`STEP_TIMES`, each summed over the step's micro-batches
    # and updates; a mean over ranks, as time/run_cpu_s is one process's clock
    **{f"{name}{clock}": "mean" for name in STEP_TIMES for clock in ("_s", "_cpu_s")},
    "rollout_tokens_per_s": "mean",
    # P²O (p2o/...)
    "templated_share": "mean",
    "templated_success": "mean",
    "plain_in_templated_success": "mean",
    "rescued_groups": "count",
    "ctx_masked_first4": "mean",
    "ctx_masked_rest": "mean",
    "shared_first_token": "mean",
    "distilled_eval_s": "mean",  # the callback's greedy evaluation of the distilled prompts, at each epoch end
    "distilled_eval_cpu_s": "mean",
}


def reduction(key: str) -> str:
    """The declared reduction of ``key`` (a bare name, or ``prefix/name``)."""
    name = key.rsplit("/", 1)[-1]
    if name not in REDUCTIONS:
        raise KeyError(f"statistic {key!r} declares no reduction; add it to p2o_lightning.step.stats.REDUCTIONS")
    return REDUCTIONS[name]


def rank_reduction(key: str) -> str:
    """How ranks combine ``key``: the ``reduce_fx`` of Lightning's ``self.log``."""
    return {"sum": "mean", "mean": "mean", "min": "min", "max": "max", "count": "sum"}[reduction(key)]


class UpdateStats:
    """Folds a step's micro-batch and per-update statistics into per-step values, by their declared reductions."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self.updates = 0

    def _fold(self, key: str, value: float, weight: float = 1.0) -> None:
        kind = reduction(key)
        old = self._sums.get(key)
        if kind in ("min", "max"):
            self._sums[key] = value if old is None else (min if kind == "min" else max)(old, value)
        else:
            self._sums[key] = (old or 0.0) + value * (weight if kind == "mean" else 1.0)

    def add_micro(self, stats: Mapping[str, Tensor | float], token_share: float) -> None:
        """One micro-batch's statistics; ``token_share`` = its share of the mini-batch's response tokens."""
        for key, value in stats.items():
            self._fold(key, float(value), token_share)

    def end_update(self, **values: float) -> None:
        """Close one optimizer update; ``values`` are per-update statistics (``grad_norm``, ``skipped_steps``)."""
        for key, value in values.items():
            self._fold(key, float(value))
        self.updates += 1

    def result(self) -> dict[str, float]:
        """Per-step values: extremes over all updates, counts summed, everything else averaged over updates."""
        n = max(self.updates, 1)
        return {k: v if reduction(k) in ("min", "max", "count") else v / n for k, v in self._sums.items()}


def train_metrics(batch: RolloutBatch, watch: Stopwatch, lr: float, rollout_step: int) -> dict[str, Tensor | float]:
    """The step's ``train/`` and ``time/`` metrics of the rollouts (the loss statistics come from the update); the
    wall and CPU seconds of :data:`STEP_TIMES` from ``watch``, 0 for those the step did not run.
    """
    rewards, mask = batch.rewards, batch.response_mask.float()  # [G, K], [M, R]
    lengths = mask.sum(dim=1)
    return {
        "train/reward": rewards.mean(),
        "train/accuracy": (rewards >= 1.0).float().mean(),
        "train/entropy": (batch.entropy * mask).sum() / mask.sum().clamp(min=1),
        "train/response_length": lengths.mean(),
        "train/response_length_max": lengths.max(),
        "train/truncated": batch.truncated.float().mean(),
        "train/reward_errors": float(batch.reward_errors),
        "train/reward_timeouts": float(batch.reward_timeouts),
        "train/lr": lr,
        "train/rollout_step": float(rollout_step),
        **watch.metrics(STEP_TIMES),
        "time/rollout_tokens_per_s": float(mask.sum()) / max(watch.wall["rollout"], 1e-9),
    }


def p2o_metrics(batch: RolloutBatch, context_ratio_bounds: tuple[float, float] | None) -> dict[str, Tensor]:
    """P²O's diagnostics, every step under ``p2o/``; all zero while no prompt holds templates.

    - ``templated_share``: share of the batch's prompts that hold templates; ``rescued_groups``: how many of
      them have a non-zero advantage (a gradient GRPO would not have had);
    - ``templated_success`` / ``plain_in_templated_success``: reward of the templated rows, and of the rows of
      templated groups sampled from the plain prompt (mixed groups: a direct view of the transfer);
    - ``ctx_masked_first4`` / ``ctx_masked_rest``: share of distilled rows' response tokens the context ratio
      mask cuts among the first 4 response tokens, and among the rest (the opening is where a template bites);
    - ``shared_first_token``: share of templated rows whose first response token is the first token of every
      rollout of their group (such an opening gets no net gradient: the group's advantages sum to zero).
    """
    plan, rewards, K = batch.plan, batch.rewards, batch.group_size
    device = rewards.device
    mask = batch.response_mask.float()
    zero = torch.zeros((), device=device)
    groups = torch.tensor(plan.templated_groups, device=device)  # [G]
    rows = torch.tensor(plan.templated_rows, device=device)  # [M]
    in_group = groups.repeat_interleave(K)  # [M]
    flat = rewards.view(-1)
    plain_in_group = in_group & ~rows
    rescued = groups & ~collapsed_groups(rewards)
    metrics = {
        "p2o/templated_share": groups.float().mean(),
        "p2o/templated_success": flat[rows].mean() if rows.any() else zero,
        "p2o/plain_in_templated_success": flat[plain_in_group].mean() if plain_in_group.any() else zero,
        "p2o/rescued_groups": rescued.float().sum(),
        "train/reward_plain": rewards[~groups].mean() if (~groups).any() else zero,
    }
    first4, rest = zero, zero
    distilled = batch.distilled  # [M]
    kept = context_mask(batch, context_ratio_bounds)  # [M, R] or None
    if kept is not None and distilled.any():
        cut = (~kept).float() * mask
        cut, resp = cut[distilled], mask[distilled]  # [M, R] → the distilled rows
        first4 = cut[:, :4].sum() / resp[:, :4].sum().clamp(min=1)
        rest = cut[:, 4:].sum() / resp[:, 4:].sum().clamp(min=1)
    metrics["p2o/ctx_masked_first4"] = first4
    metrics["p2o/ctx_masked_rest"] = rest
    first = batch.response_ids[:, 0].view(-1, K)  # [G, K]
    same = (first == first[:, :1]).all(dim=1).repeat_interleave(K)  # [M]: the group opens with one token
    metrics["p2o/shared_first_token"] = (same & rows).float().sum() / rows.sum() if rows.any() else zero
    return metrics


def sampling_metrics(seen: RolloutBatch, rounds: int) -> dict[str, float]:
    """Dynamic sampling: the rounds run and the groups without reward spread among all sampled (1 and 0 when off)."""
    dropped = collapsed_groups(seen.rewards)  # [G]
    return {"train/sampling_rounds": float(rounds), "train/dropped_groups": float(dropped.sum())}


def log_step(
    log: Callable[..., None], collapse_rate: CollapseRate, metrics: Mapping[str, Tensor | float], rewards: Tensor
) -> dict[str, float]:
    """Log a step's metrics through ``log`` (Lightning's ``self.log``), each reduced over ranks as declared, and the
    collapse rate of ``rewards`` (``collapse_rate``, reset after); returns the collapse shares (``collapse_rate``,
    ``collapse_all_wrong``, ``collapse_all_right``) of every rank.
    """
    for key, value in metrics.items():
        log(key, value, on_step=True, sync_dist=True, reduce_fx=rank_reduction(key))
    collapse_rate.update(rewards)
    collapse = {key: value.item() for key, value in collapse_rate.compute().items()}  # reduced over ranks
    for key, value in collapse.items():
        log(f"train/{key}", value, on_step=True, prog_bar=key == "collapse_rate")
    collapse_rate.reset()
    log("reward", rewards.mean(), on_step=True, prog_bar=True, logger=False, sync_dist=True)
    return collapse
