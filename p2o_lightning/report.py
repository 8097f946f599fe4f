"""``python -m p2o_lightning report RUN_DIR [RUN_DIR …]``: pictures of finished runs, side by side.

For each run folder (a ``metrics.csv`` from the CSV logger, and ``p2o/search_*.json`` when P²O ran) it draws:

- ``runs.png``: every run's panels (reward, validation accuracy, collapse, P²O) in its own column, rows on the same
  axes;
- ``collapse.png``: the all-wrong collapse rate against the step, one line per run;
- ``accuracy.png``: in-distribution and OOD validation accuracy (greedy) against the step, one line per run;
- ``search.png``: every search's candidates' mean dev score in the order GEPA found them;

into ``--out`` (default: the first run folder), redraws each run's own ``metrics.png`` (with ``--reference``: another
run's greedy validation curves beside it, e.g. GRPO 2K's archived ``.csv.gz``), and prints the best
templates of every search with their dev scores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from p2o_lightning.plots import (
    draw_curve,
    draw_panel,
    legend,
    mark_searches,
    panels,
    plot_metrics,
    read_metrics,
    search_steps,
)
from p2o_lightning.prompt.record import read_records


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(run: Path) -> str:
    return run.name or str(run)


def plot_curves(runs: list[Path], keys: list[str], title: str, out: Path) -> Path:
    """One panel per key, one line per run (EMA of per-step series, marked validation points), searches marked in
    each run's colour; every panel on the same axes.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), squeeze=False, sharex=True, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes[0], keys):
        for i, run in enumerate(runs):
            series = read_metrics(run / "metrics.csv")
            if not series.get(key):
                continue
            colour = colours[i % len(colours)]
            draw_curve(ax, series[key], _label(run), colour, smooth=not key.startswith("val/"))
            mark_searches(ax, search_steps(run, series), colour, label=None)
        ax.set_title(key)
        ax.set_xlabel("RL step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title + " (dotted: P²O searches)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_runs(runs: list[Path], out: Path) -> Path:
    """Every run's panels in its own column, rows sharing their axes, so runs compare at a glance."""
    plt = _plt()
    all_series = [read_metrics(run / "metrics.csv") for run in runs]
    titles: dict[str, None] = {}
    for series in all_series:
        titles.update({title: None for title, _ in panels(series)})
    rows = list(titles)
    fig, axes = plt.subplots(
        len(rows), len(runs), figsize=(4.6 * len(runs), 3.0 * len(rows)), squeeze=False, sharex=True, sharey="row"
    )
    for c, (run, series) in enumerate(zip(runs, all_series)):
        layout = dict(panels(series))
        for r, title in enumerate(rows):
            ax = axes[r][c]
            right = draw_panel(ax, title, layout.get(title, []), series)
            mark_searches(ax, search_steps(run, series))
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            legend(ax, right)
            if r == 0:
                ax.set_title(f"{_label(run)}\n{title}", fontsize=10)
            if r == len(rows) - 1:
                ax.set_xlabel("RL step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_searches(runs: list[Path], out: Path) -> Path | None:
    """Candidates' mean dev score in discovery order, per search; the seed (empty template) is candidate 0."""
    searches = [(run, i, s) for run in runs for i, s in enumerate(read_records(run))]
    if not searches:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for run, i, s in searches:
        ax.plot(range(len(s.dev_mean)), s.dev_mean, marker="o", ms=3, label=f"{_label(run)} search {i}")
    ax.set_xlabel("candidate (order found)")
    ax.set_ylabel("mean dev score (greedy, current policy)")
    ax.set_title("GEPA candidates on the hard dev split")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def best_templates(run: Path, top: int = 3) -> list[str]:
    lines = []
    for i, s in enumerate(read_records(run)):
        head = (
            f"{_label(run)} search {i} (RL step {s.rollout_step}, {s.num_hard} hard, {len(s.templates)} candidates, "
            f"{s.metric_calls} metric calls):"
        )
        lines.append(head)
        lines += [f"  {s.dev_mean[c]:.3f}  {s.templates[c]!r}" for c in s.ranked(top)]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m p2o_lightning report", description=__doc__, allow_abbrev=False)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders holding a metrics.csv")
    parser.add_argument("--out", type=Path, default=None, help="where the side-by-side PNGs go")
    parser.add_argument("--reference", type=Path, default=None,
                        help="another run's metrics.csv (or an experiment's .csv.gz) drawn beside each run's "
                             "validation curves in its metrics.png")  # fmt: skip
    parser.add_argument("--reference-label", default=None, help="its name in the legend (default: its file name)")
    args = parser.parse_args(argv)
    if args.reference is not None and not args.reference.is_file():
        raise SystemExit(f"--reference {args.reference}: no such metrics file")
    label = args.reference_label or (args.reference.name if args.reference else "reference")
    for run in args.run_dirs:
        if not (run / "metrics.csv").is_file():
            raise SystemExit(f"{run}: no metrics.csv (is this a run folder?)")
    out = args.out or args.run_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    for run in args.run_dirs:
        print(plot_metrics(run / "metrics.csv", run / "metrics.png", str(run), args.reference, label))
    print(plot_runs(args.run_dirs, out / "runs.png"))
    print(plot_curves(args.run_dirs, ["train/collapse_all_wrong"], "collapse (all-wrong groups)", out / "collapse.png"))
    keys = sorted({k for run in args.run_dirs for k in read_metrics(run / "metrics.csv") if k.endswith("/greedy_acc")})
    if keys:
        print(plot_curves(args.run_dirs, keys, "validation accuracy (greedy)", out / "accuracy.png"))
    searched = plot_searches(args.run_dirs, out / "search.png")
    if searched:
        print(searched)
    for run in args.run_dirs:
        for line in best_templates(run):
            print(line)
