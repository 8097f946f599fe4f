"""``python -m p2o_lightning report RUN_DIR [RUN_DIR …]``: redraw the metrics plot of finished runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from p2o_lightning.outputs import plot_metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m p2o_lightning report", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders holding a metrics.csv")
    args = parser.parse_args(argv)
    for run in args.run_dirs:
        csv_path = run / "metrics.csv"
        if not csv_path.is_file():
            raise SystemExit(f"{run}: no metrics.csv (is this a run folder?)")
        print(plot_metrics(csv_path, run / "metrics.png", title=str(run)))
