"""Small pieces of the trainer: response masks, safe grading, data checks and order, the collapse metric."""

import json
import time

import pytest
import torch

from p2o_lightning.data import PromptBatches, load_problems
from p2o_lightning.metrics import CollapseRate
from p2o_lightning.rewards import SafeGrader
from p2o_lightning.rollout import response_mask_from_eos
from p2o_lightning.tasks import Problem, Score, apply_template, get_task


def test_response_mask_stops_after_first_eos():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 7, 0], [5, 6, 7, 8, 9]])
    # row 0: EOS at 2 -> 3 tokens; row 1: first EOS at 1 -> 2 tokens; row 2: no EOS -> all 5 (truncated)
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(response_mask_from_eos(ids, [eos]), expected)
    assert torch.equal(response_mask_from_eos(ids, [eos, 7])[2], torch.tensor([1, 1, 1, 0, 0]))


def test_apply_template():
    assert apply_template("", "1+1=") == "1+1="
    assert apply_template("  Think step by step. \n", "1+1=") == "Think step by step.\n\n1+1="


def test_collapse_rate_counts_all_wrong_and_all_right():
    metric = CollapseRate()
    rewards = torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 1, 1]])
    metric.update(rewards)
    out = metric.compute()
    # 2 of 4 groups have no spread: one all-wrong, one all-right
    assert out["collapse_rate"].item() == pytest.approx(0.5)
    assert out["collapse_all_wrong"].item() == pytest.approx(0.25)
    assert out["collapse_all_right"].item() == pytest.approx(0.25)
    metric.update(torch.zeros(4, 4))  # accumulates: 6 collapsed of 8, 5 all-wrong
    assert metric.compute()["collapse_rate"].item() == pytest.approx(6 / 8)
    assert metric.compute()["collapse_all_wrong"].item() == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="rewards must be"):
        metric.update(torch.zeros(4))


class _Grader:
    name = "flaky"

    def score(self, response, answer):
        if response == "raise":
            raise RuntimeError("boom")
        if response == "hang":
            time.sleep(3)
        return Score(float(response == answer), "fb")


def test_safe_grader_survives_raise_and_hang():
    grader = SafeGrader(_Grader(), timeout=0.5)
    out = grader.grade(["4", "raise", "hang", "5"], ["4", "4", "4", "4"])
    assert out.rewards == [1.0, 0.0, 0.0, 0.0]
    assert out.errors == 1 and out.timeouts == 1
    # the grader keeps working after a hang
    assert grader.grade(["4"], ["4"]).rewards == [1.0]
    grader.close()
    with pytest.raises(ValueError, match="reward_timeout"):
        SafeGrader(_Grader(), timeout=0)


class _BadRewards:
    name = "bad"

    def score(self, response, answer):
        if response == "raise":
            return 1 / 0
        return {"nan": Score(float("nan"), "fb"), "inf": Score(float("inf"), "fb"), "text": Score("high", "fb")}.get(
            response, None if response == "none" else Score(1.0, "fb")
        )


def test_safe_grader_scores_nan_non_numbers_and_errors_zero_counted_and_logged_once(caplog):
    grader = SafeGrader(_BadRewards(), timeout=5)
    responses = ["ok", "nan", "inf", "text", "none", "raise"]
    with caplog.at_level("WARNING", logger="p2o_lightning.rewards"):
        first = grader.grade(responses, ["x"] * 6)
        second = grader.grade(responses, ["x"] * 6)
    for out in (first, second):
        assert out.rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0] and out.errors == 5 and out.timeouts == 0
    messages = [r.getMessage() for r in caplog.records]
    # one line per kind over both batches: ValueError (NaN, inf, "high"), TypeError (None), ZeroDivisionError
    assert len(messages) == 3, messages
    assert any("non-finite reward (nan)" in m for m in messages) and any("ZeroDivisionError" in m for m in messages)
    assert all("further failures of this kind are counted" in m for m in messages)
    grader.close()


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="task='nope' is unknown"):
        get_task("nope")


def test_math_task_grades_boxed_answers():
    task = get_task("math")
    assert task.score("so the answer is \\boxed{\\frac{1}{2}}", "0.5").reward == 1.0
    wrong = task.score("\\boxed{3}", "4")
    assert wrong.reward == 0.0 and "'4'" in wrong.feedback


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_load_problems_names_file_and_row(tmp_path):
    good = tmp_path / "good.jsonl"
    _write_jsonl(
        good, [{"prompt": "1+1=", "answer": "2"}, {"prompt": [{"role": "user", "content": "2+2="}], "answer": 4}]
    )
    assert load_problems(good) == [Problem("1+1=", "2"), Problem("2+2=", "4")]  # a number answer is its text
    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": ""}])
    with pytest.raises(ValueError, match=r"bad.jsonl: 1 of 2 rows are unusable:\n  line 2: no 'answer' \(got ''\)"):
        load_problems(bad)
    with pytest.raises(ValueError, match="no column 'solution'"):
        load_problems(good, answer_key="solution")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_problems(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv"])
def test_empty_data_file_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_text("prompt,answer\n" if name.endswith(".csv") else "\n")
    with pytest.raises(ValueError, match=rf"{name}: the file is empty \(no rows\)"):
        load_problems(path)


def test_every_bad_row_is_listed_up_to_a_limit(tmp_path):
    lines = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(30)]
    lines[3] = '{"prompt": "3+1=", "answer": '  # cut off
    lines[5] = json.dumps({"prompt": "", "answer": "6"})
    lines[7] = json.dumps(["not", "an", "object"])
    for i in range(10, 22):
        lines[i] = json.dumps({"prompt": f"{i}+1="})
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        load_problems(path)
    message = str(err.value)
    assert message.startswith(f"{path}: 15 of 30 rows are unusable:")
    assert "line 4: not valid JSON" in message and "line 6: no usable 'prompt'" in message
    assert "line 8: not an object" in message and "line 11: no 'answer' (got None)" in message
    assert message.count("\n  line ") == 10 and message.endswith("... and 5 more")


