"""DAPO dynamic sampling: which groups are kept (by hand), resume equality, and the P²O callback sees dropped groups."""

import lightning as L
import pytest
import torch
from helpers import KillAt, read_csv, small_data, small_module, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from p2o_lightning.callbacks import P2OCallback
from p2o_lightning.prompt.schedule import ScheduleSettings
from p2o_lightning.step.batch import RolloutBatch
from p2o_lightning.step.dynamic import check_dynamic_sampling, dynamic_sample
from p2o_lightning.step.plan import plan_rollouts

# rewards of each prompt's K = 2 rollouts: "ab…" prompts have spread (kept), "zz…" prompts do not (dropped)
REWARDS = {"ab": [1.0, 0.0], "abc": [0.0, 1.0], "zz": [0.0, 0.0], "zzz": [1.0, 1.0], "abcd": [1.0, 0.0]}


def _sample_groups(rows):
    """A stand-in for the engine + grader: prompt ids of the prompt's length (so rounds differ in width)."""
    prompts = [row["prompt"] for row in rows]
    plan = plan_rollouts(prompts, {}, num_rollouts=2)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + [7] * len(p) for p in plan.prompts])  # [M, P] left-padded
    response = torch.tensor([[5, 6, 9][: 1 + len(p) % 3] + [0] * (2 - len(p) % 3) for p in plan.prompts])  # [M, 3]
    return RolloutBatch(
        plan=plan, answers=["1"] * len(plan.prompts), sampled_prompt_ids=ids, sampled_prompt_mask=(ids > 0).long(),
        prompt_ids=ids, prompt_mask=(ids > 0).long(), response_ids=response, response_mask=(response > 0).long(),
        texts=list(plan.prompts), rewards=torch.tensor([REWARDS[p] for p in prompts]),
    )  # fmt: skip


def _rows(*prompts):
    return [{"prompt": p, "answer": "1"} for p in prompts]


def test_dynamic_sample_keeps_informative_groups_by_hand():
    extra = iter([_rows("zzz", "abc"), _rows("abcd", "zz"), _rows("ab", "ab")])
    kept, seen, rounds = dynamic_sample(_sample_groups, _rows("ab", "zz"), lambda: next(extra), max_rounds=3)
    # round 1: "ab" kept, "zz" dropped (1 of 2); round 2: "zzz" dropped, "abc" kept (2 of 2): full, stop
    assert rounds == 2 and seen.plan.prompts[::2] == ["ab", "zz", "zzz", "abc"]
    assert kept.plan.prompts == ["ab", "ab", "abc", "abc"] and kept.rewards.tolist() == [[1, 0], [0, 1]]
    # rows of both rounds are padded to common widths: round 1 prompts are 2 wide, round 2's 3
    assert seen.sampled_prompt_ids.shape == (8, 3) and seen.sampled_prompt_ids[0].tolist() == [0, 7, 7]
    assert kept.response_ids.shape[0] == kept.response_mask.shape[0] == 4 and len(kept.texts) == 4
    # the rounds run out (max 2): kept "ab", then filled with the first dropped group "zz" (zero advantage)
    extra = iter([_rows("zzz", "zz")])
    kept, seen, rounds = dynamic_sample(_sample_groups, _rows("ab", "zz"), lambda: next(extra), max_rounds=2)
    assert rounds == 2 and kept.plan.prompts[::2] == ["ab", "zz"] and seen.num_groups == 4
    # one round is plain GRPO: nothing dropped, nothing drawn
    kept, seen, rounds = dynamic_sample(_sample_groups, _rows("zz", "zz"), None, max_rounds=1)
    assert kept is seen and rounds == 1
    # every rank takes a further round while any rank is short, also a rank that is already full
    extra = iter([_rows("zz", "zz")])
    _, _, rounds = dynamic_sample(_sample_groups, _rows("ab", "abc"), lambda: next(extra), 2, any_rank=lambda s: True)
    assert rounds == 2


def test_dynamic_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="dynamic_sampling='sometimes' is unknown"):
        small_module("/does/not/exist", dynamic_sampling="sometimes")
    with pytest.raises(ValueError, match="max_sampling_rounds=0 must be >= 1"):
        check_dynamic_sampling("filter", 0)
    with pytest.raises(ValueError, match="object has no extra_batch"):
        check_dynamic_sampling("filter", 3, object())


def test_dynamic_sampling_resumes_exactly_and_the_callback_sees_dropped_groups(tiny_world, tmp_path):
    """The tiny world fails most groups: every step runs its 3 rounds, drawing extra prompts, and still resumes."""

    def run(root, ckpt_path=None, kill_at=None):
        L.seed_everything(0)
        module = small_module(tiny_world, dynamic_sampling="filter", max_sampling_rounds=3)
        p2o = P2OCallback(schedule=ScheduleSettings(trigger="steps", every_n_steps=1000, min_hard_samples=10**6))
        callbacks = [p2o, ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=0)]
        callbacks += [KillAt(kill_at)] if kill_at else []
        t = trainer(root, max_steps=4, callbacks=callbacks, limit_val_batches=0)
        t.fit(module, datamodule=small_data(batch_size=2), ckpt_path=ckpt_path)
        return p2o

    full = run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path / "resumed", kill_at=3)
    run(tmp_path / "resumed", ckpt_path="last")
    a, b = read_csv(tmp_path / "full/run/metrics.csv"), read_csv(tmp_path / "resumed/run/metrics.csv")
    assert all(float(a[s]["train/sampling_rounds"]) == 3 for s in range(4))  # 2 extra batches drawn per step
    assert sum(float(a[s]["train/dropped_groups"]) for s in range(4)) > 0
    for step in (2, 3):
        for key in ("train/reward", "train/loss", "train/entropy", "train/dropped_groups", "p2o/hard_pool"):
            assert float(a[step][key]) == pytest.approx(float(b[step][key]), rel=1e-5, abs=1e-7), (step, key)
    # the hard pool holds prompts of the extra rounds too: more than the 4 steps × 2 prompts of the batches
    assert len(full.schedule.hard_pool) > 8
