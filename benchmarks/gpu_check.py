"""The one-call GPU check: the kernels' tests compiled for the GPU, measured tuning, the benchmarks, the rollout
engines and the FSDP1 clipping path on one CUDA device, into one folder with a CSV and a markdown summary.

    python benchmarks/gpu_check.py --all --bundle $OUT   # on a CUDA machine; ~8 min on an H100 / H200
    python benchmarks/gpu_check.py --dry-run             # the same steps on this CPU at tiny shapes, ~4 min

Steps, each a subprocess with its own time limit (the whole check stays within ``--budget`` seconds, 540 by
default; a step that would start with too little time left is skipped and says so), in this order:

1. ``baselines``: ``liger-kernel`` and ``cut-cross-entropy`` imported, else installed from wheels with pip
   (``--no-install``: skipped, with the reason in the summary).
2. ``tune``: ``tune_logprob.py``: every launch config of the log-prob kernels (cut-cross-entropy's tile among
   them) and every backward buffer bound timed at N ∈ {4096, 16384} × H 4096 × V 151,936 bf16, each checked
   against a float32 reference; the winners written to ``kernels/tuned/<device kind>.json``, which the launchers
   read first (copied into the bundle: commit it).
3. ``bench_logprob``: the log-prob op at the same shapes, logits of a real LM's spread (std 3, targets' logits
   10–25): materialised logits, our kernel (from the tuned file), the fused head (fwd+bwd), Liger-Kernel,
   cut-cross-entropy with its gradient filter (its default) and without; time and peak memory, forward and
   forward + backward.
4. ``rollout``: ``bench_rollout.py``: our decode loop against HF ``generate`` on the embedded world and on a random
   Qwen3-0.6B-shaped model in bf16: tokens/s and greedy ids equal.
5. ``fsdp1``: ``check_fsdp1_clip.py``: the FSDP1 clipping path on one GPU, wrapped against unwrapped, and
   the trainer under ``strategy: fsdp`` against ``auto``.
6. ``tests``: ``pytest tests/test_kernels.py`` and the fused head's op tests with ``TRITON_INTERPRET`` unset — the
   kernels compiled for this GPU against the float64 references.
7. ``train_grpo``: the trainer on this GPU with ``backend: triton`` and ``rollout_engine: loop``, 20 RL steps of
   ``configs/toy.yaml``: seconds per step (rollout, log-prob, update), validation accuracy. (``train_p2o``, 20 steps
   of ``configs/p2o-toy.yaml`` with the skill anchor, runs when named in ``--steps``.)

``--dry-run`` runs every step on the CPU at tiny shapes with ``TRITON_INTERPRET=1`` (the kernels in the
interpreter): the tuning at 48×64×1000 (its tuned file under the output folder, never the package's), the benchmark
at 64×64×1000, the rollout benchmark with a 2-layer model of the 0.6B's vocabulary, the FSDP1 check's unwrapped
half and its fit commands parsed (torch refuses FSDP1 without an accelerator), the candidate-config kernel tests,
2 training steps with ``backend: torch``. It proves the commands before a GPU is spent on them and measures nothing;
its summary says so on every line.

Writes ``<out>/gpu_check.csv`` (one row per step: status, seconds, what it measured) and ``<out>/gpu_check.md``
(device, driver, versions, commit, date, the test counts and each step's table), plus each step's own files;
``--out`` defaults to ``benchmarks/results/gpu_check/<device kind>`` (dry run: a temporary folder). ``--bundle DIR``
also writes the markdown, the CSV, the tuned file and a ``.tar.gz`` of the whole folder into DIR: four files, what a
machine that returns only a few files can send back. ``--commit SHA`` names the commit where the copy of the
repository the machine runs has no reliable git history. Without CUDA (and without ``--dry-run``) it refuses (exit
code 2) before doing anything: the numbers it writes are measurements of a GPU, never of anything else.
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
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check"
BASELINES = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}  # module → wheel
# seconds: the longest each step may take on the GPU (the check's budget is shared; see main). Measured on an H200
# (2026-12-04): the kernel tests 149 s, bench_loss 13 s, 40 GRPO steps 38 s; the rest are estimates, never run:
# tune ~16 forward and 7 backward compiles of ~3 s plus their timing, bench_logprob 14 cases without the chunked
# torch reference (its 500 ms calls took most of the earlier 115 s), rollout 2 models × 2 engines, fsdp1 two fits.
# Their sum exceeds BUDGET: the steps come in the order of what matters most, and the last ones get what is left
STEP_LIMITS = {"baselines": 15, "tune": 200, "bench_logprob": 120, "rollout": 90, "fsdp1": 100, "tests": 200,
               "train_grpo": 45, "train_p2o": 60, "bench_loss": 30}  # fmt: skip
BUDGET = 540  # seconds for the whole check: with the wheels' install (~20 s) inside a 600 s device command
DEFAULT_STEPS = ["baselines", "tune", "bench_logprob", "rollout", "fsdp1", "tests", "train_grpo"]
TRAIN_STEPS = 20  # RL steps of each training run
GPU_SHAPES = ["4096x4096x151936", "16384x4096x151936"]
LOGPROB_IMPLS = ["materialised", "triton", "fused-head", "liger", "cce", "cce-nofilter"]
# the kernels against their float64 oracles on the device: every kernel test, and the fused head's op tests (its
# trainer tests build a CPU module)
KERNEL_TESTS = ["tests/test_kernels.py",
                "tests/test_fused_head.py::test_fused_head_equals_autograd_of_the_unfused_loss",
                "tests/test_fused_head.py::test_fused_head_float64_and_bfloat16_inputs"]  # fmt: skip
DRY_RUN_TESTS = ["tests/test_kernels.py", "-k", "tuning_space"]  # the candidate configs, in the interpreter
TABLES = {  # the columns of each step's table in gpu_check.md
    "tune": ["kernel", "N", "entropy", "config", "logits_budget", "status", "ms", "error"],
    "bench_logprob": ["N", "H", "V", "mode", "impl", "status", "ms", "tflops", "peak_mb", "logit_std", "logit_max",
                      "p_max"],
    "rollout": ["model", "dtype", "engine", "rows", "tokens", "s", "tokens_per_s", "greedy_rows_equal", "note"],
}  # fmt: skip
DRY_RUN_NOTE = "DRY RUN on a CPU (TRITON_INTERPRET=1, tiny shapes): nothing here is a measurement"


class NoCuda(SystemExit):
    """Raised (exit code 2) when there is no CUDA device: this check measures GPUs only."""

    def __init__(self, why: str) -> None:
        print(f"gpu_check: {why}; this check runs the kernels and benchmarks on an NVIDIA GPU and measures nothing "
              "else. Run it on a CUDA machine (a rehearsal on this CPU: --dry-run)", file=sys.stderr)  # fmt: skip
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
    ).stdout.strip() if shutil.which("nvidia-smi") else "unknown"  # fmt: skip
    return {
        "device": props.name,
        "device_kind": "cuda-" + re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-"),
        "capability": f"sm_{props.major}{props.minor}",
        "memory_gb": round(props.total_memory / 1e9, 1),
        "driver": driver or "unknown",
        "cuda": torch.version.cuda or "unknown",
    }


def cpu_description() -> dict:
    return {"device": f"CPU ({os.cpu_count()} cores), dry run", "device_kind": "cpu-dry-run", "capability": "-",
            "memory_gb": "-", "driver": "-", "cuda": "-"}  # fmt: skip


def versions() -> dict:
    out = {}
    for dist in ("torch", "triton", "transformers", "lightning", "liger-kernel", "cut-cross-entropy"):
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
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                         for x in (err.stdout, err.stderr))  # fmt: skip
    log.write_text(f"$ {' '.join(cmd)}\n{output}")
    return {"step": name, "status": status, "seconds": round(time.perf_counter() - start, 1), "log": log.name,
            "output": output}  # fmt: skip


def ensure_baselines(install: bool, limit: float) -> dict[str, str]:
    """module → "present <version>" / "skipped: <why>"; installs missing wheels with pip when ``install``."""
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
            out[module] = "skipped: not installed, none installed here" if not install else "skipped: does not import"
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
        cfg["model"]["loss"]["anchor_weight"] = 1.0
        cfg["model"]["optimizer"]["init_args"]["lr"] = 6e-5
        config = out / "p2o-gpu-check.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    steps = 2 if dry_run else TRAIN_STEPS
    return [
        sys.executable, "-m", "p2o_lightning", "fit", "--config", str(config),
        "--trainer.accelerator", "cpu" if dry_run else "gpu", "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps), "--model.compute.backend", "torch" if dry_run else "triton",
        "--model.rollout.engine", "loop",  # our decode loop (the default, named so the check says what it ran)
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


def step_command(name: str, out: Path, dry_run: bool) -> list[str]:
    """The command of step ``name`` (not ``baselines``, which runs in this process), on the GPU or in a dry run."""
    py = sys.executable
    if name == "tune":
        return [py, "benchmarks/tune_logprob.py", "--out", str(out)] + (["--dry-run"] if dry_run else [])
    if name == "bench_logprob":
        shapes = ["64x64x1000"] if dry_run else GPU_SHAPES
        cmd = [py, "benchmarks/bench_logprob.py", "--shapes", *shapes, "--impls", *LOGPROB_IMPLS, "--logits",
               "realistic", "--out", str(out)]  # fmt: skip
        return cmd + (["--dry-run", "--device", "cpu", "--skip-ceiling", "--min-run-time", "0.01", "--repeats", "1"]
                      if dry_run else [])  # fmt: skip
    if name == "rollout":
        if dry_run:
            return [
                py,
                "benchmarks/bench_rollout.py",
                "--model",
                "embedded",
                "qwen3-0.6b",
                "--out",
                str(out),
                "--dry-run",
            ]
        return [py, "benchmarks/bench_rollout.py", "--model", "embedded", "qwen3-0.6b", "--device", "cuda", "--dtype",
                "bfloat16", "--prompts", "32", "--k", "8", "--new-tokens", "64", "--rounds", "2", "--out", str(out),
                "--sampling-repeats", "2"]  # fmt: skip
    if name == "fsdp1":
        return [py, "benchmarks/check_fsdp1_clip.py", "--out", str(out / "fsdp1")] + (["--dry-run"] if dry_run else [])
    if name == "tests":
        tests = DRY_RUN_TESTS if dry_run else KERNEL_TESTS
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}", *tests]
    if name == "bench_loss":
        return [py, "benchmarks/bench_loss.py", "--out", str(out)] + (["--help"] if dry_run else [])
    return train_command(name, out, dry_run)


def measured(name: str, out: Path, kind: str) -> str:
    """One line of what step ``name`` measured, from the files it wrote."""
    if name == "tests":
        return ", ".join(f"{k} {v}" for k, v in pytest_counts(out / "tests.xml").items())
    if name == "tune":
        tuned = out / "tuned" / f"{kind}.json" if kind == "cpu-dry-run" else tuned_path(kind)
        rows = read_rows(out / f"tune_logprob_{kind}.csv")
        bad = sum(r["status"] != "ok" for r in rows)
        return f"{len(rows)} configs timed ({bad} not ok); tuned file {'written' if tuned.exists() else 'MISSING'}"
    if name in ("bench_logprob", "rollout", "bench_loss"):
        csv_name = {"rollout": "bench_rollout"}.get(name, name)
        csv_kind = kind.replace("-dry-run", "")
        return f"{len(read_rows(out / f'{csv_name}_{csv_kind}.csv'))} rows"
    if name == "fsdp1":
        path = out / "fsdp1" / "check_fsdp1_clip.json"
        return "; ".join(f"{r['check']}: {r['status']}" for r in json.loads(path.read_text())) if path.exists() else ""
    return train_summary(out / "runs" / name)


def tuned_path(kind: str) -> Path:
    from p2o_lightning.kernels import tuned_configs

    return tuned_configs.path_for(kind)


def report(out: Path, meta: dict, steps: list[dict], baselines: dict, dry_run: bool, total: float, budget: float):
    """gpu_check.csv and gpu_check.md in ``out``."""
    kind = meta["device_kind"]
    with (out / "gpu_check.csv").open("w", newline="") as f:
        columns = ["date", "commit", "device", "capability", "driver", "cuda", "torch_version", "triton_version",
                   "transformers_version", "liger-kernel_version", "cut-cross-entropy_version", "step", "status",
                   "seconds", "measured"]  # fmt: skip
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for step in steps:
            writer.writerow({**meta, **step, "status": ("dry run: " if dry_run else "") + step["status"]})
    csv_kind = "cpu" if dry_run else kind
    logprob = read_rows(out / f"bench_logprob_{csv_kind}.csv")
    tune = read_rows(out / f"tune_logprob_{kind}.csv")
    rollout = read_rows(out / f"bench_rollout_{csv_kind}.csv")
    title = f"# GPU check: {meta['device']} ({meta['capability']}, {meta['memory_gb']} GB)"
    md = [
        title if not dry_run else f"# GPU check, {DRY_RUN_NOTE}",
        "",
        f"{meta['date']}, commit {meta['commit']}, driver {meta['driver']}, CUDA {meta['cuda']}, "
        + ", ".join(f"{k} {meta[k + '_version']}" for k in versions())
        + (f". {'Ran' if dry_run else 'Measured on this GPU'} in {total} s (budget {budget:.0f} s)."),
        "",
        markdown_table(steps, ["step", "status", "seconds", "measured"]),
        "",
        "Baselines: " + ("; ".join(f"{k}: {v}" for k, v in baselines.items()) or "not checked"),
        "",
        "## Measured tuning (tune_logprob.py): every config, ms (median), error against float32",
        "",
        markdown_table(tune, TABLES["tune"]),
        "",
        "## Log-prob (bench_logprob.py, realistic logits)",
        "",
        markdown_table(logprob, TABLES["bench_logprob"]),
        "",
        "## Rollouts (bench_rollout.py)",
        "",
        markdown_table(rollout, TABLES["rollout"]),
        "",
    ]
    (out / "gpu_check.md").write_text("\n".join(md))


def bundle(out: Path, dest: Path, kind: str, dry_run: bool) -> list[Path]:
    """gpu_check.md, gpu_check.csv, the tuned file and ``gpu_check_<kind>.tar.gz`` of ``out``, into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [out / "gpu_check.md", out / "gpu_check.csv"]
    tuned = out / "tuned" / f"{kind}.json" if dry_run else tuned_path(kind)
    files += [tuned] if tuned.exists() else []
    written = [Path(shutil.copy(f, dest / f.name)) for f in files]
    archive = dest / f"gpu_check_{kind}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname=f"gpu_check_{kind}")
    return written + [archive]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/gpu_check/<device kind>")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole check")
    parser.add_argument("--no-install", action="store_true", help="skip missing baselines instead of installing them")
    parser.add_argument("--all", action="store_true", help=f"every default step: {' '.join(DEFAULT_STEPS)}")
    parser.add_argument("--steps", nargs="+", choices=list(STEP_LIMITS), default=None, help="default: --all's")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on this CPU, tiny; measures nothing")
    parser.add_argument("--bundle", type=Path, default=None, help="copy summary, tuned file, tarball here")
    parser.add_argument("--commit", default=None, help="the commit that runs (default: git rev-parse here)")
    args = parser.parse_args()
    names = args.steps or DEFAULT_STEPS

    device = cpu_description() if args.dry_run else require_cuda()  # before anything else: no GPU, no numbers
    start = time.perf_counter()
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if args.dry_run
                       else RESULTS / device["device_kind"])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    if args.commit:
        env["P2O_COMMIT"] = args.commit  # the benchmarks' rows and the tuned file name it (benchmarks/common.py)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": args.commit or commit(), **device,
            **{f"{k}_version": v for k, v in versions().items()}}  # fmt: skip
    print(json.dumps(meta), flush=True)

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    steps, baselines = [], {}
    for name in names:
        limit = min(STEP_LIMITS[name], left()) if not args.dry_run else 600
        if limit < 20:
            steps.append({"step": name, "status": f"skipped: {left():.0f} s left of the {args.budget:.0f} s budget",
                          "seconds": 0})  # fmt: skip
            continue
        if name == "baselines":
            t0 = time.perf_counter()
            baselines = ensure_baselines(not (args.no_install or args.dry_run), limit)
            step = {"step": name, "status": "ok", "seconds": round(time.perf_counter() - t0, 1),
                    "measured": "; ".join(f"{k}: {v}" for k, v in baselines.items())}  # fmt: skip
        else:
            step = run_step(name, step_command(name, out, args.dry_run), limit, out, env)
            step["measured"] = measured(name, out, device["device_kind"])
            if step["status"] != "ok":
                print(step["output"][-3000:], flush=True)
        step.pop("output", None)
        steps.append(step)
        print(f"{step['step']}: {step['status']} ({step['seconds']} s) {step.get('measured', '')}", flush=True)

    total = round(time.perf_counter() - start, 1)
    report(out, meta, steps, baselines, args.dry_run, total, args.budget)
    print(f"wrote {out / 'gpu_check.csv'} and {out / 'gpu_check.md'} ({total} s)")
    if args.bundle:
        print("bundled: " + ", ".join(str(p) for p in bundle(out, args.bundle, device["device_kind"], args.dry_run)))
    failed = [s["step"] for s in steps if s["status"] != "ok" and not s["status"].startswith("skipped")]
    tests = pytest_counts(out / "tests.xml") if "tests" in names else {}
    print(json.dumps({"bench": "gpu_check", **meta, "dry_run": args.dry_run, "seconds": total, "tests": tests,
                      "failed_steps": failed, "out": str(out)}))  # fmt: skip
    sys.exit(1 if failed or tests.get("failed") or tests.get("errors") else 0)


if __name__ == "__main__":
    main()
