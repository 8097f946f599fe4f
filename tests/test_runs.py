"""Run folders through the real command: a quiet console (a bar on a terminal, plain lines in a log, one summary),
kill -9 + resume equal row for row, reruns refused."""

import os
import subprocess
import sys

import pytest
from helpers import REPO, csv_rows

from p2o_lightning.cli import cli_main
from p2o_lightning.console import RLProgressBar, RLProgressLog, log_interval, progress_bar
from p2o_lightning.runs import RunFolderError, check_folder_path, check_run_folder, clear_run, holds_run

# 64 prompts per step over the 384-problem pool: epoch 0 ends after RL step 6, so the kill at step 7 resumes from
# the checkpoint at the epoch's end and the killed run's first row of epoch 1 is replaced
ARGS = [
    "--trainer.max_steps=9", "--trainer.val_check_interval=4", "--data.batch_size=64", "--data.max_val_samples=8",
    "--model.rollout.num_rollouts=2", "--model.rollout.max_new_tokens=8", "--model.validation.num_samples=2",
]  # fmt: skip
# toy.yaml's callbacks, checkpointing every 3 steps (the last at the end of epoch 0), and the kill -9
CALLBACKS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 3, save_top_k: 0}
    - class_path: p2o_lightning.outputs.ExportPolicy
    - class_path: p2o_lightning.outputs.MetricsPlot
    - class_path: p2o_lightning.runs.RunFolder
    - class_path: helpers.SigkillAt
