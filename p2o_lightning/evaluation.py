"""Validation and test: greedy accuracy and mean@k of each split (and subset) under the plain prompt.

Each batch is one split's (``row["split"]``; rows may carry a ``subset`` reported on its own too, e.g. the embedded
world's ``easy`` / ``hard`` parts of ``in_dist``). Greedy decoding (:func:`~p2o_lightning.greedy.greedy_scores`, the
scorer the template search uses too) gives ``{prefix}/{split}/greedy_acc``; k samples
at ``val_temperature`` give ``{prefix}/{split}/mean@k``. Sampling draws from its own seeded stream, so evaluating
never shifts the training RNG. The metrics are torchmetrics ``MeanMetric`` held by the module (reduced over ranks).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from p2o_lightning.greedy import greedy_scores
from p2o_lightning.rollout import SamplingParams


def add_val_metrics(module, names: list[str]) -> None:
    """One ``MeanMetric`` per split (or subset) name and kind in ``module.val_metrics``."""
    for name in names:
        for kind in ("greedy", "mean_at_k"):
            if f"{name}_{kind}" not in module.val_metrics:
                module.val_metrics[f"{name}_{kind}"] = MeanMetric()


def evaluate(module, batch: list[dict], prefix: str) -> None:
    """Score one validation / test batch of ``module`` and update (and log) its split's metrics."""
    val, rollout = module.validation, module.rollout
    prompts = [row["prompt"] for row in batch]
    answers = [row["answer"] for row in batch]
    max_new = val.max_new_tokens or rollout.max_new_tokens
    with torch.random.fork_rng(devices=[module.device] if module.device.type == "cuda" else []):
        torch.manual_seed(module.seed * 7919 + module.global_step * 31 + batch[0]["index"])
        greedy = [reward for _, reward, _ in greedy_scores(module, prompts, answers, max_new, batch_size=None)]
        _update(module, prefix, batch, "greedy", torch.tensor(greedy, device=module.device))
        if val.num_samples > 0:
            n = val.num_samples
            _, grade = module.sample(prompts, answers, SamplingParams(n, val.temperature, rollout.top_p, max_new))
            rewards = torch.tensor(grade.rewards, device=module.device).view(len(prompts), n).mean(dim=1)
            _update(module, prefix, batch, "mean_at_k", rewards)


def metric_name(prefix: str, key: str, k: int) -> str:
    """``val/in_dist/greedy_acc`` for key ``in_dist_greedy``, ``val/in_dist/mean@4`` for ``in_dist_mean_at_k``."""
    if key.endswith("_greedy"):
        return f"{prefix}/{key[: -len('_greedy')]}/greedy_acc"
    return f"{prefix}/{key[: -len('_mean_at_k')]}/mean@{k}"


def _update(module, prefix: str, batch: list[dict], kind: str, values: Tensor) -> None:
    """Update the split's metric with ``values`` [len(batch)], and each subset's with its rows."""
    _update_one(module, prefix, batch[0]["split"], kind, values)
    for subset in sorted({row["subset"] for row in batch if row.get("subset")}):
        rows = torch.tensor([row.get("subset") == subset for row in batch], device=module.device)
        _update_one(module, prefix, subset, kind, values[rows])


def _update_one(module, prefix: str, split: str, kind: str, values: Tensor) -> None:
    key = f"{split}_{kind}"
    metric = module.val_metrics[key]
    metric.update(values)
    module.log(metric_name(prefix, key, module.validation.num_samples), metric, on_epoch=True, add_dataloader_idx=False)


def log_sanity_check(module) -> None:
    """Lightning keeps no logs of the sanity check; log it as the step-0 point of the learning curves."""
    k = module.validation.num_samples
    values = {metric_name("val", key, k): m.compute() for key, m in module.val_metrics.items() if m.update_called}
    for logger in module.loggers:
        logger.log_metrics({key: float(v) for key, v in values.items()}, step=module.global_step)
