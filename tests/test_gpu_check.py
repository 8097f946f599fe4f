"""benchmarks/gpu_check.py without a GPU: it refuses clearly, before measuring or writing anything; its pieces work;
its dry run (the same steps on the CPU, tiny, in the Triton interpreter) runs its smallest path.

The check itself needs CUDA (it measures GPUs only); what a CPU can test is that it says so, names why and writes
no file, that the parts that do not touch a GPU (the junit counts, the markdown table) do what they say, and that a
dry-run step runs its command end to end and reports itself as a dry run.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without CUDA sees")
def test_gpu_check_refuses_without_cuda_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "gpu_check: no CUDA device" in proc.stderr and "torch.cuda.is_available() is False" in proc.stderr
    assert not out.exists()


def test_gpu_check_help_lists_its_steps():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for word in ("--all", "--dry-run", "--bundle", "--no-install", "tune", "bench_logprob", "rollout", "fsdp1"):
        assert word in proc.stdout, word


def test_gpu_check_reads_junit_counts_and_writes_tables(tmp_path):
    gpu_check = load_gpu_check()
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuites><testsuite tests="7" failures="1" errors="0" skipped="2"></testsuite></testsuites>')
    assert gpu_check.pytest_counts(junit) == {"passed": 4, "failed": 1, "errors": 0, "skipped": 2}
    assert gpu_check.pytest_counts(tmp_path / "absent.xml")["passed"] == 0
    table = gpu_check.markdown_table([{"a": 1, "b": "x"}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |"]
    assert set(gpu_check.DEFAULT_STEPS) <= set(gpu_check.STEP_LIMITS)
    # every step fits the check's budget, which leaves a 600 s device command room for the wheels' install
    assert max(gpu_check.STEP_LIMITS.values()) <= gpu_check.BUDGET <= 600 - 30


def test_gpu_check_dry_run_of_the_tuning_step(tmp_path):
    """The dry run's smallest path: the measured tuning on this CPU in the interpreter, at 48×64×1000, through
    gpu_check itself; its tuned file lands under the output folder (never the package's), the bundle has the four
    files, and every line of the summary says it is a dry run."""
    from p2o_lightning.kernels import tuned_configs

    package_files = sorted(tuned_configs.tuned_dir().glob("*.json"))
    out, bundle = tmp_path / "out", tmp_path / "bundle"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--steps", "tune", "--out", str(out), "--bundle", str(bundle)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tuned = tuned_configs.load(out / "tuned" / "cpu-dry-run.json")
    assert tuned["measured"].startswith("dry run") and tuned["forward"] and tuned["backward"]
    assert {e["entropy"] for e in tuned["forward"]} == {False, True}
    assert sorted(tuned_configs.tuned_dir().glob("*.json")) == package_files
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check, DRY RUN") and "| tune | ok |" in md
    assert all(row["status"].startswith("dry run") for row in csv.DictReader((out / "gpu_check.csv").open()))
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["cpu-dry-run.json", "gpu_check.csv", "gpu_check.md", "gpu_check_cpu-dry-run.tar.gz"]


def test_bench_logprob_dry_run_runs_the_kernel_and_the_fused_head(tmp_path):
    """gpu_check's log-prob step on the CPU: our kernel and the fused head in the interpreter, realistic logits (their
    spread measured into the rows), the baselines skipped with the reason; rows say they measure nothing."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_logprob.py"), "--dry-run", "--device", "cpu",
           "--shapes", "32x32x300", "--impls", "triton", "fused-head", "cce-nofilter", "--modes", "fwd+bwd",
           "--logits", "realistic", "--skip-ceiling", "--min-run-time", "0.01", "--repeats", "1",
           "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["impl"]: r for r in csv.DictReader((tmp_path / "bench_logprob_cpu.csv").open())}
    assert rows["triton"]["status"] == rows["fused-head"]["status"] == "ok"
    assert rows["fused-head"]["ms_stat"].startswith("dry run")
    assert rows["cce-nofilter"]["status"].startswith("skipped")
    assert float(rows["triton"]["logit_max"]) > 8 and 2 < float(rows["triton"]["logit_std"]) < 6  # ~3 at H 4096
