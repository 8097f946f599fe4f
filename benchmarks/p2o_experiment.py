"""The paper's comparison on the embedded world: GRPO (K), GRPO (2K), P²O and its ablations, 3 seeds each.

Every run is the real trainer through the user's command (``python -m p2o_lightning fit``) with the same number
of optimizer steps, data, learning rate and validation; only the method differs:

| setting             | config               | overrides                                                          |
|---------------------|----------------------|--------------------------------------------------------------------|
| grpo_k              | configs/toy.yaml     | K rollouts                                                         |
| grpo_2k             | configs/toy.yaml     | 2K rollouts                                                        |
| p2o                 | configs/p2o-toy.yaml | none: the skill anchor, the lean search (what it ships)            |
| p2o_paper_loss      | configs/p2o-toy.yaml | ``model.loss.anchor_weight=0`` (the paper's loss)                  |
| p2o_no_distill      | configs/p2o-toy.yaml | ``model.p2o.distill=false`` (gradient on the templated prompt)     |
| p2o_one_template    | configs/p2o-toy.yaml | one template for all K rollouts of a prompt                        |
| p2o_all_templated   | configs/p2o-toy.yaml | ``model.p2o.plain_rollouts=0`` (all K rollouts templated)          |
| p2o_paper           | configs/p2o-toy.yaml | the paper's loss and the full search (dev 300, 1,500 calls)        |
| p2o_no_ratio_mask   | configs/p2o-toy.yaml | p2o_paper and ``model.loss.context_ratio_bounds=null``             |
| p2o_plain0          | configs/p2o-toy.yaml | p2o_paper and ``model.p2o.plain_rollouts=0`` (all K templated)     |
| p2o_forever         | configs/p2o-toy.yaml | p2o_paper and ``schedule.template_lifetime: forever``              |
| p2o_drop_failed     | configs/p2o-toy.yaml | p2o_paper and ``model.p2o.drop_failed_templated=true``             |
| p2o_anchor          | configs/p2o-toy.yaml | the skill anchor with the full search                              |
| p2o_anchor_no_mask  | configs/p2o-toy.yaml | p2o_anchor and ``model.loss.context_ratio_bounds=null``            |
| p2o_anchor_tau1 ... | configs/p2o-toy.yaml | p2o_anchor and one change (tau1, nonneg, plain1)                   |
| p2o_anchor_lean     | configs/p2o-toy.yaml | the skill anchor and the lean search (= p2o)                       |
| dapo                | configs/toy.yaml     | DAPO's dynamic sampling: ``model.rollout.dynamic_sampling=filter`` |

    python benchmarks/p2o_experiment.py [--seeds 0 1 2] [--settings ...] [--lr 6e-5] [--max-steps 240]
    python benchmarks/p2o_experiment.py --sweep-lr 2e-5 6e-5 1e-4 2e-4 --seeds 0   # GRPO K at each lr

Runs that already finished (their ``policy/`` exists) are not run again. Each run gets ``--threads`` torch threads
(default 1) and its CPU seconds are recorded besides its wall time: with one thread they equal the wall time on a
core of its own, so settings compare fairly even when runs share the machine. Validation (plain prompt, greedy and
mean@8) runs every ``--val-every`` steps: the lowest plain-prompt accuracy reached during training is reported
besides the last. The summary (mean ± std over seeds) is printed as a Markdown table and written to
``<out>/summary.csv`` / ``summary.md`` / ``summary.json`` (with each run's search seconds and their share of its wall
time, and P²O's extra costs over GRPO: the CPU seconds of each, logged apart in the run, and their share of its CPU
time, :func:`extra_costs`); every
run's ``metrics.csv`` is kept gzipped under ``<out>/metrics/``; ``<out>/curves.png`` draws every setting's mean
plain-prompt accuracy against the step, and the report's PNGs (collapse, accuracy, search) are drawn for seed 0.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2o_lightning.plots import read_metrics  # noqa: E402
from p2o_lightning.prompt.record import read_records  # noqa: E402


def _p2o_callback(config: dict) -> dict:
    return next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("P2OCallback"))


def _set(path: str, value):
    def edit(config: dict, args: argparse.Namespace) -> None:
        *keys, leaf = path.split(".")
        node = config
        for key in keys:
            node = node.setdefault(key, {})  # a settings group the config leaves at its defaults
        node[leaf] = value(args) if callable(value) else value

    return edit


def _callback_arg(path: str, value):
    """Set the P²O callback's ``init_args.<path>`` (``search.dev_size``: a key of one of its settings groups)."""

    def edit(config: dict, args: argparse.Namespace) -> None:
        *groups, leaf = path.split(".")
        node = _p2o_callback(config)["init_args"]
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = value

    return edit


