"""Is a refactoring behaviour-preserving? Fixed-seed runs of the two shipped configs, compared cell by cell.

    python scripts/same_behaviour.py run OUT            # toy.yaml 20 steps, p2o-toy.yaml 30 steps from this checkout
    python scripts/same_behaviour.py compare A B        # equal untimed metrics.csv cells and search records?

Run it on the commit before a refactoring and on the refactoring: ``compare`` exits 1 and names every cell that
differs. What a run's timing or host decides (columns named ``time/*``, ``*_s``, ``*_per_s``, wall and CPU seconds;
a search record's ``seconds`` / ``cpu_seconds``) is left out; everything else must be bit-identical. Each run uses one
torch thread, so the arithmetic is the same wherever it runs.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

RUNS = {"toy": ("configs/toy.yaml", 20), "p2o-toy": ("configs/p2o-toy.yaml", 30)}
TIMED_RECORD_KEYS = ("seconds", "cpu_seconds")


def timed(column: str) -> bool:
    """A column whose value is a duration or a rate: it differs between two runs of the same code."""
    name = column.split("/")[-1]
    return column.startswith("time/") or name.endswith(("_s", "_per_s", "_seconds")) or "wall" in name


def run(out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=False)
    for name, (config, steps) in RUNS.items():
        cmd = [sys.executable, "-m", "p2o_lightning", "fit", "--config", config, "--trainer.max_steps", str(steps),
               "--trainer.default_root_dir", str(out / name), "--trainer.logger.init_args.save_dir", str(out),
               "--trainer.logger.init_args.name", name]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)


def rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as f:
        return {(r.get("step", ""), r.get("epoch", "")) + (str(i),): r for i, r in enumerate(csv.DictReader(f))}


def records(folder: Path) -> dict[str, dict]:
    found = {}
    for path in sorted((folder / "p2o").glob("search_*.json")):
        record = json.loads(path.read_text())
        found[path.name] = {k: v for k, v in record.items() if k not in TIMED_RECORD_KEYS}
    return found


def compare(a: Path, b: Path) -> int:
    differences, cells = [], 0
    for name in RUNS:
        ra, rb = rows(a / name / "metrics.csv"), rows(b / name / "metrics.csv")
        if ra.keys() != rb.keys():
            differences.append(f"{name}: rows differ ({len(ra)} vs {len(rb)})")
            continue
        for key, row in ra.items():
            for column in sorted(set(row) | set(rb[key])):
                if timed(column):
                    continue
                cells += 1
                if row.get(column, "") != rb[key].get(column, ""):
                    differences.append(f"{name} row {key}: {column} {row.get(column)!r} != {rb[key].get(column)!r}")
        sa, sb = records(a / name), records(b / name)
        if sa != sb:
            differences.append(f"{name}: search records differ ({sorted(sa)} vs {sorted(sb)})")
        cells += sum(len(r) for r in sa.values())
    for line in differences[:50]:
        print(line)
    print(f"{cells} untimed cells compared, {len(differences)} differences")
    return 1 if differences else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run").add_argument("out", type=Path)
    both = commands.add_parser("compare")
    both.add_argument("a", type=Path)
    both.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.out)
    else:
        sys.exit(compare(args.a, args.b))


if __name__ == "__main__":
    main()
