"""What a run prints: one progress bar for the whole run, a short summary at the end, and nothing else of note.

- :class:`RLProgressBar` is Lightning's ``TQDMProgressBar`` with one bar over the run (RL step / total, not one
  bar per epoch), showing the latest reward, collapse rate, rollout tokens/s and validation accuracies from
  ``trainer.callback_metrics`` (:func:`bar_fields`).
- :class:`RLProgressLog` is the same progress for a console that is not a terminal (CI, a log file, ``nohup``):
  one plain line every N RL steps with the same fields, N chosen so that a run writes about 20 lines, instead of
  thousands of carriage-return frames. :func:`progress_bar` picks one of the two from ``sys.stdout``.
- :func:`summary_lines` is the end-of-run table (each validation split's plain-prompt accuracy at the start and the
  end, collapse at the start and the end, P²O searches, wall time) and the paths of the run's outputs;
  :class:`~p2o_lightning.runs.RunFolder` prints it and saves it as ``summary.txt``.
- :func:`quiet_third_party` silences the libraries' messages that no user of this project can act on, each with
  its reason. Our own causes are fixed where they are (the CLI's ``args`` warning, the loader's ``__len__``).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from tqdm import tqdm

from p2o_lightning.plots import read_metrics, search_steps

COLLAPSE_WINDOW = 10  # collapse "at the start / end" = mean over the first / last this many RL steps


def _drop_litlogger_tip(record: logging.LogRecord) -> bool:
    return "litlogger" not in str(record.msg)


def quiet_third_party() -> None:
    """Filter the third-party messages of a normal run that are not actionable here (each says why)."""
    # Lightning 2.6's ModelCheckpoint warns on every manual-optimisation run that uses every_n_train_steps, asking
    # for a `saved_models` / `layer` convention of its own test suite; a P²O checkpoint is meant to hold the weights
    # after the optimizer step, which is what it saves.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
    # lightning.pytorch.utilities._pytree constructs torch's LeafSpec, which torch 2.13 deprecates: Lightning's to fix.
    leafspec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
    warnings.filterwarnings("ignore", message=leafspec, category=FutureWarning)
    # Lightning advertises its cloud logger (litlogger) at the start of every run.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_litlogger_tip)
    # transformers draws progress bars for loading and saving weights (twice per run for the policy + reference);
    # the run's own bar says what is happening.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def total_rl_steps(trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
    """RL steps (batches) the run will take: ``max_steps`` counts optimizer steps, several per batch with PPO
    mini-batches / epochs; ``max_epochs`` counts passes over the training loader.
    """
    per_batch = pl_module._updates_per_batch() if hasattr(pl_module, "_updates_per_batch") else 1
    limits = []
    if trainer.max_steps is not None and trainer.max_steps > 0:
        limits.append(math.ceil(trainer.max_steps / max(1, per_batch)))
    batches = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
        limits.append(trainer.max_epochs * int(batches))
    return min(limits) if limits else None


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.3g}"


def bar_fields(trainer: L.Trainer) -> dict[str, str]:
    """The progress fields, from ``trainer.callback_metrics``: training metrics of the last step, then the latest
    greedy accuracy of every validation split (``val/<split>/greedy_acc`` → ``<split>``).
    """
    metrics = trainer.callback_metrics
    shown = {}
    for name, key in (
        ("reward", "train/reward"),
        ("collapse", "train/collapse_rate"),
        ("tok/s", "time/rollout_tokens_per_s"),
    ):
        if key in metrics:
            shown[name] = f"{float(metrics[key]):.0f}" if name == "tok/s" else _fmt(float(metrics[key]))
    for key in sorted(k for k in metrics if k.startswith("val/") and k.endswith("/greedy_acc")):
        shown[key.split("/")[1]] = _fmt(float(metrics[key]))
    return shown


class RLProgressBar(TQDMProgressBar):
    """One bar over the whole run: ``RL step 17/120 [00:12<01:30, reward=0.312, collapse=0.62, tok/s=5.1e+03,
    in_dist=0.359, ood=0.031]``; a resumed run starts it where its checkpoint left off.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=total_rl_steps(trainer, pl_module))
        self.train_progress_bar.n = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        self.train_progress_bar.set_description("RL step")

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """One bar for the run: an epoch neither resets nor replaces it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        n = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        if self._should_update(n, self.train_progress_bar.total or 0):
            self.train_progress_bar.n = n
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        return bar_fields(trainer)


LOG_LINES = 20  # lines a run's progress log writes (about): a 240-step run writes one every 12 RL steps
LOG_EVERY_UNKNOWN = 10  # RL steps between lines when the run's length is unknown (an iterable without a length)


def log_interval(total: int | None, lines: int = LOG_LINES) -> int:
    """RL steps between two lines of the progress log, so that a run of ``total`` steps writes about ``lines``."""
    if not total:
        return LOG_EVERY_UNKNOWN
    return max(1, round(total / max(1, lines)))


class RLProgressLog(ProgressBar):
    """The run's progress as plain lines, for a console that is not a terminal (CI, a log file, ``nohup``): one
    every N RL steps (:func:`log_interval`: about ``lines`` over the run) and one at the last step, with the fields
    of :class:`RLProgressBar`.

    ::

        RL step 12/240 [00:34<10:46, 2.83 s/step] reward=0.312 collapse=0.625 tok/s=5100 in_dist=0.359 ood=0.031

    Validation and the sanity check write nothing: their accuracies appear in the next line. Like every progress
    bar it is silent on ranks other than 0 (Lightning disables it there).

    Args:
        lines: about how many lines a run writes.
    """

    def __init__(self, lines: int = LOG_LINES) -> None:
        super().__init__()
        self.lines = lines
        self._enabled = True
        self._total: int | None = None
        self._every = LOG_EVERY_UNKNOWN
        self._first = 0  # RL steps done before this session (a resumed run)
        self._start = time.monotonic()

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total = total_rl_steps(trainer, pl_module)
        self._every = log_interval(self._total, self.lines)
        self._first = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        n = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        if self.is_enabled and (n % self._every == 0 or n == self._total):
            print(self.line(n, bar_fields(trainer)), flush=True)

    def line(self, n: int, fields: dict[str, str]) -> str:
        """``RL step n/total [elapsed<remaining, s/step] name=value …``, timed over this session's steps."""
        elapsed = time.monotonic() - self._start
        per_step = elapsed / max(1, n - self._first)
        timing = tqdm.format_interval(elapsed)
        if self._total:
            timing += f"<{tqdm.format_interval(per_step * max(0, self._total - n))}"
        total = f"/{self._total}" if self._total else ""
        values = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"RL step {n}{total} [{timing}, {per_step:.2f} s/step] {values}".rstrip()