"""
NOISE = [
    "args parameter", "litlogger", "LeafSpec", "__len__", "manual optimization", "Previous log files",
    "Loading weights", "Writing model shards", "Warning", "warn(",
]  # fmt: skip


def fit(world, cwd, *extra, kill_at=None):
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "callbacks.yaml").write_text(CALLBACKS)
    cmd = [
        sys.executable, "-m", "p2o_lightning", "fit", "--config", str(REPO / "configs" / "toy.yaml"),
        "--config", "callbacks.yaml", f"--model.model={world}", *ARGS, *extra,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"), OMP_NUM_THREADS="1", P2O_SIGKILL_AT=str(kill_at or -1))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def comparable(rows):
    """Rows without their timings (wall-clock differs between runs; everything else must not)."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_console_kill_resume_and_rerun(tiny_world, tmp_path):
    full = fit(tiny_world, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    console = full.stdout + full.stderr
    # a quiet console: none of the libraries' non-actionable messages
    for noise in NOISE:
        assert noise not in console, (noise, console[-3000:])
    # one progress bar for the run: RL step / total with reward, collapse, rollout tokens/s, validation accuracy
    last_bar = [line for line in console.replace("\r", "\n").splitlines() if line.startswith("RL step")][-1]
    assert "9/9" in last_bar and "reward=" in last_bar and "collapse=" in last_bar and "tok/s=" in last_bar
    assert "in_dist=" in last_bar and "ood=" in last_bar
    # the end summary: start / end accuracy per split, collapse, wall time, the outputs
    summary = console[console.index("run summary: runs/toy (9 RL steps") :]
    for item in ("in_dist/greedy_acc", "ood/greedy_acc", "collapse (all groups)", "all-wrong", "wall time"):
        assert item in summary, (item, summary)
    for output in ("runs/toy/metrics.csv", "runs/toy/metrics.png", "runs/toy/checkpoints/last.ckpt", "runs/toy/policy"):
        assert output in summary, (output, summary)
    assert (tmp_path / "full/runs/toy/summary.txt").read_text().startswith("run summary: runs/toy")

    # kill -9 before RL step 7 (the last checkpoint is at the end of epoch 0, step 6), then resume
    killed = fit(tiny_world, tmp_path / "resumed", kill_at=7)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = fit(tiny_world, tmp_path / "resumed", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = csv_rows(tmp_path / "full/runs/toy/metrics.csv")
    b = csv_rows(tmp_path / "resumed/runs/toy/metrics.csv")
    assert [(r["step"], r.get("epoch")) for r in a] == [(r["step"], r.get("epoch")) for r in b]
    for row_a, row_b in zip(comparable(a), comparable(b)):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            assert float(row_a[key]) == pytest.approx(float(row_b[key]), rel=1e-5, abs=1e-7), (row_a["step"], key)
    assert {r["epoch"] for r in a if "epoch" in r} == {"0", "1"}  # the run did cross an epoch

    # a new fit into a folder holding a run is refused, naming the folder and both ways on, and changes nothing
    folder = tmp_path / "full/runs/toy"
    before = snapshot(folder)
    rerun = fit(tiny_world, tmp_path / "full")
    assert rerun.returncode != 0
    assert "runs/toy already holds a run" in rerun.stderr
    assert "--ckpt_path last" in rerun.stderr and "--overwrite" in rerun.stderr
    assert snapshot(folder) == before


def test_run_folder_rules(tmp_path):
    folder = tmp_path / "run"
    check_run_folder(folder, None)  # nothing there: a new run
    folder.mkdir()
    (folder / "config.yaml").write_text("x: 1\n")  # what a run that failed in setup leaves: not a run
    assert not holds_run(folder)
    check_run_folder(folder, None)
    (folder / "metrics.csv").write_text("step\n0\n")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"run already holds a run\. Resume it with `--ckpt_path last`"):
        check_run_folder(folder, None)
    with pytest.raises(RunFolderError, match=r"no checkpoint to resume from .*holds no last.ckpt"):
        check_run_folder(folder, "last")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    check_run_folder(folder, "last")
    check_run_folder(folder, None, overwrite=True)
    removed = clear_run(folder)
    assert {p.name for p in removed} == {"config.yaml", "metrics.csv", "checkpoints"}
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # what we did not write stays
    check_folder_path(folder / "new" / "deeper", "run folder")  # made at setup
    with pytest.raises(NotADirectoryError, match=r"run folder .*notes.txt cannot be created: it is a file, not a"):
        check_folder_path(folder / "notes.txt", "run folder")


def test_overwrite_starts_over(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "toy"
    (folder / "p2o").mkdir(parents=True)
    (folder / "p2o" / "search_000.json").write_text('{"rollout_step": 3}')
    (folder / "metrics.csv").write_text("epoch,step,train/reward\n0,0,0.5\n0,1,0.5\n0,2,0.5\n")
    args = ["fit", "--config", str(REPO / "configs" / "toy.yaml"), f"--model.model={tiny_world}"]
    small = ["--trainer.max_steps=1", "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0"]
    small += ["--data.batch_size=2", "--model.rollout.num_rollouts=2", "--model.rollout.max_new_tokens=4"]
    with pytest.raises(RunFolderError, match="runs/toy already holds a run"):
        cli_main(args + small)
    cli_main(args + small + ["--overwrite=true"])
    rows = csv_rows(folder / "metrics.csv")
    assert [r["step"] for r in rows] == ["0"] and not (folder / "p2o").exists()


def test_console_in_a_log_file(tiny_world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "configs" / "toy.yaml"), f"--model.model={tiny_world}"]
    args += ["--trainer.max_steps=40", "--trainer.val_check_interval=20", "--data.batch_size=2"]
    args += ["--data.max_val_samples=4", "--model.rollout.num_rollouts=2", "--model.rollout.max_new_tokens=4"]
    args += ["--model.validation.num_samples=0"]
    cli_main(args)  # stdout is pytest's capture, not a terminal: the progress is plain lines
    captured = capsys.readouterr()
    console = captured.out + captured.err
    assert "\r" not in console  # no bar frames
    lines = [line for line in console.splitlines() if line.startswith("RL step")]
    # 40 steps, about 20 lines: one every round(40 / 20) = 2 steps, the last step included
    assert [line.split()[2] for line in lines] == [f"{n}/40" for n in range(2, 41, 2)]
    for line in lines:
        assert "s/step] reward=" in line and " collapse=" in line and " tok/s=" in line, line
    assert "in_dist=" in lines[-1] and "ood=" in lines[-1]  # validated at step 20: its accuracies from then on
    assert "in_dist=" not in lines[0]
    # the end summary, once, after the last progress line
    assert console.count("run summary:") == 1
    assert console.index("run summary: runs/toy (40 RL steps") > console.index(lines[-1])


def test_progress_bar_follows_the_console(monkeypatch):
    assert log_interval(240) == 12  # a 240-step run writes 20 lines
    assert log_interval(120) == 6 and log_interval(9) == 1 and log_interval(None) == 10
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert isinstance(progress_bar(), RLProgressBar)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert isinstance(progress_bar(), RLProgressLog)
