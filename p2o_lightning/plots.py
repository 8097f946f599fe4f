"""Plots people read: one run's ``metrics.png``, and the panels ``report`` lays side by side for several runs, from
``metrics.csv`` as :func:`read_metrics` reads it.

Per-step training curves are drawn raw and faint, with an exponential moving average on top; validation points are
marked (they are few); all-wrong and all-right collapse have their own colours (red: no gradient because nothing is
solved, green: no gradient because everything is); every P²O search is a dotted vertical line at the RL step it ran
(from the run folder's ``p2o/search_*.json``, else from the ``p2o/searches`` counter). P²O panels appear when a run
logged them: templated share and success, rescued groups, distilled greedy accuracy. A reference run (another
``metrics.csv``, or the ``.csv.gz`` an experiment archives) can be drawn beside the validation curves, grey and
dashed, to see one run against another: P²O against GRPO 2K's committed curve.
"""

from __future__ import annotations

import csv
import gzip
import os
from pathlib import Path

from p2o_lightning.prompt.record import read_records

EMA_ALPHA = 0.1  # weight of the newest point in the moving average of per-step curves
COLLAPSE_COLOURS = {"train/collapse_all_wrong": "tab:red", "train/collapse_all_right": "tab:green"}
COLLAPSE_COLOURS["train/collapse_rate"] = "tab:gray"
SEARCH_COLOUR = "tab:purple"
P2O_KEYS = ("p2o/templated_share", "p2o/templated_success", "p2o/distilled_greedy_acc")


def read_metrics(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` (or ``.csv.gz``) → {metric: [(step, value)]}, the last value per step kept (a resumed run
    re-logs steps).
    """
    series: dict[str, dict[int, float]] = {}
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def ema(values: list[float], alpha: float = EMA_ALPHA) -> list[float]:
    """Exponential moving average, started at the first value: ``s_t = alpha * x_t + (1 - alpha) * s_{t-1}``."""
    out: list[float] = []
    for value in values:
        out.append(value if not out else alpha * value + (1 - alpha) * out[-1])
    return out


def search_steps(folder: str | os.PathLike, series: dict | None = None) -> list[int]:
    """RL steps at which P²O searches ran: ``p2o/search_*.json``'s ``rollout_step``, else where ``p2o/searches``
    grew in ``series``.
    """
    steps = [r.rollout_step for r in read_records(folder, strict=False) if r.rollout_step >= 0]  # a cut copy: skipped
    if not steps and series and "p2o/searches" in series:
        last = 0.0
        for step, count in series["p2o/searches"]:
            if count > last:
                steps.append(step)
            last = count
    return steps


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_curve(ax, points: list[tuple[int, float]], label: str, colour=None, smooth: bool = True, style: str = "-"):
    """Raw faint + EMA (per-step series), or marked points joined by a line (validation)."""
    steps, values = zip(*points)
    if smooth and len(points) > 5:
        (raw,) = ax.plot(steps, values, color=colour, alpha=0.2, lw=0.8)
        ax.plot(steps, ema(list(values)), color=raw.get_color(), lw=1.6, ls=style, label=label)
    else:
        ax.plot(steps, values, color=colour, ls=style, marker="o", ms=4, lw=1.2, label=label)


def mark_searches(ax, steps: list[int], colour: str = SEARCH_COLOUR, label: str | None = "P²O search") -> None:
    for i, step in enumerate(steps):
        ax.axvline(step, color=colour, ls=":", lw=1.2, label=label if i == 0 else None)


def panels(series: dict[str, list[tuple[int, float]]]) -> list[tuple[str, list[str]]]:
    """The panels of a run with these metrics: reward, validation accuracy, collapse, and P²O when it ran."""
    val = sorted(k for k in series if k.startswith("val/") and ("/greedy_acc" in k or "/mean@" in k))
    out = [
        ("training reward (EMA, raw faint)", [k for k in ("train/reward",) if k in series]),
        ("validation accuracy, plain prompt (● = evaluation)", val),
        ("collapse: groups with zero advantage", [k for k in COLLAPSE_COLOURS if k in series]),
    ]
    p2o = [k for k in P2O_KEYS if any(v != 0 for _, v in series.get(k, []))]
    if p2o or any(v != 0 for _, v in series.get("p2o/rescued_groups", [])):
        out.append(("P²O", p2o + ["p2o/rescued_groups"]))
    return [(title, keys) for title, keys in out if keys]


def draw_panel(ax, title: str, keys: list[str], series: dict, colour=None, label_prefix: str = ""):
    """Draw ``keys`` into ``ax``; returns the right-hand axis when a count needed one."""
    right = None
    splits = list(dict.fromkeys(k.split("/")[1] for k in keys if k.startswith("val/")))  # a split keeps one colour
    for key in keys:
        points = series.get(key)
        if not points:
            continue
        label = label_prefix + key.split("/", 1)[1]
        if key == "p2o/rescued_groups":  # a count, not a rate: its own axis
            right = right or ax.twinx()
            draw_curve(right, points, label + " (right axis)", colour or "tab:brown", style="--")
            right.set_ylabel("rescued groups per step")
            continue
        smooth = not key.startswith("val/") and key != "p2o/distilled_greedy_acc"
        style = "--" if "/mean@" in key else "-"
        shade = colour or COLLAPSE_COLOURS.get(key)
        if shade is None and key.startswith("val/"):
            shade = f"C{splits.index(key.split('/')[1]) % 10}"
        draw_curve(ax, points, label, shade, smooth=smooth, style=style)
    ax.set_title(title, fontsize=10)
    return right


def legend(ax, *others) -> None:
    """One legend for ``ax`` and its twin axes."""
    handles, labels = [], []
    for a in (ax, *[o for o in others if o is not None]):
        h, lab = a.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="best")


def draw_reference(ax, keys: list[str], reference: dict, label: str) -> None:
    """The reference run's greedy validation curves of ``keys``, grey and dashed, one legend entry."""
    shown = [k for k in keys if k.endswith("/greedy_acc") and reference.get(k)]
    for i, key in enumerate(shown):
        points = reference[key]
        ax.plot([s for s, _ in points], [v for _, v in points], color="0.45", ls="--", lw=1.0, marker="x", ms=3,
                label=f"{label}: greedy (grey, dashed)" if i == 0 else None)  # fmt: skip


def plot_metrics(
    metrics_csv: str | os.PathLike,
    out_png: str | os.PathLike,
    title: str = "",
    reference: str | os.PathLike | None = None,
    reference_label: str = "reference",
) -> Path:
    """One run's panels side by side, P²O searches marked, into ``out_png``; with ``reference`` (a ``metrics.csv``
    or ``.csv.gz``), that run's greedy validation curves beside this run's.
    """
    plt = _plt()
    ref = read_metrics(reference) if reference is not None else None
    series = read_metrics(metrics_csv)
    searches = search_steps(Path(metrics_csv).parent, series)
    layout = panels(series) or [("no metrics", [])]
    fig, axes = plt.subplots(1, len(layout), figsize=(5.2 * len(layout), 3.8), squeeze=False)
    for ax, (name, keys) in zip(axes[0], layout):
        right = draw_panel(ax, name, keys, series)
        if ref is not None and any(k.startswith("val/") for k in keys):
            draw_reference(ax, keys, ref, reference_label)
        mark_searches(ax, searches)
        ax.set_xlabel("RL step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        legend(ax, right)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
