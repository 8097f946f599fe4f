"""The pure parts of ``bench_vs_trl.py``, in a module of their own so tests import them without the entry script: the
prompt order both sides train on, its digest, the phase clock, and a side's summary row.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from collections import defaultdict

PHASES = ("generate", "grade", "forward", "backward", "optimizer")  # + "rest": the step less these


def step_prompts(num_problems: int, per_step: int, steps: int, seed: int) -> list[list[int]]:
    """The problem indices of each of ``steps`` steps: a seeded permutation of all problems per epoch, cut into
    steps of ``per_step``; an epoch's tail too short for a step is dropped (as a loader with ``drop_last``).
    """
    if not 0 < per_step <= num_problems:
        raise ValueError(f"{per_step} prompts per step cannot come from {num_problems} problems")
    out: list[list[int]] = []
    epoch = 0
    while len(out) < steps:
        order = list(range(num_problems))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out += [order[i : i + per_step] for i in range(0, num_problems - per_step + 1, per_step)]
        epoch += 1
    return out[:steps]


def prompts_digest(prompts: list[str]) -> str:
    """A short digest of a step's prompts, in order: equal on both sides when they trained on the same prompts."""
    return hashlib.sha256("\x1e".join(prompts).encode()).hexdigest()[:12]


class PhaseClock:
    """Seconds per phase, from timing wrappers; a wrapped call inside another counts in its own phase only (each
    second is counted once, in the innermost phase around it)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: list[list[float]] = []  # per open call: [start, seconds of the calls inside it]

    def wrap(self, fn, phase: str):
        def timed(*args, **kwargs):
            frame = [time.perf_counter(), 0.0]
            self._open.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._open.pop()
                elapsed = time.perf_counter() - frame[0]
                self.seconds[phase] += elapsed - frame[1]
                if self._open:
                    self._open[-1][1] += elapsed

        return timed

    def take(self) -> dict[str, float]:
        out = {p: self.seconds.get(p, 0.0) for p in PHASES}
        self.seconds.clear()
        return out


def summarize(impl: str, runs: list[dict], warmup: int) -> dict:
    """One side's row: step time min and median over every counted step of every run, the phases' medians, the
    widths and tokens per step, and memory (the median run's)."""
    steps = [s for r in runs for s in r["steps"][warmup:]]
    med = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    peak_above = [r["peak_mb"] - r["rss_setup_mb"] - r["adam_state_mb"] for r in runs]
    row = {"impl": impl, "runs": len(runs), "steps_counted": len(steps), "min_s": min(s["step_s"] for s in steps)}
    row["median_s"] = med("step_s")
    row["run_medians_s"] = " ".join(f"{statistics.median(s['step_s'] for s in r['steps'][warmup:]):.3f}" for r in runs)
    row.update({f"{p}_s": med(p) for p in (*PHASES, "rest")})
    for key in ("gen_rows", "gen_prompt_width", "gen_response_width", "prompt_tokens", "response_tokens"):
        row[key] = med(key)
    row["update_positions"], row["update_real"] = med("update_positions"), med("update_real")
    row["weights_mb"] = statistics.median(r["weights_mb"] for r in runs)
    row["adam_state_mb"] = statistics.median(r["adam_state_mb"] for r in runs)
    row["rss_setup_mb"] = statistics.median(r["rss_setup_mb"] for r in runs)
    row["rss_warm_mb"] = statistics.median(r["rss_warm_mb"] for r in runs)
    row["peak_mb"] = statistics.median(r["peak_mb"] for r in runs)
    row["peak_above_mb"] = statistics.median(peak_above)
    row["load_start"] = " ".join(f"{r['load'][0]:.2f}" for r in runs)
    row["load_end"] = " ".join(f"{r['load'][1]:.2f}" for r in runs)
    return row
