"""The collective GEPA scorer on two gloo processes: rank 0 drives, both ranks score, scores come back in order."""

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from p2o_lightning.prompt.scorer import CollectiveScorer


def _score_shard(examples, template):
    # stands in for the policy's forward: one collective of the *training* group per evaluation, whatever the share's
    # size (FSDP2's all-gather), so a rank that skipped it, or ran it at another time, would hang this test
    dist.all_reduce(torch.ones(1))
    return [(f"{template}|{ex['prompt']}", float(len(ex["prompt"]) % 2), f"rank {dist.get_rank()}") for ex in examples]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        scorer = CollectiveScorer(_score_shard)
        examples = [{"prompt": "x" * n, "answer": ""} for n in range(1, 6)]

        def search():
            return [scorer(examples, "T1"), scorer(examples[:1], "T2"), scorer([], "T3"), scorer(examples[1:4], "T4")]

        results = scorer.drive(search)
        record = [results]  # rank 0's results reach every rank, as the callback broadcasts the search record
        dist.broadcast_object_list(record, src=0)
        out[rank] = {"results": record[0], "num_scored": scorer.num_scored, "evals": scorer.num_evaluations}
    finally:
        dist.destroy_process_group()


def test_collective_scorer_two_ranks(tmp_path):
    port = 29400 + os.getpid() % 500
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
        out = dict(out)
    expected = [
        # 5 examples: rank 0 scores prompts 1, 3, 5 ("x", "xxx", "xxxxx"), rank 1 scores 2, 4; back in order
        [(f"T1|{'x' * n}", float(n % 2), f"rank {(n - 1) % 2}") for n in range(1, 6)],
        [("T2|x", 1.0, "rank 0")],  # one example: rank 1's share is empty, yet it takes part in the collective
        [],
        [(f"T4|{'x' * n}", float(n % 2), f"rank {(n - 2) % 2}") for n in range(2, 5)],
    ]
    assert out[0]["results"] == out[1]["results"] == expected
    assert (out[0]["num_scored"], out[1]["num_scored"]) == (3 + 1 + 0 + 2, 2 + 0 + 0 + 1)
    assert out[0]["evals"] == out[1]["evals"] == 4


def test_collective_scorer_single_process_scores_locally():
    scorer = CollectiveScorer(lambda examples, template: [(template, 1.0, "") for _ in examples])
    assert scorer.drive(lambda: scorer([{"prompt": "a"}, {"prompt": "b"}], "T")) == [("T", 1.0, ""), ("T", 1.0, "")]
    assert scorer.num_scored == 2


def test_collective_scorer_rejects_a_short_shard():
    scorer = CollectiveScorer(lambda examples, template: [])
    with pytest.raises(RuntimeError, match="returned 0 scores for 1 examples"):
        scorer([{"prompt": "a"}], "T")


def test_greedy_scores_chunks_grades_and_keeps_the_rng():
    """The one greedy scorer: chunks of ``batch_size`` in order, greedy sampling, the reward as a float, the training
    RNG untouched even by an engine that draws from it; a failing chunk raises, or with ``never_raise`` scores 0."""
    from types import SimpleNamespace

    from p2o_lightning.greedy import greedy_accuracy, greedy_scores

    calls = []

    def sample(prompts, answers, sampling):
        calls.append((list(prompts), sampling.n, sampling.temperature, sampling.max_new_tokens))
        torch.rand(3)  # an engine that draws random numbers even when greedy
        if "boom" in prompts:
            raise RuntimeError("out of memory (simulated)")
        rewards = [1 if p == a else 0 for p, a in zip(prompts, answers)]  # an int reward comes back as a float
        return SimpleNamespace(texts=[p.upper() for p in prompts]), SimpleNamespace(rewards=rewards, feedback=prompts)

    module = SimpleNamespace(device=torch.device("cpu"), sample=sample)
    prompts, answers = ["a", "b", "c", "d", "e"], ["a", "x", "c", "x", "e"]
    state = torch.get_rng_state()
    scored = greedy_scores(module, prompts, answers, max_new_tokens=7, batch_size=2)
    assert torch.equal(state, torch.get_rng_state())
    # chunks [a, b], [c, d], [e]: one greedy sample each, 7 new tokens
    assert calls == [(["a", "b"], 1, 0.0, 7), (["c", "d"], 1, 0.0, 7), (["e"], 1, 0.0, 7)]
    assert scored == [("A", 1.0, "a"), ("B", 0.0, "b"), ("C", 1.0, "c"), ("D", 0.0, "d"), ("E", 1.0, "e")]
    assert all(type(reward) is float for _, reward, _ in scored)
    calls.clear()
    assert greedy_scores(module, prompts, answers, max_new_tokens=7, batch_size=None) == scored and len(calls) == 1
    assert greedy_accuracy(module, prompts, answers, max_new_tokens=7) == 3 / 5
    assert math.isnan(greedy_accuracy(module, [], [], max_new_tokens=7))
    with pytest.raises(RuntimeError, match="out of memory"):
        greedy_scores(module, ["a", "boom"], ["a", "x"], max_new_tokens=7)
    failed = greedy_scores(module, ["a", "b", "boom"], ["a", "x", "x"], 7, batch_size=2, never_raise=True)
    assert failed[:2] == [("A", 1.0, "a"), ("B", 0.0, "b")]
    assert failed[2][:2] == ("", 0.0) and "RuntimeError: out of memory" in failed[2][2]
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        greedy_scores(module, ["a", "b"], ["a"], max_new_tokens=7)
