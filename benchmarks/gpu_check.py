"""The one-call GPU check: kernel tests on the GPU, then the benchmarks against torch, torch.compile, Liger-Kernel
and cut-cross-entropy, into one folder with a CSV and a markdown summary.

    python benchmarks/gpu_check.py                       # on a CUDA machine; ~5–8 min on an H100 / H200
    python benchmarks/gpu_check.py --no-install          # do not pip-install missing baselines (skip them)

Steps, each a subprocess with its own time limit (the whole check stays within ``--budget`` seconds, 480 by
default; a step that would start with too little time left is skipped and says so):

1. ``tests``: ``pytest tests/test_kernels.py`` and the fused head's op tests with ``TRITON_INTERPRET`` unset — the
   kernels compiled for this GPU (not the interpreter) against the float64 references, the fused training step
   included.
2. ``baselines``: ``liger-kernel`` and ``cut-cross-entropy`` imported, else installed from wheels with pip
   (``--no-install``: skipped, with the reason in the summary).
3. ``bench_logprob``: the log-prob op on the GPU grid (N ∈ {4096, 16384}, H 4096, V 151,936, bf16): the chunked
   reference, ``torch.compile`` of it, materialised logits, our Triton kernel (autotuned on first use),
   Liger-Kernel's fused linear cross-entropy and cut-cross-entropy; time and peak memory, forward and forward +
   backward.
4. ``bench_loss``: group advantage and the PPO-clip + KL + ratio-mask loss, Triton vs the torch reference, GB/s.
5. ``train_grpo`` / ``train_p2o``: the real trainer on this GPU with ``backend: triton`` — 40 RL steps of
   ``configs/toy.yaml`` (GRPO on the embedded world), then 40 of ``configs/p2o-toy.yaml`` with the skill anchor (its
   search at the end of the first epoch, with a smaller budget so that it fits), rollouts from our own decode loop
   (``rollout_engine: loop``): steps done, seconds per step (rollout, log-prob, update), validation accuracy before
   and after, from each run's ``metrics.csv``.

``--dry-run`` runs on a CPU what can run there, to prove the command lines before a GPU is spent on them: the tests
collected (not run), the benchmarks' ``--help``, and each training run for 2 steps on CPU with ``backend: torch``;
it writes into a temporary folder and reports no measurement.

Writes ``<out>/gpu_check.csv`` (one row per step: status, seconds, what it measured) and ``<out>/gpu_check.md``
(device, driver, versions, commit, date, the test counts and the benchmark tables), plus each benchmark's own CSV
and PNG; ``--out`` defaults to ``benchmarks/results/gpu_check/<device kind>``. Without CUDA it refuses (exit code 2)
before doing anything: the numbers it writes are measurements of a GPU, never of anything else.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check"
BASELINES = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}  # module → wheel
# seconds: the longest each step may take (the check's budget is shared; see plan_steps)
# measured on an H200 (2026-12-04): tests 149 s, bench_loss 13 s, GRPO 38 s, P²O 46 s; bench_logprob's 2 shapes
# without the compiled case at 16384 rows ≈ 115 s (4096) + 100 s (16384)
STEP_LIMITS = {"tests": 170, "baselines": 15, "bench_logprob": 150, "bench_loss": 30, "train_grpo": 50,
               "train_p2o": 60}  # fmt: skip
TRAIN_STEPS = 40  # RL steps of each training run
# the kernels against their float64 oracles on the device: every kernel test, and the fused head's op tests (its
# trainer tests build a CPU module)
KERNEL_TESTS = ["tests/test_kernels.py",
                "tests/test_fused_head.py::test_fused_head_equals_autograd_of_the_unfused_loss",
                "tests/test_fused_head.py::test_fused_head_float64_and_bfloat16_inputs"]  # fmt: skip


class NoCuda(SystemExit):
    """Raised (exit code 2) when there is no CUDA device: this check measures GPUs only."""

    def __init__(self, why: str) -> None:
        print(f"gpu_check: {why}; this check runs the kernels and benchmarks on an NVIDIA GPU and measures nothing "
              "else. Run it on a CUDA machine (tests on CPU: python -m pytest; CPU benchmarks: benchmarks/bench_*.py)",
              file=sys.stderr)  # fmt: skip
        super().__init__(2)


def require_cuda() -> dict:
    """The device's description, or NoCuda naming why there is none."""
    try:
        import torch
    except ImportError as err:
        raise NoCuda(f"torch does not import ({err})") from err
    if not torch.cuda.is_available():
        raise NoCuda(f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)")
    props = torch.cuda.get_device_properties(0)
    driver = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip() if shutil_which("nvidia-smi") else "unknown"  # fmt: skip
    return {
        "device": props.name,
        "device_kind": "cuda-" + re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-"),
        "capability": f"sm_{props.major}{props.minor}",
        "memory_gb": round(props.total_memory / 1e9, 1),
        "driver": driver or "unknown",
        "cuda": torch.version.cuda or "unknown",
    }


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def versions() -> dict:
    out = {}
    for dist in ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return (sha.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def run_step(name: str, cmd: list[str], limit: float, log_dir: Path, env: dict | None = None) -> dict:
    """Run one step's command with a time limit; its output goes to <log_dir>/<name>.log."""
    start = time.perf_counter()
    log = log_dir / f"{name}.log"
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        status = f"timed out after {limit:.0f} s"
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
    log.write_text(output)
    return {"step": name, "status": status, "seconds": round(time.perf_counter() - start, 1), "log": log.name,
            "output": output}  # fmt: skip


def ensure_baselines(install: bool, limit: float) -> dict[str, str]:
    """module → "installed <version>" / "skipped: <why>"; installs missing wheels with pip when ``install``."""
    out = {}
    for module, wheel in BASELINES.items():
        if importlib.util.find_spec(module) is None and install:
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", wheel]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            if proc.returncode != 0:
                out[module] = f"skipped: pip install {wheel} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
                continue
            importlib.invalidate_caches()
        if importlib.util.find_spec(module) is None:
            out[module] = "skipped: not installed (--no-install)" if not install else "skipped: does not import"
        else:
            out[module] = f"present {importlib.metadata.version(wheel)}"
    return out


def pytest_counts(junit: Path) -> dict:
    """passed / failed / errors / skipped of a junit XML report (zeros when pytest wrote none)."""
    if not junit.exists():
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0))
    errors, skipped = int(suite.get("errors", 0)), int(suite.get("skipped", 0))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped}


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "(no rows)"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def train_command(name: str, out: Path, dry_run: bool) -> list[str]:
    """``python -m p2o_lightning fit`` of the embedded world, its run folder under ``<out>/runs/<name>``.

    ``train_p2o`` is ``configs/p2o-toy.yaml`` with the skill anchor at lr 6e-5 (the setting that beat GRPO,
    docs/experiments.md) and a search budget of 300 greedy evaluations, written to ``<out>/p2o-gpu-check.yaml``.
    """
    config = REPO / "configs" / ("toy.yaml" if name == "train_grpo" else "p2o-toy.yaml")
    if name == "train_p2o":
        import yaml

        cfg = yaml.safe_load(config.read_text())
        for callback in cfg["trainer"]["callbacks"]:
            if callback["class_path"].endswith("P2OCallback"):
                callback["init_args"]["search"]["max_metric_calls"] = 300
        cfg["model"]["anchor_weight"] = 1.0
        cfg["model"]["optimizer"]["init_args"]["lr"] = 6e-5
        config = out / "p2o-gpu-check.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    steps = 2 if dry_run else TRAIN_STEPS
    return [
        sys.executable, "-m", "p2o_lightning", "fit", "--config", str(config),
        "--trainer.accelerator", "cpu" if dry_run else "gpu", "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps), "--model.backend", "torch" if dry_run else "triton",
        "--model.rollout_engine", "loop",  # our decode loop (the default, named so the check says what it ran)
        "--trainer.default_root_dir", str(out / "runs" / name), "--trainer.logger.init_args.save_dir",
        str(out / "runs"), "--trainer.logger.init_args.name", name,
    ]  # fmt: skip


