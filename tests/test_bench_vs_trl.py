"""``benchmarks/vs_trl.py``, the logic of bench_vs_trl.py, without TRL and without timing: the prompt order both sides
train on, the one EOS rule, the phase clock's exclusive seconds (logging apart), and the memory a step needs above
weights and optimizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import vs_trl as bench  # noqa: E402  (benchmarks/vs_trl.py: bench_vs_trl.py's logic, not the entry script)


def test_step_prompts_are_seeded_epochs_cut_into_steps():
    steps = bench.step_prompts(num_problems=10, per_step=4, steps=5, seed=3)
    # 10 problems, 4 per step: 2 steps per epoch (the tail of 2 is dropped), so 5 steps span 3 epochs
    assert [len(s) for s in steps] == [4] * 5
    for epoch in range(2):
        rows = steps[2 * epoch] + steps[2 * epoch + 1]
        assert len(set(rows)) == 8  # no problem twice within an epoch
    assert steps[:2] != steps[2:4]  # each epoch has its own permutation
    assert bench.step_prompts(10, 4, 5, seed=3) == steps  # the same list in both subprocesses
    assert bench.step_prompts(10, 4, 5, seed=4) != steps
    with pytest.raises(ValueError, match="cannot come from"):
        bench.step_prompts(3, 4, 1, seed=0)


def test_prompts_digest_depends_on_order():
    assert bench.prompts_digest(["1+2=", "3+4="]) == bench.prompts_digest(["1+2=", "3+4="])
    assert bench.prompts_digest(["1+2=", "3+4="]) != bench.prompts_digest(["3+4=", "1+2="])


def test_phase_clock_counts_each_second_once_in_the_innermost_phase(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    clock = bench.PhaseClock()

    def tick(seconds):
        now[0] += seconds

    backward = clock.wrap(lambda: tick(3.0), "backward")
    optimizer = clock.wrap(lambda: tick(0.5), "optimizer")

    def update():  # 1 s of forward, 3 s of backward, 0.5 s of optimizer, 1 s of forward again
        tick(1.0)
        backward()
        optimizer()
        tick(1.0)

    clock.wrap(update, "forward")()
    clock.wrap(lambda: tick(0.25), bench.LOGGING)()
    # the update took 5.5 s: 3 + 0.5 of them are its children's, 2 its own; logging is a phase of its own
    assert clock.take() == {
        "generate": 0.0,
        "grade": 0.0,
        "forward": 2.0,
        "backward": 3.0,
        "optimizer": 0.5,
        "log": 0.25,
    }
    assert clock.take()["forward"] == 0.0  # taking resets


def test_peak_above_is_the_peak_less_set_up_and_adamw_state():
    def run(peak, setup, adam, step_s):
        steps = [dict.fromkeys(("gen_rows", "gen_prompt_width", "gen_response_width", "prompt_tokens",
                                "response_tokens", "update_positions", "update_real", "eos_rows", *bench.PHASES, "rest",
                                bench.LOGGING), 1.0)
                 | {"step_s": s} for s in step_s]  # fmt: skip
        return {"steps": steps, "peak_mb": peak, "rss_setup_mb": setup, "adam_state_mb": adam, "weights_mb": adam / 2,
                "rss_warm_mb": setup + adam, "load": [1.0, 2.0]}  # fmt: skip

    # warm-up 1: the steps of 9 s are not counted
    row = bench.summarize("ours", [run(700, 500, 80, [9, 1, 3]), run(650, 500, 80, [9, 2, 2])], warmup=1)
    assert row["min_s"] == 1 and row["median_s"] == 2 and row["steps_counted"] == 4
    assert row["run_medians_s"] == "2.000 2.000"
    # peaks above 500 + 80: 120 and 70, median 95
    assert row["peak_above_mb"] == 95


def test_one_eos_rule_for_both_sides():
    assert bench.eos_rule(2, 2) == [2]
    assert bench.eos_rule([2], 2) == [2] and bench.eos_rule(None, 2) == [2]
    # TRL cuts at the tokenizer's EOS alone: a second EOS id in the generation config would split the sides
    with pytest.raises(ValueError, match=r"include \[7\] beside the tokenizer's EOS 2"):
        bench.eos_rule([2, 7], 2)
    with pytest.raises(ValueError, match="no EOS token"):
        bench.eos_rule(2, None)
