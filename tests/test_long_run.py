"""benchmarks/long_run.py's measuring parts: what it reads from /proc, from a run folder and from a metrics file.

The long run itself takes an hour of a core (its result is committed under benchmarks/results/long_run/); what a
test can check is that each number it plots is read right: a process's memory and CPU time, the folder's bytes by
part, the step of a file being written, and the generated tokens and CPU seconds of each step.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "long_run.py"


@pytest.fixture(scope="module")
def long_run():
    spec = importlib.util.spec_from_file_location("long_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_proc_readings_of_this_process(long_run):
    rss, hwm = long_run.proc_memory(os.getpid())
    assert 10 < rss <= hwm  # a Python process with torch imported holds tens of MB at least
    before = long_run.proc_cpu_s(os.getpid())
    sum(i * i for i in range(3_000_000))  # burn some CPU
    assert long_run.proc_cpu_s(os.getpid()) > before


def test_folder_parts_and_last_step(long_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x" * 1000)
    (run / "p2o").mkdir()
    for i in range(3):
        (run / "p2o" / f"search_{i:03d}.json").write_bytes(b"{}" * 50)
    (run / "config.yaml").write_text("a: 1\n")
    (run / "metrics.csv").write_text("epoch,step,train/loss\n,0,\n0,0,1.5\n0,1,1.4\n0,2,1.")  # the last row is cut
    parts = long_run.folder_parts(run)
    assert parts["bytes_checkpoints"] == 1000 and parts["files_checkpoints"] == 1
    assert parts["bytes_p2o"] == 300 and parts["files_p2o"] == 3
    assert parts["bytes_other"] == 5 and parts["bytes_policy"] == 0
    assert parts["bytes_metrics"] == (run / "metrics.csv").stat().st_size
    assert long_run.last_step(run / "metrics.csv") == 1  # the row being written is not read
    assert long_run.last_step(tmp_path / "missing.csv") is None
    assert long_run.folder_parts(tmp_path / "missing")["bytes_metrics"] == 0


def test_step_rows_tokens_and_cpu(long_run, tmp_path):
    path = tmp_path / "metrics.csv"
    columns = ["epoch", "step", "time/rollout_s", "time/rollout_cpu_s", "time/logprob_cpu_s", "time/update_cpu_s",
               "time/rollout_tokens_per_s", "time/run_cpu_s", "time/run_wall_s", "val/acc"]  # fmt: skip
    rows = [
        {"step": 0, "val/acc": 0.3},  # the starting validation: not a step
        {"epoch": 0, "step": 0, "time/rollout_s": 0.5, "time/rollout_cpu_s": 0.4, "time/logprob_cpu_s": 0.1,
         "time/update_cpu_s": 0.2, "time/rollout_tokens_per_s": 1200, "time/run_cpu_s": 1.0, "time/run_wall_s": 2.0},
        {"epoch": 0, "step": 1, "time/rollout_s": 0.25, "time/rollout_cpu_s": 0.2, "time/logprob_cpu_s": 0.1,
         "time/update_cpu_s": 0.2, "time/rollout_tokens_per_s": 2000, "time/run_cpu_s": 2.5, "time/run_wall_s": 5.0},
    ]  # fmt: skip
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    steps = long_run.step_rows(path)
    assert [r["step"] for r in steps] == [1, 2] and [r["tokens"] for r in steps] == [600, 500]
    assert steps[0]["step_cpu_s"] == pytest.approx(0.7) and steps[1]["run_cpu_delta_s"] == pytest.approx(1.5)
    assert long_run.per_token(steps, "run_cpu_delta_s") == pytest.approx(2.5 / 1100)


def test_summary_of_a_short_run(long_run, tmp_path):
    """A run of fewer than 10 steps (a smoke run) is summarized too: no empty tenth, the folder parts at the end."""
    arm = tmp_path / "grpo"
    (arm / "run").mkdir(parents=True)
    columns = ["epoch", "step", "time/rollout_s", "time/rollout_cpu_s", "time/rollout_tokens_per_s", "time/run_cpu_s"]
    with open(arm / "run" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(
            {
                "epoch": 0,
                "step": i,
                "time/rollout_s": 0.5,
                "time/rollout_cpu_s": 0.25,
                "time/rollout_tokens_per_s": 1000,
                "time/run_cpu_s": 0.5 * (i + 1),
            }
            for i in range(5)
        )
    with open(arm / "samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=long_run.SAMPLE_COLUMNS, restval=0)
        writer.writeheader()
        writer.writerows(
            {
                "t_s": i,
                "step": i,
                "rss_mb": 100 + i,
                "hwm_mb": 110,
                "cpu_s": i,
                "load1": 1.0,
                "bytes_checkpoints": 10,
                "files_checkpoints": 1,
            }
            for i in range(5)
        )
    summary, samples, steps = long_run.summarize("grpo", arm)
    assert summary["steps_done"] == 5 and len(summary["cpu_per_token_step_tenths_us"]) == 5
    assert summary["cpu_per_token_step_early_us"] == pytest.approx(500.0)  # 0.25 CPU s / 500 tokens
    assert summary["rss_late_mb"] == 104 and summary["checkpoint_bytes_last"] == 10
    assert summary["exit"] is None  # no meta.json: a run still going, reported as partial
