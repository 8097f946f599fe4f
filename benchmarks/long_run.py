"""Long runs stay flat (issue 27 point 4): a fit of thousands of RL steps on the embedded world, watched from outside.

``run`` starts ``python -m p2o_lightning fit`` for one arm (GRPO: ``configs/toy.yaml``; P²O: ``configs/p2o-toy.yaml``)
in a subprocess at one torch thread, and samples it every ``--interval`` seconds until it exits: the training
process's resident memory (``VmRSS`` from ``/proc/PID/status``), its CPU time (``utime + stime`` from
``/proc/PID/stat``), the machine's load, the step it has reached (the last row of its ``metrics.csv``) and the run
folder's size by part (metrics, checkpoints, P²O search records, policy, the rest). ``report`` reads those samples and
the run's own per-step metrics (generated tokens = ``time/rollout_tokens_per_s × time/rollout_s``, the engine's
count of response tokens; CPU time = ``time/*_cpu_s`` and ``time/run_cpu_s``, process clocks) and writes a summary
table and one plot per arm: RSS, CPU seconds per generated token and folder size against the step.

CPU time, not wall time, is what "time per token" means here: the machine is shared, and at one thread a process's CPU
time is what its wall time would be on a core of its own. Wall time per token is reported too, marked as such.

    python benchmarks/long_run.py run --arm grpo --steps 3000 --work runs/long_run
    python benchmarks/long_run.py run --arm p2o --steps 1000 --work runs/long_run
    python benchmarks/long_run.py report --work runs/long_run --out benchmarks/results/long_run

A run stopped part-way resumes with the same ``run`` command plus ``--resume`` (``--ckpt_path last``; the samples
are appended).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = {"grpo": "configs/toy.yaml", "p2o": "configs/p2o-toy.yaml"}
PARTS = ("metrics", "checkpoints", "p2o", "policy", "other")  # the run folder, by what writes it
SAMPLE_COLUMNS = ["t_s", "step", "rss_mb", "hwm_mb", "cpu_s", "load1", *(f"bytes_{p}" for p in PARTS),
                  "files_checkpoints", "files_p2o"]  # fmt: skip
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------- sampling
def proc_memory(pid: int) -> tuple[float, float]:
    """``VmRSS`` and ``VmHWM`` (its peak) of process ``pid``, MB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces: fields after its ")"
    return (int(rest[11]) + int(rest[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def folder_parts(folder: Path) -> dict[str, int]:
    """The bytes under ``folder`` by part (:data:`PARTS`), and the number of files of the checkpoint and P²O parts."""
    out = {f"bytes_{p}": 0 for p in PARTS} | {"files_checkpoints": 0, "files_p2o": 0}
    if not folder.is_dir():
        return out
    for entry in folder.iterdir():
        part = {"metrics.csv": "metrics", "checkpoints": "checkpoints", "p2o": "p2o", "policy": "policy"}
        part = part.get(entry.name, "other")
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        for path in files:
            try:
                out[f"bytes_{part}"] += path.stat().st_size
            except FileNotFoundError:  # replaced between the listing and the stat (an atomic rewrite)
                continue
            if part in ("checkpoints", "p2o"):
                out[f"files_{part}"] += 1
    return out


def last_step(metrics: Path) -> int | None:
    """The step of the last complete row of ``metrics`` (read from its end), or None before the first row."""
    try:
        with open(metrics, "rb") as f:
            header = f.readline().decode().rstrip("\r\n").split(",")
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 65536))
            tail = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    lines = [line for line in tail.split("\n")[:-1] if line]  # the text after the last newline may be a partial row
    if len(lines) < 2 or "step" not in header:
        return None
    row = next(csv.reader([lines[-1]]))
    try:
        return int(float(row[header.index("step")]))
    except (ValueError, IndexError):
        return None


def write_meta(arm_dir: Path, meta: dict, resume: bool) -> None:
    with open(arm_dir / ("meta.json" if not resume else "meta-resume.json"), "w") as f:
        json.dump(meta, f, indent=1)


def run_arm(args: argparse.Namespace) -> int:
    """Fit one arm in a subprocess and sample it until it exits; returns its exit status."""
    arm_dir = Path(args.work).resolve() / args.arm
    arm_dir.mkdir(parents=True, exist_ok=True)
    folder = arm_dir / "run"
    command = [
        sys.executable, "-m", "p2o_lightning", "fit", "--config", ARMS[args.arm],
        "--trainer.max_steps", str(args.steps),
        "--trainer.default_root_dir", str(folder),
        "--trainer.logger.init_args.save_dir", str(arm_dir), "--trainer.logger.init_args.name", "run",
        *args.extra,
    ]  # fmt: skip
    if args.resume:
        command += ["--ckpt_path", "last"]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {
        "arm": args.arm, "config": ARMS[args.arm], "steps": args.steps, "threads": args.threads, "commit": commit,
        "command": command, "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "resume": args.resume,
    }  # fmt: skip
    samples_path = arm_dir / "samples.csv"
    new_file = not samples_path.exists() or not args.resume
    write_meta(arm_dir, meta, args.resume)  # rewritten with the end and exit status when the fit exits
    log = open(arm_dir / ("fit.log" if not args.resume else "fit-resume.log"), "w")
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    with open(samples_path, "w" if new_file else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SAMPLE_COLUMNS)
        if new_file:
            writer.writeheader()
        while True:
            done = proc.poll() is not None
            try:
                rss, hwm = proc_memory(proc.pid)
                cpu = proc_cpu_s(proc.pid)
            except (FileNotFoundError, KeyError, ProcessLookupError):  # exited (a zombie has no VmRSS)
                rss = hwm = cpu = float("nan")
            step = last_step(folder / "metrics.csv")
            row = {"t_s": round(time.monotonic() - start, 2), "step": "" if step is None else step,
                   "rss_mb": round(rss, 1), "hwm_mb": round(hwm, 1), "cpu_s": round(cpu, 2),
                   "load1": os.getloadavg()[0], **folder_parts(folder)}  # fmt: skip
            writer.writerow(row)
            f.flush()
            if done:
                break
            time.sleep(args.interval)
    meta |= {"end": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rc": proc.returncode}
    write_meta(arm_dir, meta, args.resume)
    print(f"{args.arm}: exit {proc.returncode} after {time.monotonic() - start:.0f} s; samples in {samples_path}")
    return proc.returncode


# ---------------------------------------------------------------------------------------------------- probe
def probe_unit(reps: int = 1000) -> float:
    """CPU seconds of a fixed piece of work like a step of the embedded world's model (small matmuls, a softmax,
    Python between them) at one thread: on a shared machine the CPU time of the same work grows with the load
    (caches and cores shared with other processes), and this says by how much.
    """
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(128, 128, generator=gen), torch.randn(128, 384, generator=gen)
    start = time.thread_time()
    for _ in range(reps):
        h = torch.softmax(x @ w, dim=-1)[:, :128]
        x = torch.tanh(h @ w[:, :128].T @ w[:, :128]) + 0.0 * x
    return time.thread_time() - start


def probe(args: argparse.Namespace) -> None:
    """Write ``utc, load1, probe_cpu_s`` every ``--interval`` s until ``--until`` exists (or ``--count`` rows)."""
    path = Path(args.out)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["utc", "load1", "probe_cpu_s"])
        n = 0
        while not (args.until and Path(args.until).exists()) and (args.count is None or n < args.count):
            cpu = probe_unit()
            writer.writerow([datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             os.getloadavg()[0], f"{cpu:.5f}"])  # fmt: skip
            f.flush()
            n += 1
            time.sleep(args.interval)


# ---------------------------------------------------------------------------------------------------- report
def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(row: dict[str, str], key: str) -> float:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else 0.0


def step_rows(metrics: Path) -> list[dict[str, float]]:
    """One row per RL step from the run's ``metrics.csv``: generated tokens, the step's CPU and wall seconds (its
    timed stages), the process clocks ``time/run_cpu_s`` / ``time/run_wall_s`` and their increase since the previous
    step (everything the process did in between: validation, searches, checkpoints), the mean response length.
    """
    out = []
    for row in read_csv(metrics):
        if row.get("time/rollout_s", "") == "":  # a validation or epoch-end row
            continue
        stages = ("rollout", "logprob", "update", "reference_forward")  # context_forward / anchor_backward: inside
        out.append({
            "step": int(float(row["step"])) + 1,  # optimizer steps done after this row
            "tokens": round(number(row, "time/rollout_tokens_per_s") * number(row, "time/rollout_s")),
            "step_cpu_s": sum(number(row, f"time/{s}_cpu_s") for s in stages),
            "step_wall_s": sum(number(row, f"time/{s}_s") for s in stages),
            "run_cpu_s": number(row, "time/run_cpu_s"),
            "run_wall_s": number(row, "time/run_wall_s"),
            "response_length": number(row, "train/response_length"),
            "searches": number(row, "p2o/searches"),
        })  # fmt: skip
    out.sort(key=lambda r: r["step"])
    for before, row in zip([None, *out], out):
        row["run_cpu_delta_s"] = row["run_cpu_s"] - (before["run_cpu_s"] if before else 0.0)
        row["run_wall_delta_s"] = row["run_wall_s"] - (before["run_wall_s"] if before else 0.0)
    return out


def per_token(rows: list[dict[str, float]], key: str) -> float:
    """Seconds of ``key`` per generated token over ``rows`` (a ratio of sums: long steps weigh what they cost)."""
    tokens = sum(r["tokens"] for r in rows)
    return sum(r[key] for r in rows) / tokens if tokens else float("nan")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(arm: str, arm_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    """The numbers of one arm: RSS growth after warm-up, time per token early vs late, folder growth by part."""
    meta = json.loads((arm_dir / "meta.json").read_text()) if (arm_dir / "meta.json").exists() else {}
    meta = {"config": ARMS[arm], "steps": "?", "commit": "unknown", "threads": "?", "start": "?"} | meta
    command = meta.get("command", [])
    configs = [Path(command[i + 1]).name for i, a in enumerate(command[:-1]) if a == "--config"]
    meta["config"] = " + ".join(configs) or meta["config"]  # a second --config (a variant) is named too
    samples = [s for s in read_csv(arm_dir / "samples.csv") if s["step"] != "" and s["rss_mb"] != "nan"]
    steps = step_rows(arm_dir / "run" / "metrics.csv")
    last = steps[-1]["step"]
    tenth = max(1, last // 10)
    early, late = steps[:tenth], steps[-tenth:]
    tenths = [part for part in (steps[i * tenth : (i + 1) * tenth] for i in range(10)) if part]  # < 10 in short runs
    # warm-up: the first 10% of the steps (allocator pools, the first validation, the first search, the first save)
    warm = [float(s["rss_mb"]) for s in samples if tenth <= int(s["step"]) < 2 * tenth]
    tail = [float(s["rss_mb"]) for s in samples if int(s["step"]) >= last - tenth]
    after = [float(s["rss_mb"]) for s in samples if int(s["step"]) >= tenth]
    first_ckpt = next((s for s in samples if int(s["files_checkpoints"]) > 0 and int(s["step"]) >= tenth), samples[0])
    end = samples[-1]
    out = {
        "arm": arm, "config": meta["config"], "steps_asked": meta["steps"], "steps_done": last,
        "exit": meta.get("rc"), "commit": meta["commit"][:7], "threads": meta["threads"],
        "start": meta["start"], "end": meta.get("end"),
        "interval_s": median([float(b["t_s"]) - float(a["t_s"]) for a, b in zip(samples, samples[1:])]),
        "load1_median": median([float(s["load1"]) for s in samples]),
        "load1_max": max(float(s["load1"]) for s in samples),
        "rss_warm_mb": median(warm), "rss_late_mb": median(tail), "rss_max_after_warm_mb": max(after, default=0.0),
        "rss_peak_mb": max(float(s["hwm_mb"]) for s in samples),
        "rss_peak_warm_mb": max(float(s["hwm_mb"]) for s in samples if int(s["step"]) < 2 * tenth),
        "cpu_per_token_step_early_us": 1e6 * per_token(early, "step_cpu_s"),
        "cpu_per_token_step_late_us": 1e6 * per_token(late, "step_cpu_s"),
        "cpu_per_token_all_early_us": 1e6 * per_token(early, "run_cpu_delta_s"),
        "cpu_per_token_all_late_us": 1e6 * per_token(late, "run_cpu_delta_s"),
        "wall_per_token_all_early_us": 1e6 * per_token(early, "run_wall_delta_s"),
        "wall_per_token_all_late_us": 1e6 * per_token(late, "run_wall_delta_s"),
        "load1_early": median([float(s["load1"]) for s in samples if int(s["step"]) < tenth]),
        "load1_late": median([float(s["load1"]) for s in samples if int(s["step"]) >= last - tenth]),
        "cpu_per_token_step_tenths_us": [1e6 * per_token(part, "step_cpu_s") for part in tenths],
        "tokens_per_step_tenths": [sum(r["tokens"] for r in part) / len(part) for part in tenths],
        "cpu_per_step_early_s": sum(r["step_cpu_s"] for r in early) / len(early),
        "cpu_per_step_late_s": sum(r["step_cpu_s"] for r in late) / len(late),
        "tokens_per_step_early": sum(r["tokens"] for r in early) / len(early),
        "tokens_per_step_late": sum(r["tokens"] for r in late) / len(late),
        "run_cpu_s": last and steps[-1]["run_cpu_s"], "run_wall_s": steps[-1]["run_wall_s"],
        "process_cpu_s": max(float(s["cpu_s"]) for s in samples if s["cpu_s"] != "nan"),
        "searches": int(max(r["searches"] for r in steps)), "search_records": int(end["files_p2o"]),
        "checkpoint_files_max": max(int(s["files_checkpoints"]) for s in samples),
        "metrics_rows": len(read_csv(arm_dir / "run" / "metrics.csv")),
    }  # fmt: skip
    out["rss_growth_pct"] = 100 * (out["rss_late_mb"] / out["rss_warm_mb"] - 1)
    out["rss_max_growth_pct"] = 100 * (out["rss_max_after_warm_mb"] / out["rss_warm_mb"] - 1)
    for key in ("step", "all"):
        e, la = out[f"cpu_per_token_{key}_early_us"], out[f"cpu_per_token_{key}_late_us"]
        out[f"cpu_per_token_{key}_change_pct"] = 100 * (la / e - 1)
    out["growth"] = {
        p: {"from_step": int(first_ckpt["step"]), "from": int(first_ckpt[f"bytes_{p}"]), "to": int(end[f"bytes_{p}"])}
        for p in PARTS
    }
    out["checkpoint_bytes_first"] = next(
        (int(s["bytes_checkpoints"]) for s in samples if int(s["files_checkpoints"])), 0
    )
    out["checkpoint_bytes_last"] = int(end["bytes_checkpoints"])
    return out, samples, steps


def rolling(values: list[float], weights: list[float], window: int) -> list[float]:
    """A ratio of sums over the last ``window`` entries (seconds per token over a window of steps)."""
    out = []
    for i in range(len(values)):
        lo = max(0, i - window + 1)
        w = sum(weights[lo : i + 1])
        out.append(sum(values[lo : i + 1]) / w if w else float("nan"))
    return out


def plot_arm(summary: dict, samples: list[dict], steps: list[dict], path: Path) -> None:
    """Three panels against the step: RSS, CPU µs per generated token, the run folder's size by part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    x = [int(s["step"]) for s in samples]
    ax = axes[0]
    rss = [float(s["rss_mb"]) for s in samples]
    ax.plot(x, rss, ".", ms=1.5, alpha=0.35, label=f"VmRSS, every {summary['interval_s']:g} s (within-step swings)")
    half = max(1, len(rss) // 40)  # a running median over ~5% of the samples
    ax.plot(x, [median(rss[max(0, i - half) : i + half + 1]) for i in range(len(rss))], lw=1.5, label="running median")
    ax.plot(x, [float(s["hwm_mb"]) for s in samples], lw=1.2, color="tab:purple", label="VmHWM (peak so far)")
    ax.axhline(summary["rss_warm_mb"] * 1.10, color="tab:red", ls="--", lw=1, label="+10% of RSS after warm-up")
    ax.axvline(summary["steps_done"] // 10, color="grey", ls=":", lw=1, label="end of warm-up (10%)")
    ax.set(xlabel="RL step", ylabel="MB", title=f"resident memory (growth {summary['rss_growth_pct']:+.1f}%)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1]
    sx = [r["step"] for r in steps]
    tokens = [r["tokens"] for r in steps]
    window = 50
    for key, label in (("step_cpu_s", "RL step (rollout + log-probs + update)"),
                       ("run_cpu_delta_s", "whole process (+ validation, searches, checkpoints)")):  # fmt: skip
        ax.plot(sx, [1e6 * v for v in rolling([r[key] for r in steps], tokens, window)], lw=1, label=label)
    ax.set(xlabel="RL step", ylabel="CPU µs per generated token",
           title=f"CPU time per generated token ({window}-step windows, 1 thread)")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower left")
    twin = ax.twinx()
    twin.plot(x, [float(s["load1"]) for s in samples], color="grey", lw=0.6, alpha=0.5)
    twin.set_ylabel("machine load average, 1 min (grey; 2 cores)", color="grey")
    twin.set_ylim(bottom=0)

    ax = axes[2]
    labels = {"checkpoints": "checkpoints/", "p2o": "p2o/ search records", "metrics": "metrics.csv",
              "policy": "policy/ (at the end)", "other": "other (config, hparams, plot, summary)"}  # fmt: skip
    ax.stackplot(x, *[[int(s[f"bytes_{p}"]) / 1e6 for s in samples] for p in labels], labels=list(labels.values()))
    ax.set(xlabel="RL step", ylabel="MB", title="run folder size by part")
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    fig.suptitle(f"{summary['arm'].upper()} on the embedded world ({summary['config']}, {summary['steps_done']} "
                 f"steps, commit {summary['commit']}, {summary['threads']} thread)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args: argparse.Namespace) -> None:
    """Summary table (printed and ``summary.md`` / ``summary.json``), per-step CSV and plot of each arm found."""
    work, out_dir = Path(args.work), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for arm in ARMS:
        if not (work / arm / "samples.csv").exists():
            continue
        summary, samples, steps = summarize(arm, work / arm)
        if args.control and (Path(args.control) / arm / "run" / "metrics.csv").exists():
            control = step_rows(Path(args.control) / arm / "run" / "metrics.csv")
            control_samples = read_csv(Path(args.control) / arm / "samples.csv")
            summary |= {
                "control_steps": control[-1]["step"],
                "control_load1_median": median([float(s["load1"]) for s in control_samples]),
                "cpu_per_token_step_control_us": 1e6 * per_token(control, "step_cpu_s"),
                "cpu_per_step_control_s": sum(r["step_cpu_s"] for r in control) / len(control),
                "tokens_per_step_control": sum(r["tokens"] for r in control) / len(control),
                "cpu_per_token_all_control_us": 1e6 * per_token(control, "run_cpu_delta_s"),
            }
        summaries.append(summary)
        plot_arm(summary, samples, steps, out_dir / f"{arm}.png")
        with open(out_dir / f"{arm}_samples.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SAMPLE_COLUMNS)
            writer.writeheader()
            writer.writerows(samples)
        with gzip.open(out_dir / f"{arm}_steps.csv.gz", "wt", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(steps[0]))
            writer.writeheader()
            writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in steps)
    (out_dir / "summary.json").write_text(json.dumps(summaries, indent=1))
    lines = table(summaries)
    if (work / "probe.csv").exists():  # does the same work cost more CPU time when the machine is busier?
        rows = read_csv(work / "probe.csv")
        (out_dir / "probe.csv").write_text((work / "probe.csv").read_text())
        bands = [(0, 4), (4, 8), (8, 1000)]
        cells = []
        for lo, hi in bands:
            cpu = [float(r["probe_cpu_s"]) for r in rows if lo <= float(r["load1"]) < hi]
            cells.append(f"- load {lo}-{hi if hi < 1000 else '∞'}: {median(cpu):.3f} s ({len(cpu)} samples)")
        lines += ["", "Probe (the CPU time of a fixed piece of work at one thread, by the machine's load):", *cells]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def table(summaries: list[dict]) -> list[str]:
    """The summary as markdown: one column per arm."""
    rows = [
        ("steps done / asked", lambda s: f"{s['steps_done']} / {s['steps_asked']}"
                                         + ("" if s["exit"] == 0 else f" (**partial**: exit status {s['exit']})")),
        ("commit, threads", lambda s: f"{s['commit']}, {s['threads']}"),
        ("load average (1 min), median / max", lambda s: f"{s['load1_median']:.2f} / {s['load1_max']:.2f}"),
        ("RSS after warm-up (steps 10-20%), MB", lambda s: f"{s['rss_warm_mb']:.0f}"),
        ("RSS over the last 10% of steps, MB", lambda s: f"{s['rss_late_mb']:.0f}"),
        ("**RSS growth after warm-up**", lambda s: f"**{s['rss_growth_pct']:+.1f}%**"),
        ("RSS max after warm-up (growth)", lambda s: f"{s['rss_max_after_warm_mb']:.0f} MB "
                                                     f"({s['rss_max_growth_pct']:+.1f}%)"),
        ("peak RSS (VmHWM) by the end of warm-up → at the end, MB", lambda s: f"{s['rss_peak_warm_mb']:.0f} → "
                                                                              f"{s['rss_peak_mb']:.0f}"),
        ("generated tokens / step, first / last 10%", lambda s: f"{s['tokens_per_step_early']:.0f} / "
                                                               f"{s['tokens_per_step_late']:.0f}"),
        ("RL step CPU s / step, first / last 10%", lambda s: f"{s['cpu_per_step_early_s']:.3f} / "
                                                             f"{s['cpu_per_step_late_s']:.3f}"),
        ("RL step CPU µs / token, first / last 10%", lambda s: f"{s['cpu_per_token_step_early_us']:.0f} / "
            f"{s['cpu_per_token_step_late_us']:.0f} ({s['cpu_per_token_step_change_pct']:+.1f}%)"),
        ("RL step CPU µs / token, by tenth of the run", lambda s: " ".join(
            f"{v:.0f}" for v in s["cpu_per_token_step_tenths_us"])),
        ("generated tokens / step, by tenth of the run", lambda s: " ".join(
            f"{v:.0f}" for v in s["tokens_per_step_tenths"])),
        ("whole-process CPU µs / token, first / last 10%", lambda s: f"{s['cpu_per_token_all_early_us']:.0f} / "
            f"{s['cpu_per_token_all_late_us']:.0f} ({s['cpu_per_token_all_change_pct']:+.1f}%)"),
        ("wall µs / token, first / last 10% (shared machine)", lambda s: f"{s['wall_per_token_all_early_us']:.0f} "
                                                                        f"/ {s['wall_per_token_all_late_us']:.0f}"),
        ("load average (1 min) over the first / last 10%", lambda s: f"{s['load1_early']:.1f} / "
                                                                       f"{s['load1_late']:.1f}"),
        ("control: a fresh run's first steps, RL step / whole-process CPU µs / token (load)", lambda s: (
            f"{s['cpu_per_token_step_control_us']:.0f} / {s['cpu_per_token_all_control_us']:.0f} "
            f"({s['control_steps']} steps, load {s['control_load1_median']:.1f})") if "control_steps" in s else "-"),
        ("control: CPU s / step, tokens / step", lambda s: f"{s['cpu_per_step_control_s']:.3f}, "
            f"{s['tokens_per_step_control']:.0f}" if "control_steps" in s else "-"),
        ("run CPU s / wall s", lambda s: f"{s['run_cpu_s']:.0f} / {s['run_wall_s']:.0f}"),
        ("searches run / search records on disk", lambda s: f"{s['searches']} / {s['search_records']}"),
        ("metrics.csv rows", lambda s: f"{s['metrics_rows']}"),
        ("checkpoint files (max at once)", lambda s: f"{s['checkpoint_files_max']}"),
        ("checkpoints/ first save → end, MB", lambda s: f"{s['checkpoint_bytes_first'] / 1e6:.2f} → "
                                                        f"{s['checkpoint_bytes_last'] / 1e6:.2f}"),
    ]  # fmt: skip
    for part in PARTS:
        rows.append((f"{part}: bytes after warm-up → at the end", lambda s, p=part: (
            f"{s['growth'][p]['from']:,} → {s['growth'][p]['to']:,} "
            f"(from step {s['growth'][p]['from_step']})")))  # fmt: skip
    lines = ["| | " + " | ".join(s["arm"].upper() for s in summaries) + " |", "|---" * (len(summaries) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(s) for s in summaries) + " |" for name, fmt in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="fit one arm in a subprocess and sample it")
    run.add_argument("--arm", choices=list(ARMS), required=True)
    run.add_argument("--steps", type=int, required=True, help="trainer.max_steps")
    run.add_argument("--work", default="runs/long_run", help="arm folders go here: <work>/<arm>/run is the run")
    run.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the fit")
    run.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    run.add_argument("--resume", action="store_true", help="resume the arm's run (--ckpt_path last)")
    run.add_argument("extra", nargs="*", help="more fit arguments, after --")
    pro = sub.add_parser("probe", help="the CPU time of a fixed piece of work, sampled (the machine's load)")
    pro.add_argument("--out", required=True)
    pro.add_argument("--interval", type=float, default=15.0)
    pro.add_argument("--until", help="stop once this file exists")
    pro.add_argument("--count", type=int, help="stop after this many samples")
    rep = sub.add_parser("report", help="summary and plots of the arms under --work")
    rep.add_argument("--work", default="runs/long_run")
    rep.add_argument("--out", default="benchmarks/results/long_run")
    rep.add_argument(
        "--control",
        help="a --work folder of short fresh runs of the arms, run after the long ones: "
        "the first steps' cost at the load of the long runs' end",
    )
    args = parser.parse_args()
    if args.command == "run":
        sys.exit(run_arm(args))
    probe(args) if args.command == "probe" else report(args)


if __name__ == "__main__":
    main()