# the search of the runs before configs/p2o-toy.yaml became the winning setting (dev 300, 1,500 calls, no stop)
FULL_SEARCH = [
    _callback_arg("search.dev_size", 300),
    _callback_arg("search.max_metric_calls", 1500),
    _callback_arg("search.search_patience", None),
    _callback_arg("search.cache_evaluation", False),
]
PAPER_LOSS = [_set("model.loss.anchor_weight", 0.0)]
ANCHOR = [_set("model.loss.anchor_weight", 1.0), *FULL_SEARCH]

SETTINGS = {
    "grpo_k": ("toy.yaml", []),
    "grpo_2k": ("toy.yaml", [_set("model.rollout.num_rollouts", lambda a: 2 * a.k)]),
    # P²O as configs/p2o-toy.yaml ships it (the skill anchor, the lean search) and the paper's ablations of it
    "p2o": ("p2o-toy.yaml", []),
    "p2o_paper_loss": ("p2o-toy.yaml", PAPER_LOSS),
    "p2o_no_distill": ("p2o-toy.yaml", [_set("model.p2o.distill", False)]),
    "p2o_one_template": ("p2o-toy.yaml", [_callback_arg("search.group_diversity", False)]),
    "p2o_all_templated": ("p2o-toy.yaml", [_set("model.p2o.plain_rollouts", 0)]),  # all K rollouts templated
    # the earlier runs' settings: the paper's loss with the full search, and its variations
    "p2o_paper": ("p2o-toy.yaml", [*PAPER_LOSS, *FULL_SEARCH]),
    "p2o_no_ratio_mask": ("p2o-toy.yaml", [*PAPER_LOSS, *FULL_SEARCH, _set("model.loss.context_ratio_bounds", None)]),
    "p2o_plain0": ("p2o-toy.yaml", [*PAPER_LOSS, *FULL_SEARCH, _set("model.p2o.plain_rollouts", 0)]),
    "p2o_forever": (
        "p2o-toy.yaml",
        [*PAPER_LOSS, *FULL_SEARCH, _callback_arg("schedule.template_lifetime", "forever")],
    ),
    "p2o_drop_failed": ("p2o-toy.yaml", [*PAPER_LOSS, *FULL_SEARCH, _set("model.p2o.drop_failed_templated", True)]),
    "p2o_anchor": ("p2o-toy.yaml", ANCHOR),
    "p2o_anchor_no_mask": ("p2o-toy.yaml", [*ANCHOR, _set("model.loss.context_ratio_bounds", None)]),
    # the valley (issue 17), one change at a time from p2o_anchor
    "p2o_anchor_tau1": ("p2o-toy.yaml", [*ANCHOR, _callback_arg("schedule.tau", 1)]),
    "p2o_anchor_nonneg": ("p2o-toy.yaml", [*ANCHOR, _set("model.p2o.plain_advantage", "nonnegative")]),
    "p2o_anchor_plain1": ("p2o-toy.yaml", [*ANCHOR, _set("model.p2o.plain_rollouts", 1)]),
    # the search's cost (issue 17): a 64-problem dev set, 1,000 metric calls, a stop after 12 iterations without a
    # better best dev score, gepa's evaluation cache: what configs/p2o-toy.yaml ships
    "p2o_anchor_lean": (
        "p2o-toy.yaml",
        [
            _set("model.loss.anchor_weight", 1.0),
            _callback_arg("search.dev_size", 64),
            _callback_arg("search.max_metric_calls", 1000),
            _callback_arg("search.search_patience", 12),
            _callback_arg("search.cache_evaluation", True),
        ],
    ),
    # the paper's DAPO baseline: clip-higher and token-mean are the toy config's already; filter_groups, 3 rounds
    "dapo": (
        "toy.yaml",
        [_set("model.rollout.dynamic_sampling", "filter"), _set("model.rollout.max_sampling_rounds", 3)],
    ),
}
DEFAULT_SETTINGS = ["grpo_k", "grpo_2k", "p2o", "p2o_paper_loss", "p2o_no_distill", "p2o_one_template"]
SPLITS = ("in_dist", "hard", "ood")
SUBSETS = ("easy",)  # the in-dist subset whose valley the issue names (val/easy/greedy_acc)
# P²O's extra costs over GRPO, each logged apart: the template search (its records), the forward on the prompt a
# distilled row was sampled under, the skill anchor's backward, the callback's greedy check of the distilled prompts
EXTRAS = ("search", "context_forward", "anchor_backward", "distilled_eval", "reference_forward")