def train_summary(run: Path) -> str:
    """Steps, median seconds per phase and validation accuracy first → last, from a run's ``metrics.csv``."""
    rows = read_rows(run / "metrics.csv")
    if not rows:
        return "no metrics.csv"

    def column(name: str) -> list[float]:
        return [float(r[name]) for r in rows if r.get(name) not in (None, "")]

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2] if values else float("nan")

    parts = [f"{len(column('train/loss'))} steps"]
    parts += [f"{phase} {median(column(f'time/{phase}_s')):.3f} s" for phase in ("rollout", "logprob", "update")]
    for split in ("in_dist", "hard"):
        acc = column(f"val/{split}/greedy_acc")
        if acc:
            parts.append(f"val/{split}/greedy_acc {acc[0]:.3f} -> {acc[-1]:.3f}")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/gpu_check/<device kind>")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check")
    parser.add_argument("--no-install", action="store_true", help="skip missing baselines instead of installing them")
    parser.add_argument("--steps", nargs="+", choices=list(STEP_LIMITS), default=list(STEP_LIMITS))
    parser.add_argument("--dry-run", action="store_true", help="prove the command lines on a CPU; measures nothing")
    args = parser.parse_args()

    if args.dry_run:
        dry_run(args.steps)
        return
    device = require_cuda()  # before anything else: no GPU, no numbers
    start = time.perf_counter()
    out = args.out or RESULTS / device["device_kind"]
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
            **device, **{f"{k}_version": v for k, v in versions().items()}}  # fmt: skip
    print(json.dumps(meta))

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    steps, baselines, tests = [], {}, {}
    for name in args.steps:
        limit = min(STEP_LIMITS[name], left())
        if limit < 20:
            steps.append({"step": name, "status": f"skipped: {left():.0f} s left of the {args.budget:.0f} s budget",
                          "seconds": 0})  # fmt: skip
            continue
        if name == "tests":
            junit = out / "tests.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                   *KERNEL_TESTS]  # fmt: skip
            step = run_step(name, cmd, limit, out, env)
            tests = pytest_counts(junit)
            step["measured"] = ", ".join(f"{k} {v}" for k, v in tests.items())
        elif name == "baselines":
            t0 = time.perf_counter()
            baselines = ensure_baselines(not args.no_install, limit)
            step = {"step": name, "status": "ok", "seconds": round(time.perf_counter() - t0, 1),
                    "measured": "; ".join(f"{k}: {v}" for k, v in baselines.items())}  # fmt: skip
        elif name == "bench_logprob":
            cmd = [sys.executable, "benchmarks/bench_logprob.py", "--out", str(out)]
            step = run_step(name, cmd, limit, out, env)
            step["measured"] = f"{len(read_rows(out / ('bench_logprob_' + device['device_kind'] + '.csv')))} rows"
        elif name == "bench_loss":
            cmd = [sys.executable, "benchmarks/bench_loss.py", "--out", str(out)]
            step = run_step(name, cmd, limit, out, env)
            step["measured"] = f"{len(read_rows(out / ('bench_loss_' + device['device_kind'] + '.csv')))} rows"
        else:
            step = run_step(name, train_command(name, out, dry_run=False), limit, out, env)
            step["measured"] = train_summary(out / "runs" / name)
        step.pop("output", None)
        steps.append(step)
        print(f"{step['step']}: {step['status']} ({step['seconds']} s) {step.get('measured', '')}", flush=True)

    total = round(time.perf_counter() - start, 1)
    with (out / "gpu_check.csv").open("w", newline="") as f:
        columns = ["date", "commit", "device", "capability", "driver", "cuda", "torch_version", "triton_version",
                   "liger-kernel_version", "cut-cross-entropy_version", "step", "status", "seconds",
                   "measured"]  # fmt: skip
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for step in steps:
            writer.writerow({**meta, **step})

    logprob = [r for r in read_rows(out / f"bench_logprob_{device['device_kind']}.csv") if r.get("commit")]
    loss = read_rows(out / f"bench_loss_{device['device_kind']}.csv")
    md = [
        f"# GPU check: {device['device']} ({device['capability']}, {device['memory_gb']} GB)",
        "",
        f"{meta['date']}, commit {meta['commit']}, driver {device['driver']}, CUDA {device['cuda']}, "
        + ", ".join(f"{k} {v}" for k, v in versions().items())
        + f". Measured on this GPU in {total} s (budget {args.budget:.0f} s).",
        "",
        markdown_table(steps, ["step", "status", "seconds", "measured"]),
        "",
        "Baselines: " + ("; ".join(f"{k}: {v}" for k, v in baselines.items()) or "not checked"),
        "",
        "## Log-prob (bench_logprob.py)",
        "",
        markdown_table(logprob, ["N", "H", "V", "mode", "impl", "status", "ms", "tflops", "peak_mb"]),
        "",
        "## Loss (bench_loss.py)",
        "",
        markdown_table(loss, ["op", "config", "B", "T", "mode", "impl", "status", "ms", "gbs", "pct_of_copy"]),
        "",
    ]
    (out / "gpu_check.md").write_text("\n".join(md))
    print(f"wrote {out / 'gpu_check.csv'} and {out / 'gpu_check.md'} ({total} s)")
    failed = [s["step"] for s in steps if s["status"] not in ("ok",) and not s["status"].startswith("skipped")]
    print(json.dumps({"bench": "gpu_check", **meta, "seconds": total, "tests": tests, "failed_steps": failed}))
    sys.exit(1 if failed or tests.get("failed") or tests.get("errors") else 0)


def dry_run(names: list[str]) -> None:
    """Each step's command on this CPU, cut to what proves it (see the module docstring); exits 1 if one fails."""
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="gpu_check_dry_"))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    commands = {
        "tests": [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                  *KERNEL_TESTS],
        "bench_logprob": [sys.executable, "benchmarks/bench_logprob.py", "--help"],
        "bench_loss": [sys.executable, "benchmarks/bench_loss.py", "--help"],
    }  # fmt: skip
    failed = []
    for name in names:
        if name == "baselines":
            print(f"{name}: would import or install {', '.join(BASELINES.values())}")
            continue
        cmd = commands.get(name) or train_command(name, out, dry_run=True)
        step = run_step(name, cmd, 600, out, env)
        summary = train_summary(out / "runs" / name) if name.startswith("train") else ""
        print(f"{name}: {step['status']} ({step['seconds']} s) {summary}\n  $ {' '.join(cmd)}", flush=True)
        if step["status"] != "ok":
            print(step["output"][-3000:])
            failed.append(name)
    print(f"dry run (CPU, nothing measured): {len(names) - len(failed)} of {len(names)} steps ok; logs in {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
