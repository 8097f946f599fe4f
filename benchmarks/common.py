"""What every benchmark here shares: the columns a result row starts with (date, device, versions, commit), an
append-only CSV writer, this process's resident memory (now, and its peak since a reset) and the random
151,936-vocabulary Qwen3 the CPU benchmarks time at Qwen's vocabulary. Not an entry script: ``bench_*.py`` import it.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
import threading
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    """Date, device name and kind, torch version and commit: the columns every benchmark row starts with."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name} ({torch.get_num_threads()} threads)"
        kind = "cpu"
    try:  # $P2O_COMMIT: the commit that runs, where the copy of the repository has no reliable git history
        commit = (
            os.environ.get("P2O_COMMIT")
            or subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_kind": kind,
        "torch": torch.__version__,
        "commit": commit or "unknown",
    }


def versions() -> dict:
    """Versions of the kernel libraries compared ("-" when not installed)."""
    out = {}
    for key, dist in (("triton", "triton"), ("liger", "liger-kernel"), ("cce", "cut-cross-entropy")):
        try:
            out[f"{key}_version"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[f"{key}_version"] = "-"
    return out


def impl_unavailable(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run here (None when it can)."""
    packages = {"liger": "liger_kernel", "cce": "cut_cross_entropy", "triton": "triton"}
    if impl in packages and importlib.util.find_spec(packages[impl]) is None:
        return f"{packages[impl]} is not installed"
    if impl in ("triton", "liger", "cce") and device.type != "cuda":
        extra = " (the Triton interpreter is a correctness tool, not a benchmark)" if impl == "triton" else ""
        return f"needs CUDA{extra}"
    return None


def write_csv(rows: list[dict], path: Path, columns: list[str]) -> None:
    """Append ``rows``; a file written with other columns is rewritten under the union of both (no row lost)."""
    old_rows: list[dict] = []
    header = columns
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != columns:
                old_rows = list(reader)
                header = columns + [c for c in reader.fieldnames or [] if c not in columns]
    mode = "w" if old_rows or not path.exists() else "a"
    with path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        if mode == "w":
            writer.writeheader()
            writer.writerows(old_rows)
        for r in rows:
            writer.writerow({k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in header})


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (``VmRSS``) or its peak (``VmHWM``), MB, from ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


class PeakRSS:
    """The peak resident memory of this process since :meth:`reset`, MB.

    Linux keeps the peak itself (``VmHWM``) and resets it to the current RSS when "5" is written to
    ``/proc/self/clear_refs``: exact, nothing sampled. Where that write is refused, a thread samples ``VmRSS`` every
    ``interval`` seconds instead (``how`` says which), and misses peaks shorter than that.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.how = "VmHWM reset"
        self._sampled, self._thread, self._stop = 0.0, None, threading.Event()

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return
        except OSError:
            self.how = f"VmRSS sampled every {self.interval * 1e3:g} ms"
        self._sampled = rss_mb()
        if self._thread is None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled = max(self._sampled, rss_mb())

    def peak(self) -> float:
        if self._thread is not None:
            return max(self._sampled, rss_mb())
        return rss_mb("VmHWM")


class TimedCall:
    """``target`` called through ``timed`` (a timing wrapper of it); every other attribute is ``target``'s: a stage
    object of the module (its ``ppo`` update) timed without changing what the module sees."""

    def __init__(self, target, timed) -> None:
        self.target, self.timed = target, timed

    def __getattr__(self, name):
        return getattr(self.target, name)

    def __call__(self, *args, **kwargs):
        return self.timed(*args, **kwargs)


QWEN_VOCAB = 151936  # Qwen2.5 / Qwen3's vocabulary


def qwen3_151k_path() -> Path:
    """Build (once, seeded) the random 151,936-vocabulary Qwen3 with the embedded world's tokenizer."""
    from transformers import AutoTokenizer

    from p2o_lightning.tasks.qwen3 import random_qwen3
    from p2o_lightning.tasks.shipped_world import shipped_world
    from p2o_lightning.tasks.world import default_cache_dir

    path = default_cache_dir() / "bench_vs_trl" / "qwen3-151k-v1"
    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(shipped_world())
    model = random_qwen3(
        vocab_size=QWEN_VOCAB, hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=0,
    )  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
