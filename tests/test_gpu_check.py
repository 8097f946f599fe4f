"""benchmarks/gpu_check.py without a GPU: it refuses clearly, before measuring or writing anything; its pieces work.

The check itself needs CUDA (it measures GPUs only); what a CPU can test is that it says so, names why and writes
no file, and that the parts that do not touch a GPU (the junit counts, the markdown table) do what they say.
"""

from __future__ import annotations

import importlib.util
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
    assert "tests" in proc.stdout and "bench_logprob" in proc.stdout and "--no-install" in proc.stdout


def test_gpu_check_reads_junit_counts_and_writes_tables(tmp_path):
    gpu_check = load_gpu_check()
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuites><testsuite tests="7" failures="1" errors="0" skipped="2"></testsuite></testsuites>')
    assert gpu_check.pytest_counts(junit) == {"passed": 4, "failed": 1, "errors": 0, "skipped": 2}
    assert gpu_check.pytest_counts(tmp_path / "absent.xml")["passed"] == 0
    table = gpu_check.markdown_table([{"a": 1, "b": "x"}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |"]
    assert set(gpu_check.STEP_LIMITS) == {
        "tests",
        "baselines",
        "bench_logprob",
        "bench_loss",
        "train_grpo",
        "train_p2o",
    }
    assert sum(gpu_check.STEP_LIMITS.values()) <= 8 * 60  # the steps fit the 8 minutes
