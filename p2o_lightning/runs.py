"""Run folders: one run per folder, resumed in place, never overwritten by accident.

A run folder (``runs/toy/``) holds ``metrics.csv``, ``checkpoints/``, ``policy/``, ``p2o/`` and the plots. Three
rules keep its history whole:

- **A resumed run appends.** :class:`RunCSVLogger` is Lightning's ``CSVLogger`` with a writer that keeps the
  existing ``metrics.csv``: when :class:`RunFolder` sees a checkpoint being loaded, the logger keeps every row logged
  before the resumed run's first row (by ``(step, epoch)``) and replaces the rest, so the file ends up equal, row
  for row, to an uninterrupted run's. It flushes every step (a ``kill -9`` loses at most the step in flight), and
  every rewrite of the file (a new column, a resume) goes to a temporary file renamed into place.
- **A new fit never replaces a run.** ``fit`` into a folder that holds one stops before writing anything, naming the
  folder and the two ways on: ``--ckpt_path last`` (resume) or ``--overwrite`` (start over: :func:`clear_run`
  removes the outputs this project writes, and nothing else).
- **Lightning's own warning** ("previous log files will be deleted") never fires: the folder check replaces it.

Under FSDP2 Lightning restores the checkpoint after it logs the hyperparameters: :class:`RunFolder` tells the logger
at setup, and ``hparams.yaml`` of a folder holding a run is then written with the first metrics row, once the run is
known to resume it.

Before anything loads, :func:`check_run_paths` makes sure every folder the run writes into can be one: a path that
goes through a file (``--trainer.default_root_dir notes.txt/run``) or into a folder without write permission is an
error naming the path and its culprit, instead of a bare ``NotADirectoryError`` from deep inside setup.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from p2o_lightning.console import summary_lines
from p2o_lightning.outputs import run_dir

METRICS_FILE = "metrics.csv"
# what this project writes into a run folder: --overwrite removes these and nothing else
RUN_FILES = ("metrics.csv", "metrics.png", "hparams.yaml", "config.yaml", "summary.txt")
RUN_DIRS = ("checkpoints", "policy", "p2o")


class RunFolderError(RuntimeError):
    """A fit would write into a folder that holds another run."""


def holds_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a run's results: metrics, checkpoints, an exported policy or P²O searches.

    A ``config.yaml`` / ``hparams.yaml`` alone does not count: a run that failed before its first step (bad data, a
    typo in the config) leaves one, and rerunning the corrected command must not be refused.
    """
    folder = Path(folder)
    if (folder / METRICS_FILE).is_file():
        return True
    return any((folder / d).is_dir() and any((folder / d).iterdir()) for d in RUN_DIRS)


def refusal(folder: str | os.PathLike, reason: str = "") -> RunFolderError:
    """The error of a fit into a folder that holds a run: the folder and the two ways on."""
    return RunFolderError(
        f"{folder} already holds a run{reason}. Resume it with `--ckpt_path last`, start over with `--overwrite` "
        f"(removes its metrics, checkpoints, policy and P²O searches), or choose another folder "
        f"(--trainer.logger.init_args.name / save_dir). Nothing was written."
    )


def check_run_folder(folder: str | os.PathLike, ckpt_path: str | None, overwrite: bool = False) -> None:
    """Refuse a fit that would write into ``folder`` over another run; changes nothing on disk.

    ``ckpt_path="last"`` resumes: it needs a ``last*.ckpt`` under ``folder/checkpoints`` when the folder holds a run
    (else the run would silently start over on top of the old metrics). Any other ``ckpt_path`` is the user's file.
    """
    folder = Path(folder)
    if overwrite or not holds_run(folder):
        return
    if ckpt_path is None:
        raise refusal(folder)
    if ckpt_path == "last" and not any((folder / "checkpoints").glob("last*.ckpt")):
        raise refusal(folder, f" but no checkpoint to resume from ({folder / 'checkpoints'} holds no last.ckpt)")


def check_folder_path(path: str | os.PathLike, what: str) -> None:
    """``path`` is a folder, or can be made one: its nearest existing ancestor is a writable folder, not a file.

    ``what`` says where the path comes from (``run folder``, ``trainer.default_root_dir``); the error names it, the
    path, and the part of the path that is wrong.
    """
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)  # a path through a file does not exist
    if existing is None:
        return
    if not existing.is_dir():
        culprit = "it is a file" if existing == path else f"{existing} is a file"
        raise NotADirectoryError(
            f"{what} {path} cannot be created: {culprit}, not a folder. Choose another folder "
            "(--trainer.default_root_dir, or the logger's save_dir / name). Nothing was written."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{what} {path} cannot be created: {existing} is not writable by this user. Nothing was written."
        )


