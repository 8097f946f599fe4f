"""What a run leaves behind: atomic checkpoints, the exported policy, and a metrics plot a person can read.

- :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file beside its target, fsyncs it and renames
  it into place, so a run killed mid-save never leaves a truncated ``last.ckpt``. It loads a distributed (FSDP2)
  checkpoint folder too, consolidated (:func:`~p2o_lightning.sharded.consolidated_checkpoint`).
- :class:`ExportPolicy` saves the trained policy with ``save_pretrained`` (plus its tokenizer) at the end of fit,
  loadable by ``AutoModelForCausalLM.from_pretrained`` with no prompt and no p2o-lightning.
- :class:`MetricsPlot` draws reward, in-distribution and OOD accuracy and the collapse rate against the step from
  the CSV logger's ``metrics.csv`` into ``metrics.png`` in the run folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_debug
from torch.distributed.tensor import DTensor

from p2o_lightning.checks import check_checkpoint, unreadable_checkpoint
from p2o_lightning.plots import plot_metrics
from p2o_lightning.sharded import consolidated_checkpoint, swap_in


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<path>.tmp``, fsync, then ``os.replace`` onto ``<path>``; loads are checked.

    A kill or a full disk mid-save leaves the previous file at ``<path>`` whole, and a failed write is an ``OSError``
    naming the path. A file that does not load (truncated, corrupt, not torch) or is not this project's checkpoint
    is a ``ValueError`` naming it (:func:`~p2o_lightning.checks.check_checkpoint`), never torch's advice to load it
    with ``weights_only=False``. A folder is a distributed checkpoint, checked and consolidated into full tensors.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            swap_in(tmp, path)  # over a file, or over the folder of a distributed checkpoint this run resumed
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            kept = "the previous checkpoint there is untouched" if path.exists() else "no checkpoint was written"
            raise OSError(f"writing checkpoint {path} failed ({err}); {kept}") from err
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if Path(path).is_dir():  # a distributed (FSDP2) checkpoint, resumed by a single process
            return consolidated_checkpoint(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            checkpoint = super().load_checkpoint(path, *args, **kwargs)
        except Exception as err:  # the unpickler raises many types for a file that is not a whole torch file
            raise unreadable_checkpoint(path, err) from None  # torch's message advises loading it unsafely
        check_checkpoint(checkpoint, path)
        return checkpoint


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder: the first logger's log_dir, else the trainer's default_root_dir.

    Read from the logger itself: ``trainer.log_dir`` broadcasts from rank 0 and would deadlock in rank-0-only code.
    """
    log_dir = getattr(trainer.logger, "log_dir", None)
    return Path(log_dir or trainer.default_root_dir)


def _full(value: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of a (possibly sharded) tensor; a collective for DTensors, so every rank must call it."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().cpu().clone()


class ExportPolicy(L.Callback):
    """Save the policy (``save_pretrained``) and tokenizer to ``dirpath`` (default ``<run dir>/policy``)."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        lm = pl_module.policy.lm
        state, error = None, None
        if any(isinstance(v, DTensor) for v in lm.state_dict().values()):  # FSDP2: gather on every rank
            state = {k: _full(v) for k, v in lm.state_dict().items()}
        if trainer.is_global_zero:
            out = Path(self.dirpath) if self.dirpath else run_dir(trainer) / "policy"
            if state is not None:  # save a plain copy: transformers cannot serialise the sharded parameters
                plain = type(lm)._from_config(lm.config)
                plain.load_state_dict(state, assign=True)
                plain.generation_config = lm.generation_config
                lm = plain
            error = _export(lm, pl_module.tokenizer, out)
        trainer.strategy.barrier("export_policy")
        if trainer.is_global_zero and error is not None:
            raise error


def _export(lm, tokenizer, out: Path) -> OSError | None:
    """``save_pretrained`` into a temporary folder beside ``out``, then swap it in: a failed export (a full disk)
    leaves an earlier export whole and returns an error naming ``out``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except Exception as err:  # safetensors reports a failed write as SafetensorError, not OSError
        shutil.rmtree(tmp, ignore_errors=True)
        return OSError(f"exporting the policy to {out} failed ({err}); checkpoints are untouched")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    rank_zero_debug(f"policy exported to {out}")
    return None


class MetricsPlot(L.Callback):
    """At the end of fit, plot the CSV logger's ``metrics.csv`` into ``metrics.png`` beside it.

    Args:
        reference: another run's ``metrics.csv`` (or an experiment's archived ``.csv.gz``) whose greedy validation
            curves are drawn beside this run's (grey, dashed); checked when fit starts.
        reference_label: its name in the legend.
    """

    def __init__(self, reference: str | None = None, reference_label: str = "reference") -> None:
        self.reference = reference
        self.reference_label = reference_label

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.reference is not None and not Path(self.reference).is_file():
            raise FileNotFoundError(f"MetricsPlot reference={self.reference!r}: no such metrics file")

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.save()
        csv_path = run_dir(trainer) / "metrics.csv"
        if csv_path.is_file():
            out = plot_metrics(
                csv_path, csv_path.with_name("metrics.png"), str(run_dir(trainer)), self.reference,
                self.reference_label,
            )  # fmt: skip
            rank_zero_debug(f"metrics: {csv_path}\nplot: {out}")
