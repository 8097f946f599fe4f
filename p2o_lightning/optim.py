"""The optimizer side of a manually optimised step: the LR schedule, gradient clipping and the optimizer step.

``P2OModule.configure_optimizers`` builds the schedule (:func:`lr_schedule`, over :func:`total_updates` optimizer
steps); the PPO update (:mod:`p2o_lightning.step.update`) calls an :class:`OptimizerStep` once per mini-batch, and
the module's ``on_before_optimizer_step`` hook calls its :meth:`OptimizerStep.clip`, inside Lightning's
``opt.step()``. Nothing here holds the module: the module passes the parameters, the trainer, the optimizer and the
scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["OptimizerStep", "clip_grad_norm", "lr_schedule", "total_updates"]


def lr_schedule(optimizer, warmup: float, total: int, cosine: bool) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` updates (a value in (0, 1): a share of ``total``), then constant or cosine."""
    warmup = int(warmup * total) if 0 < warmup < 1 else int(warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine or total <= warmup:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad_norm(params: list[Tensor], max_norm: float | None, fsdp_root=None) -> float:
    """Clip the global gradient norm to ``max_norm`` (None or 0: measure only) and return the norm before clipping.

    Under FSDP1 (``fsdp_root``: the ``FullyShardedDataParallel`` root the strategy wrapped) each rank holds a flat
    shard of every gradient, so ``torch.nn.utils.clip_grad_norm_`` would clip each rank by its own shard's norm: the
    root's ``clip_grad_norm_`` all-reduces the shards' squared norms first. Under FSDP2 the gradients are DTensors
    and the norm is one too (its ``full_tensor`` is the global norm); under DDP they are already all-reduced.
    """
    max_norm = max_norm or float("inf")
    if fsdp_root is not None:
        norm = fsdp_root.clip_grad_norm_(max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


class OptimizerStep:
    """One optimizer step of a manually optimised module: clip, check, step, schedule.

    Lightning runs the module's ``on_before_optimizer_step`` inside ``opt.step()``, after the fp16 GradScaler has
    unscaled the gradients: :meth:`clip` is called there, so the norm is of the true gradients (clipping before
    ``opt.step()`` would clip scaled ones). A non-finite norm stops training, unless a GradScaler will skip the
    step and lower its scale: then the step is counted as skipped and the LR schedule does not advance. It holds
    no module: each call is given what it works on.
    """

    def __init__(self, max_grad_norm: float | None) -> None:
        self.max_grad_norm = max_grad_norm
        self.grad_norm = 0.0

    def clip(self, params: Iterable[Tensor], trainer, where: str) -> None:
        """Clip the gradients of ``params`` (under ``trainer``'s strategy and precision); ``where`` names the step
        in the error a non-finite norm raises ("at global step ... (rollout step ...)").
        """
        from torch.distributed.fsdp import FullyShardedDataParallel  # FSDP1

        root = trainer.strategy.model  # FSDP1 wraps the LightningModule: the root knows the global norm
        root = root if isinstance(root, FullyShardedDataParallel) else None
        with_grad = [p for p in params if p.grad is not None]
        self.grad_norm = clip_grad_norm(with_grad, self.max_grad_norm, root)
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        if not math.isfinite(self.grad_norm) and not scaled:
            raise FloatingPointError(
                f"non-finite gradient norm ({self.grad_norm}) {where}; stopping before the optimizer "
                "step, no checkpoint is written"
            )

    def __call__(self, optimizer, scheduler) -> tuple[float, bool]:
        """Step ``optimizer`` (Lightning's, which runs :meth:`clip` through the module's hook) and, unless the
        GradScaler skipped the step, ``scheduler``. Returns (gradient norm before clipping, whether it was skipped).
        """
        optimizer.step()
        skipped = not math.isfinite(self.grad_norm)  # reached only under a GradScaler, which skipped the step
        if not skipped:
            scheduler.step()
        return self.grad_norm, skipped


def total_updates(trainer, ppo_epochs: int, mini_batch_size: int | None) -> int:
    """Optimizer steps of the whole run (``max_steps`` counts them under manual optimisation)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None) or 1
    per_batch = ppo_epochs * math.ceil(batch / (mini_batch_size or batch))
    return max(1, int(trainer.estimated_stepping_batches) * per_batch)
