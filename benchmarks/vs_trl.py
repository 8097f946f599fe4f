"""The pure parts of ``bench_vs_trl.py``, in a module of their own so tests import them without the entry script: the
prompt order both sides train on, its digest, the EOS rule both sides must share, the phase clock, and a side's
summary row.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from collections import defaultdict

PHASES = ("generate", "grade", "forward", "backward", "optimizer")  # + "rest": the step less these
LOGGING = "log"  # the trainer's logging inside the step: measured, and taken out of the step's time


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
        out = {p: self.seconds.get(p, 0.0) for p in (*PHASES, LOGGING)}
        self.seconds.clear()
        return out


def eos_rule(generation_eos: int | list[int] | None, tokenizer_eos: int | None) -> list[int]:
    """The one EOS rule of both sides: responses end at the tokenizer's EOS token, and only there. TRL's
    ``GRPOTrainer`` cuts its completions at ``tokenizer.eos_token_id`` alone, ours at the generation config's EOS ids
    and the tokenizer's: a model whose generation config names another EOS id would make the sides stop on different
    sets, so it is refused (naming the ids) rather than compared.
    """
    if tokenizer_eos is None:
        raise ValueError("the tokenizer has no EOS token: the sides would have no stopping rule in common")
    named = [] if generation_eos is None else [generation_eos] if isinstance(generation_eos, int) else generation_eos
    extra = sorted(set(named) - {tokenizer_eos})
    if extra:
        raise ValueError(
            f"the generation config's EOS ids {named} include {extra} beside the tokenizer's EOS {tokenizer_eos}: "
            "TRL stops on the tokenizer's alone, ours on all of them; benchmark a model whose two agree"
        )
    return [tokenizer_eos]


def summarize(impl: str, runs: list[dict], warmup: int) -> dict:
    """One side's row: step time min and median over every counted step of every run (each step's logging taken
    out), the phases' medians, the widths and tokens per step, the responses that ended at EOS, and memory (the
    median run's)."""
    steps = [s for r in runs for s in r["steps"][warmup:]]
    med = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    peak_above = [r["peak_mb"] - r["rss_setup_mb"] - r["adam_state_mb"] for r in runs]
    row = {"impl": impl, "runs": len(runs), "steps_counted": len(steps), "min_s": min(s["step_s"] for s in steps)}
    row["median_s"] = med("step_s")
    row["run_medians_s"] = " ".join(f"{statistics.median(s['step_s'] for s in r['steps'][warmup:]):.3f}" for r in runs)
    row.update({f"{p}_s": med(p) for p in (*PHASES, "rest", LOGGING)})
    for key in ("gen_rows", "gen_prompt_width", "gen_response_width", "prompt_tokens", "response_tokens", "eos_rows"):
        row[key] = med(key)
    row["fused_head"] = " ".join(sorted({str(s.get("fused_head", "-")) for s in steps}))
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