def progress_bar() -> ProgressBar:
    """The run's progress: a live bar (:class:`RLProgressBar`) on a terminal, plain lines (:class:`RLProgressLog`)
    anywhere else, where a bar's carriage-return frames would fill the log.
    """
    return RLProgressBar() if sys.stdout.isatty() else RLProgressLog()


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary_lines(
    folder: str | Path, wall_s: float, outputs: dict[str, Path], metrics: dict[str, Any] | None = None
) -> list[str]:
    """The end-of-run summary of ``folder``: a start / end table from its ``metrics.csv``, searches, wall time, and
    the outputs that exist. ``metrics`` (``trainer.callback_metrics``) stands in when there is no CSV.
    """
    folder = Path(folder)
    csv_path = folder / "metrics.csv"
    series = read_metrics(csv_path) if csv_path.is_file() else {}
    if not series and metrics:
        series = {k: [(0, float(v))] for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    rows: list[tuple[str, str, str]] = []
    for key in sorted(k for k in series if k.startswith("val/")):
        points = series[key]
        rows.append((key[len("val/") :], _fmt(points[0][1]), _fmt(points[-1][1])))
    for key, label in (
        ("train/collapse_rate", "collapse (all groups)"),
        ("train/collapse_all_wrong", "  all-wrong"),
        ("train/collapse_all_right", "  all-right"),
        ("train/reward", "train reward"),
    ):
        values = [v for _, v in series.get(key, [])]
        if values:
            start, end = _mean(values[:COLLAPSE_WINDOW]), _mean(values[-COLLAPSE_WINDOW:])
            rows.append((label, _fmt(start), _fmt(end)))
    steps = max((s for points in series.values() for s, _ in points), default=-1) + 1
    lines = [f"run summary: {folder} ({steps} RL steps, {_duration(wall_s)})"]
    if rows:
        width = max(len(r[0]) for r in rows)
        lines.append(f"  {'':{width}}  {'start':>7}  {'end':>7}")
        lines += [f"  {name:{width}}  {start:>7}  {end:>7}" for name, start, end in rows]
        lines.append(
            f"  (validation: plain prompt, first and last evaluation; training: mean of the first / last "
            f"{COLLAPSE_WINDOW} RL steps)"
        )
    searches = search_steps(folder, series)
    if searches:
        at = ", ".join(str(s) for s in searches)
        lines.append(f"  P²O searches: {len(searches)} (at RL step {at})")
    elif "p2o/searches" in series:
        lines.append(f"  P²O searches: {int(series['p2o/searches'][-1][1])}")
    present = {name: path for name, path in outputs.items() if path.exists()}
    if present:
        width = max(len(n) for n in present)
        lines.append("outputs:")
        lines += [f"  {name:{width}}  {path}" for name, path in present.items()]
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s wall time"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m wall time" if hours else f"{minutes}m{secs:02d}s wall time"