def test_csv_and_parquet_answers_stay_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "data.csv"
    csv_path.write_text("prompt,answer\n1+6=,007\n2+2=,4\n")
    assert load_problems(csv_path) == [Problem("1+6=", "007"), Problem("2+2=", "4")]
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "answer": [2, None]}), parquet)
    with pytest.raises(ValueError, match=r"data.parquet: 1 of 2 rows are unusable:\n  row 1: no 'answer'"):
        load_problems(parquet)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake.parquet: cannot be read as Parquet"):
        load_problems(tmp_path / "fake.parquet")


def _take(batches, n):
    it = iter(batches)
    return [next(it) for _ in range(n)]


def test_prompt_batches_reshuffle_per_epoch_and_resume():
    batches = PromptBatches(12, batch_size=3, seed=1)
    epoch0 = list(batches)
    epoch1 = list(batches)
    assert len(epoch0) == len(batches) == 4 and sorted(i for b in epoch0 for i in b) == list(range(12))
    assert epoch0 != epoch1

    # a run stopped after 2 batches of epoch 0 resumes at the third; the next pass is epoch 1
    fresh = PromptBatches(12, batch_size=3, seed=1)
    _take(fresh, 2)
    state = fresh.state_dict()
    assert state == {"epoch": 0, "consumed": 2, "world": 1}
    resumed = PromptBatches(12, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert list(resumed) == epoch0[2:]
    assert list(resumed) == epoch1


def test_ema_and_search_steps_for_plots(tmp_path):
    from p2o_lightning.plots import ema, plot_metrics, search_steps

    # s0 = 1; s1 = 0.5 * 0 + 0.5 * 1 = 0.5; s2 = 0.5 * 1 + 0.5 * 0.5 = 0.75
    assert ema([1.0, 0.0, 1.0], alpha=0.5) == [1.0, 0.5, 0.75]
    (tmp_path / "p2o").mkdir()
    (tmp_path / "p2o" / "search_000.json").write_text('{"rollout_step": 24}')
    (tmp_path / "p2o" / "search_001.json").write_text('{"rollout_st')  # being written: skipped
    assert search_steps(tmp_path) == [24]
    assert search_steps(tmp_path / "none", {"p2o/searches": [(0, 0.0), (5, 1.0), (6, 1.0), (9, 2.0)]}) == [5, 9]
    rows = ["epoch,step,train/reward,train/collapse_all_wrong,val/dev/greedy_acc"]
    rows += [f"0,{s},{s / 10},{1 - s / 10},{'0.5' if s % 4 == 0 else ''}" for s in range(10)]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert plot_metrics(tmp_path / "metrics.csv", tmp_path / "metrics.png").stat().st_size > 10_000


def test_plot_draws_a_reference_run_beside_the_validation_curves(tmp_path):
    """A gzipped reference metrics file reads as the plain one, and its greedy curve lands in the validation panel."""
    import gzip

    import matplotlib.pyplot as plt

    from p2o_lightning import plots

    rows = ["epoch,step,train/reward,val/in_dist/greedy_acc,val/in_dist/mean@8"]
    rows += [f"0,{s},{s / 10},{'0.25' if s % 4 == 0 else ''},{'0.2' if s % 4 == 0 else ''}" for s in range(10)]
    text = "\n".join(rows) + "\n"
    (tmp_path / "metrics.csv").write_text(text)
    (tmp_path / "ref.csv.gz").write_bytes(gzip.compress(text.replace("0.25", "0.75").encode()))
    reference = plots.read_metrics(tmp_path / "ref.csv.gz")
    assert reference["val/in_dist/greedy_acc"] == [(0, 0.75), (4, 0.75), (8, 0.75)]
    drawn = []
    original = plots.draw_reference
    plots.draw_reference = lambda ax, keys, ref, label: drawn.append(original(ax, keys, ref, label) or ax)
    try:
        plots.plot_metrics(tmp_path / "metrics.csv", tmp_path / "m.png", reference=tmp_path / "ref.csv.gz",
                           reference_label="GRPO 2K")  # fmt: skip
    finally:
        plots.draw_reference = original
    (ax,) = drawn  # the validation panel only
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["GRPO 2K: greedy (grey, dashed)"].get_ydata()) == [0.75, 0.75, 0.75]
    plt.close("all")