def run_paths(trainer: L.Trainer) -> dict[str, Path]:
    """Every folder the run writes into, by what names it: the run folder, ``trainer.default_root_dir``, and each
    callback's explicit ``dirpath`` (checkpoints, the exported policy).
    """
    paths = {"run folder": run_dir(trainer), "trainer.default_root_dir": Path(trainer.default_root_dir)}
    for callback in trainer.callbacks:
        if getattr(callback, "dirpath", None):
            paths[f"{type(callback).__name__}.dirpath"] = Path(callback.dirpath)
    return paths


def check_run_paths(trainer: L.Trainer) -> None:
    """Every folder the run writes into (:func:`run_paths`), checked with :func:`check_folder_path` before anything
    loads.
    """
    for what, path in run_paths(trainer).items():
        check_folder_path(path, what)


def clear_run(folder: str | os.PathLike) -> list[Path]:
    """Remove the outputs this project writes into ``folder`` (for ``--overwrite``); returns what was removed."""
    folder = Path(folder)
    removed = []
    for name in RUN_FILES:
        if (folder / name).is_file():
            (folder / name).unlink()
            removed.append(folder / name)
    for name in RUN_DIRS:
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)
            removed.append(folder / name)
    return removed


def _row_key(row: dict[str, Any]) -> tuple[int, int]:
    """Rows are ordered by (step, epoch): an epoch's closing metrics share their step with the next epoch's first
    batch, and the epoch tells them apart. Rows without an epoch (the starting validation) sort first.
    """
    epoch = row.get("epoch")
    return int(float(row["step"])), int(float(epoch)) if epoch not in (None, "") else -1


class RunMetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping an existing ``metrics.csv`` instead of deleting it, and resume-aware."""

    def __init__(self, log_dir: str, resuming: bool = False) -> None:
        self.resuming = resuming
        self.restores_late = False  # the strategy restores checkpoints after hparams are logged (FSDP2)
        super().__init__(log_dir)
        # Lightning creates the writer in setup, before it restores a checkpoint: whether this is a resume is known
        # at the first write, where a metrics file of another run is refused (the folder check was bypassed)
        self._foreign = os.path.isfile(self.metrics_file_path)
        self._hparams_pending = False  # hparams.yaml held back until the first row says whether this resumes

    def _check_first_write(self) -> None:
        if self._foreign and not self.resuming:
            raise refusal(self.log_dir)
        self._foreign = False
        if self._hparams_pending:
            self._hparams_pending = False
            super().log_hparams({})

    def log_hparams(self, params: dict[str, Any]) -> None:
        """Write ``hparams.yaml``; into a folder that holds a run, only once the run is known to resume it.

        Under a strategy that restores checkpoints after setup (FSDP2), Lightning logs hyperparameters before the
        restore: a resumed run is not yet known as one there, so the file is written with the first metrics row,
        after the check.
        """
        if self._foreign and not self.resuming and self.restores_late:
            self.hparams.update(params)
            self._hparams_pending = True
            return
        self._check_first_write()
        super().log_hparams(params)

    def _check_log_dir_exists(self) -> None:
        """Replaced by :func:`check_run_folder` and the check in ``__init__``: never delete a metrics file."""

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with open(self.metrics_file_path, newline="") as f:
            text = f.read()
        if text and not text.endswith("\n"):  # a row cut by a kill -9 mid-write: drop it
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
        return list(reader.fieldnames or []), rows

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = f"{self.metrics_file_path}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_file_path)

    def save(self) -> None:
        """Append the rows logged since the last save; rewrite the file (atomically) when the header grows or a
        resumed run's first rows replace those logged after its checkpoint.
        """
        if not self.metrics:
            return
        self._check_first_write()
        exists = os.path.isfile(self.metrics_file_path)
        if self.resuming and exists:
            header, old = self._read()
            first = _row_key(self.metrics[0])
            kept = [row for row in old if _row_key(row) < first]
            self.metrics_keys = sorted(set(header) | set().union(*self.metrics))
            self._rewrite(kept + self.metrics)
            self.resuming = False
        elif exists and self._record_new_keys():
            _, old = self._read()
            self._rewrite(old + self.metrics)
        else:
            self._record_new_keys()
            with open(self.metrics_file_path, "a" if exists else "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                if not exists:
                    writer.writeheader()
                writer.writerows(self.metrics)
        self.metrics = []


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` for run folders: ``<save_dir>/<name>/metrics.csv``, kept across resumes, flushed every step.

    Args:
        save_dir: the folder holding run folders.
        name: the run folder's name.
        version: a sub-folder per version (the default ``""``: none, so a resume finds the same folder).
        prefix: prefix of every metric's name.
        flush_logs_every_n_steps: rows are written to disk every this many steps.
    """

    def __init__(
        self,
        save_dir: str = "runs",
        name: str = "run",
        version: int | str | None = "",
        prefix: str = "",
        flush_logs_every_n_steps: int = 1,
    ) -> None:
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)
        self._resuming = False
        self._restores_late = False

    def resume(self) -> None:
        """Called when a checkpoint is loaded: the next rows replace those logged after it, the rest stay."""
        self._resuming = True
        if self._experiment is not None:
            self._experiment.resuming = True

    def restore_after_setup(self) -> None:
        """Called at setup when the strategy restores a checkpoint only after hparams are logged (FSDP2)."""
        self._restores_late = True
        if self._experiment is not None:
            self._experiment.restores_late = True

    @property
    @rank_zero_experiment
    def experiment(self) -> RunMetricsWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = RunMetricsWriter(self.log_dir, resuming=self._resuming)
            self._experiment.restores_late = self._restores_late
        return self._experiment


