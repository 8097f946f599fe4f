"""Small pieces of the trainer: response masks, safe grading, data checks and order, the collapse metric."""

import json
import time

import pytest
import torch

from p2o_lightning.data import PromptStream, load_problems
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
    assert load_problems(good) == [Problem("1+1=", "2"), Problem("2+2=", "4")]
    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": ""}])
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1 has no 'answer'"):
        load_problems(bad)
    with pytest.raises(ValueError, match="no column 'solution'"):
        load_problems(good, answer_key="solution")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_problems(tmp_path / "missing.jsonl")


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_prompt_stream_reshuffles_per_epoch_and_resumes():
    problems = [Problem(f"{i}+0=", str(i)) for i in range(12)]
    stream = PromptStream(problems, batch_size=3, seed=1, split="train")
    epoch0 = list(stream)
    epoch1 = list(stream)
    assert len(epoch0) == 4 and sorted(r["index"] for b in epoch0 for r in b) == list(range(12))
    assert [r["index"] for r in epoch0[0]] != [r["index"] for r in epoch1[0]] or epoch0 != epoch1

    # a run stopped after 2 batches of epoch 0 resumes at the third; the next pass is epoch 1
    fresh = PromptStream(problems, batch_size=3, seed=1, split="train")
    _take(fresh, 2)
    state = fresh.state_dict()
    assert state == {"epoch": 0, "consumed": 2}
    resumed = PromptStream(problems, batch_size=3, seed=1, split="train")
    resumed.load_state_dict(state)
    assert list(resumed) == epoch0[2:]
    assert list(resumed) == epoch1
