"""The paper's comparison on the embedded world: GRPO (K), GRPO (2K), P²O and three ablations, 3 seeds each.

Every run is the real trainer through the user's command (``python -m p2o_lightning fit``) with the same number
of optimizer steps and the same data; only the method differs:

| setting            | config                | overrides                                              |
|--------------------|-----------------------|--------------------------------------------------------|
| grpo_k             | configs/toy.yaml      | K rollouts                                             |
| grpo_2k            | configs/toy.yaml      | 2K rollouts                                            |
| p2o                | configs/p2o-toy.yaml  | K rollouts, offline reflection, distillation + mask    |
| p2o_no_distill     | configs/p2o-toy.yaml  | ``model.distill=false`` (gradient on templated prompt) |
| p2o_one_template   | configs/p2o-toy.yaml  | one template for all K rollouts of a prompt            |
| p2o_no_ratio_mask  | configs/p2o-toy.yaml  | ``model.context_ratio_bounds=null`` (no context mask)  |

    python benchmarks/p2o_experiment.py [--seeds 0 1 2] [--settings ...] [--max-steps 72] [--out runs/experiment]

Runs that already finished (their ``policy/`` exists) are not run again. The summary — in-distribution and OOD
greedy accuracy at the end (mean ± std over seeds), the all-wrong collapse rate of the last epoch, rescued groups,
wall time — is printed as a Markdown table, written to ``<out>/summary.csv`` / ``summary.md``, and the report's
PNGs are drawn into ``<out>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2o_lightning.outputs import read_metrics  # noqa: E402


def _p2o_callback(config: dict) -> dict:
    return next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("P2OCallback"))


def _set(path: str, value):
    def edit(config: dict, args: argparse.Namespace) -> None:
        *keys, leaf = path.split(".")
        node = config
        for key in keys:
            node = node[key]
        node[leaf] = value(args) if callable(value) else value

    return edit


def _one_template(config: dict, args: argparse.Namespace) -> None:
    _p2o_callback(config)["init_args"]["group_diversity"] = False


SETTINGS = {
    "grpo_k": ("toy.yaml", []),
    "grpo_2k": ("toy.yaml", [_set("model.num_rollouts", lambda a: 2 * a.k)]),
    "p2o": ("p2o-toy.yaml", []),
    "p2o_no_distill": ("p2o-toy.yaml", [_set("model.distill", False)]),
    "p2o_one_template": ("p2o-toy.yaml", [_one_template]),
    "p2o_no_ratio_mask": ("p2o-toy.yaml", [_set("model.context_ratio_bounds", None)]),
}


def run_one(setting: str, seed: int, args: argparse.Namespace) -> Path:
    import yaml

    config_name, edits = SETTINGS[setting]
    name = f"{setting}-s{seed}"
    run = args.out / name
    if (run / "policy").is_dir():
        return run
    config = yaml.safe_load((REPO / "configs" / config_name).read_text())
    config["seed_everything"] = seed
    config["data"]["seed"] = seed
    config["model"]["num_rollouts"] = args.k
    config["trainer"].update(max_steps=args.max_steps, default_root_dir=str(run), enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"].update(save_dir=str(args.out), name=name)
    if config_name == "p2o-toy.yaml":
        _p2o_callback(config)["init_args"]["seed"] = seed
    for edit in edits:
        edit(config, args)
    run.mkdir(parents=True, exist_ok=True)
    (run / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "p2o_lightning", "fit", "--config", str(run / "experiment.yaml")]
    start = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (args.out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (see {args.out / f'{name}.log'}):\n{proc.stderr[-3000:]}")
    (run / "wall_time_s").write_text(f"{time.perf_counter() - start:.1f}")
    return run


def last(series: dict, key: str) -> float:
    values = series.get(key)
    return values[-1][1] if values else float("nan")


def summarise(run: Path, steps_per_epoch: int) -> dict[str, float]:
    m = read_metrics(run / "metrics.csv")
    wrong = [v for _, v in m.get("train/collapse_all_wrong", [])][-steps_per_epoch:]
    searches = sorted((run / "p2o").glob("search_*.json"))
    best = max((max(json.loads(p.read_text())["dev_mean"]) for p in searches), default=float("nan"))
    return {
        "in_dist": last(m, "val/in_dist/greedy_acc"),
        "ood": last(m, "val/ood/greedy_acc"),
        "in_dist_start": m["val/in_dist/greedy_acc"][0][1] if "val/in_dist/greedy_acc" in m else float("nan"),
        "collapse_all_wrong": sum(wrong) / max(len(wrong), 1),
        "rescued_groups": sum(v for _, v in m.get("p2o/rescued_groups", [])),
        "searches": len(searches),
        "best_dev": best,
        "wall_s": float((run / "wall_time_s").read_text()) if (run / "wall_time_s").exists() else float("nan"),
    }


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--k", type=int, default=8, help="K of GRPO and P²O (GRPO 2K uses 2K)")
    parser.add_argument("--max-steps", type=int, default=120, help="optimizer steps of every run (5 epochs)")
    parser.add_argument("--steps-per-epoch", type=int, default=24, help="for the last-epoch collapse average")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "experiment")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    runs = {s: [run_one(s, seed, args) for seed in args.seeds] for s in args.settings}
    rows = []
    for setting, paths in runs.items():
        per_seed = [summarise(p, args.steps_per_epoch) for p in paths]
        row = {"setting": setting, "seeds": len(per_seed)}
        for key in per_seed[0]:
            row[key] = mean_std([r[key] for r in per_seed])
        rows.append(row)
    header = ["setting", "in_dist_start", "in_dist", "ood", "collapse_all_wrong", "rescued_groups", "searches",
              "best_dev", "wall_s"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    (args.out / "summary.md").write_text(table + "\n")
    with open(args.out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    seed0 = [paths[0] for paths in runs.values()]
    subprocess.run(
        [sys.executable, "-m", "p2o_lightning", "report", *map(str, seed0), "--out", str(args.out)], cwd=REPO
    )


if __name__ == "__main__":
    main()