def run_one(setting: str, seed: int, args: argparse.Namespace, lr: float, name: str | None = None) -> Path:
    import yaml

    config_name, edits = SETTINGS[setting]
    name = name or f"{setting}-s{seed}"
    run = args.out / name
    if (run / "policy").is_dir():
        return run
    config = yaml.safe_load((REPO / "configs" / config_name).read_text())
    config["seed_everything"] = seed
    config["data"]["seed"] = seed
    config["model"]["rollout"]["num_rollouts"] = args.k
    config["model"]["optimizer"]["init_args"]["lr"] = lr
    if args.world is not None:  # another world: its weights, and the data splits of its recipe's seed
        config["model"]["model"] = str(args.world)
        config["data"]["world_seed"] = json.loads((args.world / "recipe.json").read_text())["seed"]
        for callback in config["trainer"]["callbacks"]:  # the config's reference curve is the shipped world's
            if callback["class_path"].endswith("MetricsPlot"):
                callback.pop("init_args", None)
    config["trainer"].update(
        max_steps=args.max_steps,
        val_check_interval=args.val_every,
        default_root_dir=str(run),
        enable_progress_bar=False,
    )
    config["trainer"]["logger"]["init_args"].update(save_dir=str(args.out), name=name)
    if config_name == "p2o-toy.yaml":
        _p2o_callback(config)["init_args"]["seed"] = seed
    for edit in edits:
        edit(config, args)
    if config_name == "p2o-toy.yaml":
        for key, value in args.overrides:
            edit = _callback_arg(key.removeprefix("p2o."), value) if key.startswith("p2o.") else _set(key, value)
            edit(config, args)
    run.mkdir(parents=True, exist_ok=True)
    (run / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # a run without policy/ did not finish: start it over (a fit into a folder holding a run is refused otherwise)
    cmd = [sys.executable, "-m", "p2o_lightning", "fit", "--config", str(run / "experiment.yaml"), "--overwrite=true"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"[{time.strftime('%H:%M:%S')}] {name} (lr {lr:g})", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (args.out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (see {args.out / f'{name}.log'}):\n{proc.stderr[-3000:]}")
    (run / "wall_time_s").write_text(f"{time.perf_counter() - start:.1f}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    (run / "cpu_time_s").write_text(f"{cpu:.1f}")  # = wall time on a core of its own, whatever else runs
    return run


def _values(series: dict, key: str) -> list[float]:
    return [v for _, v in series.get(key, [])]


def summarise(run: Path, steps_per_epoch: int) -> dict[str, float]:
    m = read_metrics(run / "metrics.csv")
    nan = float("nan")
    out: dict[str, float] = {}
    for split in SPLITS:
        greedy = _values(m, f"val/{split}/greedy_acc")
        mean_k = next((_values(m, k) for k in m if k.startswith(f"val/{split}/mean@")), [])
        out[f"{split}_start"] = greedy[0] if greedy else nan
        out[split] = greedy[-1] if greedy else nan
        out[f"{split}_mean@k"] = mean_k[-1] if mean_k else nan
        out[f"{split}_min"] = min(greedy) if greedy else nan
    for subset in SUBSETS:
        greedy = _values(m, f"val/{subset}/greedy_acc")
        out[f"{subset}_start"] = greedy[0] if greedy else nan
        out[f"{subset}_min"] = min(greedy) if greedy else nan
    wrong = _values(m, "train/collapse_all_wrong")[-steps_per_epoch:]
    records = read_records(run)
    search_s = sum(r.seconds for r in records)
    distilled = _values(m, "p2o/distilled_greedy_acc")
    wall_s = float((run / "wall_time_s").read_text()) if (run / "wall_time_s").exists() else nan
    out.update(
        collapse_all_wrong=sum(wrong) / max(len(wrong), 1),
        rescued_groups=sum(_values(m, "p2o/rescued_groups")),
        searches=len(records),
        distilled_acc=distilled[-1] if distilled else nan,
        wall_s=wall_s,
        cpu_s=float((run / "cpu_time_s").read_text()) if (run / "cpu_time_s").exists() else nan,
        search_s=search_s,
        search_share=search_s / wall_s if wall_s == wall_s and wall_s > 0 else nan,
        **extra_costs(run),
    )
    return out


def extra_costs(run: Path) -> dict[str, float]:
    """P²O's extra costs over GRPO in a run (:data:`EXTRAS`): ``<extra>_cpu_s``, the CPU seconds of each (the search's
    from its records, the others summed over the run's ``time/<extra>_cpu_s``), ``extra_cpu_s`` their total, and
    each one's ``_cpu_share`` of the run's CPU time: its last ``time/run_cpu_s`` (the same process clock) plus what
    the callback logged at that step, which ran after the clock's reading (the last epoch end's search and greedy
    check; the callback's costs logged at a step are in the clock of the next). NaN where the run was logged before
    they were measured apart (no ``time/context_forward_cpu_s``; it is 0 in a GRPO step).
    """
    m = read_metrics(run / "metrics.csv")
    logged = "time/context_forward_cpu_s" in m
    cpu = {"search": sum(r.cpu_seconds for r in read_records(run))}
    for extra in EXTRAS[1:]:
        cpu[extra] = sum(_values(m, f"time/{extra}_cpu_s")) if logged else float("nan")
    cpu["extra"] = sum(cpu.values())
    clock = m.get("time/run_cpu_s", [])
    last = clock[-1][0] if clock else None
    after = sum(v for key in ("time/search_cpu_s", "time/distilled_eval_cpu_s") for s, v in m.get(key, []) if s == last)
    total = clock[-1][1] + after if clock else float("nan")
    out = {}
    for extra, seconds in cpu.items():
        out[f"{extra}_cpu_s"] = seconds
        out[f"{extra}_cpu_share"] = seconds / total if total > 0 else float("nan")
    return out


def accuracy_at_cpu(run: Path, budget: float, split: str = "in_dist") -> float:
    """The plain-prompt greedy accuracy a run shows once it has spent ``budget`` CPU seconds (:func:`accuracy_by_cpu`
    at one budget)."""
    return accuracy_by_cpu(run, [budget], split)[0]


def accuracy_by_cpu(run: Path, grid: list[float], split: str = "in_dist") -> list[float]:
    """The plain-prompt greedy accuracy a run shows at each CPU time of ``grid``: its last validation whose CPU clock
    (``time/run_cpu_s`` of the next training step, so the validation itself is paid) is within it; before any, the
    run's start; NaN for a run without validations or CPU clock."""
    m = read_metrics(run / "metrics.csv")
    acc, cpu = m.get(f"val/{split}/greedy_acc", []), m.get("time/run_cpu_s", [])
    if not acc or not cpu:
        return [float("nan")] * len(grid)
    paid = [(next((c for s, c in cpu if s > step), cpu[-1][1]), value) for step, value in acc]
    out = []
    for budget in grid:
        shown = acc[0][1]
        for when, value in paid:
            if when <= budget:
                shown = value
        out.append(shown)
    return out


def budget_verdict(runs: dict[str, list[Path]], method: str, split: str = "in_dist", points: int = 400) -> dict:
    """P²O (``method``) against GRPO 2K at matched CPU time: mean ± std over seeds of each on one CPU grid up to the
    shorter of the two settings' mean run CPU; the largest shortfall of P²O below GRPO 2K measured in the larger std
    there (the target: never more than one), and P²O at GRPO 2K's whole budget against GRPO 2K's final accuracy
    (the target: above by more than twice the larger std)."""
    budget = mean_std([run_cpu(r) for r in runs["grpo_2k"]])[0]
    end = min(budget, mean_std([run_cpu(r) for r in runs[method]])[0])
    grid = [end * i / (points - 1) for i in range(points)]
    curves = {s: [accuracy_by_cpu(r, grid, split) for r in runs[s]] for s in ("grpo_2k", method)}
    stats = {s: [mean_std([c[i] for c in curves[s]]) for i in range(points)] for s in curves}
    worst, worst_at = float("inf"), 0.0
    for i, c in enumerate(grid):
        (pm, ps), (gm, gs) = stats[method][i], stats["grpo_2k"][i]
        gap = (pm - gm) / max(ps, gs, 1e-9)  # P²O above (+) or below (-) GRPO 2K, in the larger std
        if gap < worst:
            worst, worst_at = gap, c
    at_budget = mean_std([accuracy_at_cpu(r, budget, split) for r in runs[method]])
    final = mean_std([summarise_final(r, split) for r in runs["grpo_2k"]])
    return {"grid": grid, "stats": stats, "budget": budget, "worst_gap_std": worst, "worst_at_cpu": worst_at,
            "at_budget": at_budget, "grpo_2k_final": final}  # fmt: skip


def summarise_final(run: Path, split: str = "in_dist") -> float:
    """The run's last plain-prompt greedy accuracy on ``split``."""
    values = read_metrics(run / "metrics.csv").get(f"val/{split}/greedy_acc", [])
    return values[-1][1] if values else float("nan")


def plot_accuracy_vs_cpu(runs: dict[str, list[Path]], result: dict, method: str, out: Path, points: int = 400) -> None:
    """``accuracy_vs_cpu.png``: mean ± std plain-prompt in-dist accuracy of P²O and GRPO 2K against CPU seconds, each
    drawn over its own runs' mean CPU time, with GRPO 2K's whole budget marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for setting, style in ((method, "-"), ("grpo_2k", "--")):
        end = mean_std([run_cpu(r) for r in runs[setting]])[0]
        grid = [end * i / (points - 1) for i in range(points)]
        curves = [accuracy_by_cpu(r, grid) for r in runs[setting]]
        mean, std = zip(*(mean_std([c[i] for c in curves]) for i in range(points)))
        (line,) = ax.plot(grid, mean, style, lw=2, label=f"{setting} (mean ± std, {len(curves)} seeds)")
        ax.fill_between(grid, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                        color=line.get_color(), alpha=0.15)  # fmt: skip
    ax.axvline(result["budget"], color="grey", lw=0.8, ls=":", label="GRPO 2K's whole budget")
    ax.set_xlabel("CPU seconds of the run (1 torch thread; a validation counts once paid)")
    ax.set_ylabel("plain prompt, greedy, in-dist")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_cpu(run: Path) -> float:
    """CPU seconds of a run's fit (its last ``time/run_cpu_s``)."""
    cpu = read_metrics(run / "metrics.csv").get("time/run_cpu_s", [])
    return cpu[-1][1] if cpu else float("nan")


def archive_metrics(runs: dict[str, list[Path]], out: Path) -> None:
    """Every run's ``metrics.csv``, gzipped, as ``<out>/metrics/<run>.csv.gz``: the per-step record behind the summary,
    small enough to commit with it.
    """
    folder = out / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    for paths in runs.values():
        for run in paths:
            if (run / "metrics.csv").exists():
                data = (run / "metrics.csv").read_bytes()
                (folder / f"{run.name}.csv.gz").write_bytes(gzip.compress(data, mtime=0))


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(ms: tuple[float, float]) -> str:
    mean, std = ms
    return "–" if mean != mean else f"{mean:.3f} ± {std:.3f}"


def plot_curves(runs: dict[str, list[Path]], out: Path) -> None:
    """Mean (± std band) plain-prompt greedy accuracy of every setting against the step, one panel per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPLITS), figsize=(5.6 * len(SPLITS), 4.0), squeeze=False)
    for ax, split in zip(axes[0], SPLITS):
        for setting, paths in runs.items():
            curves = [dict(read_metrics(p / "metrics.csv").get(f"val/{split}/greedy_acc", [])) for p in paths]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            mean = [statistics.mean(c[s] for c in curves) for s in steps]
            std = [statistics.stdev(c[s] for c in curves) if len(curves) > 1 else 0.0 for s in steps]
            style = "-" if setting.startswith("p2o") else "--"
            label, width = f"{setting} ({len(paths)} seeds)", 2 if setting == "p2o" else 1.2
            (line,) = ax.plot(steps, mean, style, marker="o", ms=3, label=label, lw=width)
            ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=line.get_color(), alpha=0.12)  # fmt: skip
        ax.set_title(f"plain prompt, greedy: {split}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("mean ± std over seeds (count in the legend)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def verdict(
    summary: dict[str, dict[str, list[float]]],
    runs: dict[str, list[Path]],
    method: str = "p2o",
    by_cpu: dict | None = None,
) -> list[str]:
    """The issue's target, checked on the numbers: P²O (K, setting ``method``) against GRPO (2K) and its ablations."""
    lines = []
    if method not in summary or "grpo_2k" not in summary:
        return lines
    p2o, grpo2k = summary[method], summary["grpo_2k"]
    lines.append(f"P²O = {method}:")
    for split in SPLITS:
        (pm, ps), (gm, gs) = mean_std(p2o[split]), mean_std(grpo2k[split])
        margin = 2 * max(ps, gs)
        ok = pm - gm > margin
        lines.append(f"- {split}: P²O {pm:.3f} vs GRPO 2K {gm:.3f}: +{pm - gm:.3f} (needs > {margin:.3f}) -> "
                     f"{'met' if ok else 'NOT met'}")  # fmt: skip
    if "grpo_k" in summary:
        ratio = mean_std(p2o["cpu_s"])[0] / mean_std(summary["grpo_k"]["cpu_s"])[0]
        lines.append(
            f"- compute (CPU seconds of the 1-thread runs = their wall time on a core of their own): P²O / GRPO K = "
            f"{ratio:.2f} (needs <= 1.5) -> {'met' if ratio <= 1.5 else 'NOT met'}"
        )
    budget = mean_std([run_cpu(r) for r in runs["grpo_2k"]])[0]
    (em, es), (gm, gs) = mean_std([accuracy_at_cpu(r, budget) for r in runs[method]]), mean_std(grpo2k["in_dist"])
    margin = 2 * max(es, gs)
    lines.append(
        f"- equal compute: in_dist of P²O after GRPO 2K's {budget:.0f} CPU-s {em:.3f} ± {es:.3f} vs GRPO 2K's "
        f"final {gm:.3f}: +{em - gm:.3f} (needs > {margin:.3f}) -> {'met' if em - gm > margin else 'NOT met'}"
    )
    by_cpu = by_cpu or budget_verdict(runs, method)
    worst, at = by_cpu["worst_gap_std"], by_cpu["worst_at_cpu"]
    lines.append(
        f"- at every matched CPU time (to {by_cpu['grid'][-1]:.0f} CPU-s): P²O's largest shortfall below GRPO 2K "
        f"is {max(-worst, 0):.2f} std (at {at:.0f} CPU-s; needs <= 1) -> {'met' if worst >= -1 else 'NOT met'}"
    )
    share, cpu_share = mean_std(p2o["search_share"])[0], mean_std(p2o["search_cpu_share"])[0]
    lines.append(f"- the search's share of P²O's run: {share:.2f} of its wall time, {cpu_share:.2f} of its CPU time")
    shares = ", ".join(f"{e} {mean_std(p2o[f'{e}_cpu_share'])[0]:.3f}" for e in EXTRAS)
    extra = mean_std(p2o["extra_cpu_share"])[0]
    lines.append(f"- P²O's extra costs over GRPO, shares of its CPU time: {shares}; together {extra:.3f} (target <= "
                 f"0.20) -> {'unknown' if extra != extra else 'met' if extra <= 0.20 else 'NOT met'}")  # fmt: skip
    for ablation in ("p2o_paper_loss", "p2o_no_distill", "p2o_one_template", "p2o_all_templated", "grpo_k"):
        if ablation in summary:
            a, p = mean_std(summary[ablation]["in_dist"])[0], mean_std(p2o["in_dist"])[0]
            lines.append(f"- {ablation} in_dist {a:.3f} below P²O {p:.3f} -> {'yes' if a < p else 'NO'}")
    for split, target in (("in_dist", 0.9), ("easy", 0.85)):
        if f"{split}_min" in p2o:  # every seed: its lowest validation against its own start
            ratios = [low / start for low, start in zip(p2o[f"{split}_min"], p2o[f"{split}_start"])]
            lines.append(f"- no scare: lowest {split} / start per seed {', '.join(f'{r:.2f}' for r in ratios)} "
                         f"(target >= {target}) -> {'met' if min(ratios) >= target else 'NOT met'}")  # fmt: skip
    return lines


def measured_on(world: Path | None = None) -> dict[str, str]:
    """The embedded world the runs trained (its folder and weights' hash; default the shipped one) and the commit."""
    from p2o_lightning.tasks.shipped_world import shipped_world
    from p2o_lightning.tasks.world import world_fingerprint

    path = world or shipped_world()
    git = ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip() or "unknown"
    return {"world": path.name, "weights": world_fingerprint(path), "commit": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    parser.add_argument("--k", type=int, default=8, help="K of GRPO and P²O (GRPO 2K uses 2K)")
    parser.add_argument("--lr", type=float, default=6e-5, help="the learning rate of every setting")
    parser.add_argument("--lr-of", nargs="+", default=[], metavar="SETTING=LR",
                        help="a setting's own rate (e.g. grpo_2k=2e-5: GRPO at its better rate)")  # fmt: skip
    parser.add_argument("--sweep-lr", type=float, nargs="+", default=None, help="run GRPO K at each of these lrs")
    parser.add_argument("--max-steps", type=int, default=240, help="optimizer steps of every run (10 epochs)")
    parser.add_argument("--val-every", type=int, default=24, help="validate every N steps (24: every epoch)")
    parser.add_argument("--steps-per-epoch", type=int, default=24, help="for the last-epoch collapse average")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "experiment")
    parser.add_argument("--world", type=Path, default=None,
                        help="another world's folder (python -m p2o_lightning world --rebuild --seed N): its weights "
                             "and its recipe seed's data splits; default the shipped world")  # fmt: skip
    parser.add_argument("--method", default="p2o", choices=list(SETTINGS), help="the P²O setting of the verdict")
    parser.add_argument("--summarise-only", action="store_true", help="run nothing: summarise the finished runs")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="one change on top of every P²O setting (a lever): a dotted config key "
                             "(model.loss.kl_coef=0.05) or p2o.<key> (the P²O callback's: "
                             "p2o.schedule.tau=1)")  # fmt: skip
    args = parser.parse_args()
    import yaml

    args.out.mkdir(parents=True, exist_ok=True)
    overrides = []
    for item in args.overrides:
        key, _, value = item.partition("=")
        if not key or not value:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides.append((key, yaml.safe_load(value)))
    args.overrides = overrides
    rates = {}
    for item in args.lr_of:
        setting, _, rate = item.partition("=")
        if setting not in SETTINGS or not rate:
            raise SystemExit(f"--lr-of {item!r}: expected SETTING=LR with SETTING one of {list(SETTINGS)}")
        rates[setting] = float(rate)

    if args.sweep_lr:
        runs = {f"grpo_k@{lr:g}": [run_one("grpo_k", s, args, lr, f"sweep-grpo_k-lr{lr:g}-s{s}") for s in args.seeds]
                for lr in args.sweep_lr}  # fmt: skip
    elif args.summarise_only:
        found = {s: [args.out / f"{s}-s{seed}" for seed in args.seeds] for s in args.settings}
        runs = {s: [p for p in paths if (p / "policy").is_dir()] for s, paths in found.items()}
        runs = {s: paths for s, paths in runs.items() if paths}
    else:
        runs = {s: [run_one(s, seed, args, rates.get(s, args.lr)) for seed in args.seeds] for s in args.settings}
    summary: dict[str, dict[str, list[float]]] = {}
    for setting, paths in runs.items():
        per_seed = [summarise(p, args.steps_per_epoch) for p in paths]
        summary[setting] = {k: [r[k] for r in per_seed] for k in per_seed[0]}
    columns = ["in_dist_start", "in_dist", "in_dist_min", "easy_start", "easy_min", "hard", "ood", "in_dist_mean@k",
               "hard_mean@k", "ood_mean@k", "collapse_all_wrong", "rescued_groups", "searches", "distilled_acc",
               "cpu_s", "wall_s", "search_s", "search_share",
               *(f"{e}_cpu_{x}" for e in (*EXTRAS, "extra") for x in ("s", "share"))]  # fmt: skip
    lines = ["| setting | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    lines += [
        f"| {s} | {len(runs[s])} | " + " | ".join(fmt(mean_std(v[c])) for c in columns) + " |"
        for s, v in summary.items()
    ]
    world = measured_on(args.world)
    own = ", ".join(f"{s} {r:g}" for s, r in rates.items())
    head = f"World {world['world']} (weights {world['weights']}), commit {world['commit']}, lr {args.lr:g}"
    head += f" ({own}), " if own else ", "
    head += f"{args.max_steps} steps, K={args.k}, {args.threads} thread(s) per run.\n"
    by_cpu = budget_verdict(runs, args.method) if "grpo_2k" in runs and args.method in runs else None
    table = "\n".join([head, *lines, "", *verdict(summary, runs, args.method, by_cpu)])
    print(table)
    (args.out / "summary.md").write_text(table + "\n")
    (args.out / "summary.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       **world, "per_seed": summary}, indent=1))  # fmt: skip
    with open(args.out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", *(f"{c}_{x}" for c in columns for x in ("mean", "std"))])
        for s, v in summary.items():
            writer.writerow([s, *(f"{x:.4f}" for c in columns for x in mean_std(v[c]))])
    plot_curves(runs, args.out / "curves.png")
    if by_cpu is not None:
        plot_accuracy_vs_cpu(runs, by_cpu, args.method, args.out / "accuracy_vs_cpu.png")
    archive_metrics(runs, args.out)
    seed0 = [paths[0] for paths in runs.values()]
    subprocess.run(
        [sys.executable, "-m", "p2o_lightning", "report", *map(str, seed0), "--out", str(args.out)], cwd=REPO
    )


if __name__ == "__main__":
    main()