class RunFolder(L.Callback):
    """Tells the run's :class:`RunCSVLogger` when training resumes, keeps the run's wall and CPU time across resumes
    (logged every step as ``time/run_wall_s`` and ``time/run_cpu_s``: the clock that compares runs at equal compute),
    and ends a finished fit with its summary and the paths of its outputs (printed, and saved as ``summary.txt``).

    Lightning calls ``on_load_checkpoint`` while restoring, before the logger writes its first row.
    """

    def __init__(self) -> None:
        self.wall_before = 0.0  # seconds spent by earlier sessions of this run (checkpointed)
        self.cpu_before = 0.0  # CPU seconds of this process's threads in earlier sessions (checkpointed)
        self.start = time.monotonic()
        self.cpu_start = time.process_time()
        self.resumed_at: int | None = None  # global step of the checkpoint this session resumed from

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.strategy.restore_checkpoint_after_setup:
            for logger in trainer.loggers:
                if isinstance(logger, RunCSVLogger):
                    logger.restore_after_setup()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.cpu_start = time.monotonic(), time.process_time()

    @property
    def wall_s(self) -> float:
        """The run's wall time so far, over all its sessions (fit start to now; setup and loading excluded)."""
        return self.wall_before + time.monotonic() - self.start

    @property
    def cpu_s(self) -> float:
        """The CPU seconds of this process since fit start, over all sessions (with one torch thread: its wall time
        on a core of its own, whatever else runs on the machine).
        """
        return self.cpu_before + time.process_time() - self.cpu_start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        pl_module.log("time/run_wall_s", self.wall_s, on_step=True, on_epoch=False)
        pl_module.log("time/run_cpu_s", self.cpu_s, on_step=True, on_epoch=False)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.resumed_at = checkpoint.get("global_step")
        for logger in trainer.loggers:
            if isinstance(logger, RunCSVLogger):
                logger.resume()

    def state_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.wall_before = float(state.get("wall_s", 0.0))
        self.cpu_before = float(state.get("cpu_s", 0.0))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.interrupted or not trainer.is_global_zero:
            return
        folder = run_dir(trainer)
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        outputs = {
            "metrics": folder / METRICS_FILE,
            "plot": folder / "metrics.png",
            "checkpoint": Path(ckpt) if ckpt else folder / "checkpoints",
            "policy": folder / "policy",
            "P²O searches": folder / "p2o",
            "summary": folder / "summary.txt",
        }
        summary = outputs["summary"]
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.touch()  # listed among the outputs it records
        lines = summary_lines(folder, self.wall_s, outputs, trainer.callback_metrics)
        summary.write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
