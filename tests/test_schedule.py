"""P²O's schedule without Lightning: which prompts are hard, when a search runs, how long its templates live."""

import json

import pytest
import torch

from p2o_lightning.prompt.record import SearchRecord
from p2o_lightning.prompt.schedule import P2OSchedule, ScheduleSettings, hard_groups


def record(assignments, dev_mean=(0.0, 1.0)):
    return SearchRecord(templates=["", "T."], dev_mean=list(dev_mean), assignments=assignments, cpu_seconds=0.5)


def test_hard_groups_by_hand():
    # K = 4, τ = 2: hard = at most a share 1/4 of the counted rollouts correct
    rewards = torch.tensor(
        [
            [0.0, 1.0, 0.0, 0.0],  # plain group, 1 of 4 correct: hard (near-hard)
            [1.0, 1.0, 0.0, 0.0],  # plain group, 2 of 4: not hard
            [1.0, 1.0, 1.0, 0.0],  # templated, rows 0-2 templated (all solved), row 3 plain and wrong
            [1.0, 1.0, 1.0, 1.0],  # templated, the plain row 3 solved too
            [1.0, 1.0, 1.0, 0.0],  # templated without plain rows
        ]
    )
    plain = torch.tensor([[True] * 4, [True] * 4, [False] * 3 + [True], [False] * 3 + [True], [False] * 4])
    # plain: row 2's plain rollout failed (0 of 1 <= 1/4): still hard although its templates solve it; row 3's plain
    # rollout succeeded (1 of 1): not hard; row 4 has no plain row: counted on all K (3 of 4): not hard
    assert hard_groups(rewards, plain, tau=2, hardness="plain").tolist() == [True, False, True, False, False]
    # sampled (the reference): all K rows as sampled
    assert hard_groups(rewards, plain, tau=2, hardness="sampled").tolist() == [True, False, False, False, False]
    assert hard_groups(rewards, None, tau=2, hardness="plain").tolist() == [True, False, False, False, False]
    # the schedule reads a step's outputs: prompts and answers of the hard groups, in order
    outputs = {"prompts": list("abcde"), "answers": list("12345"), "rewards": rewards, "plain_rows": plain}
    assert P2OSchedule().hard_samples(outputs) == [("a", "1"), ("c", "3")]
    assert P2OSchedule(ScheduleSettings(hardness="sampled")).hard_samples(outputs) == [("a", "1")]
    # τ = 3: at most 2 of 4 correct; the schedule's own τ decides
    assert P2OSchedule(ScheduleSettings(tau=3)).hard_samples(outputs) == [("a", "1"), ("b", "2"), ("c", "3")]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(trigger="sometimes"), "trigger='sometimes' is unknown"),
        (dict(hardness="templated"), "hardness='templated' is unknown"),
        (dict(template_lifetime="never"), "template_lifetime='never' is unknown"),
        (dict(tau=0), "tau must be >= 1, got 0"),
        (dict(min_hard_samples=1), "min_hard_samples must be >= 2"),
        (dict(every_n_steps=0), "every_n_steps and collapse_window must be >= 1"),
    ],
)
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        ScheduleSettings(**settings)


def test_group_size_check_names_tau_and_k():
    ScheduleSettings(tau=4).check_group_size(4)
    with pytest.raises(ValueError, match=r"schedule.tau=5 is larger than K=num_rollouts=4"):
        ScheduleSettings(tau=5).check_group_size(4)


def test_steps_trigger_fires_every_n_steps():
    schedule = P2OSchedule(ScheduleSettings(trigger="steps", every_n_steps=3))
    assert [step for step in range(1, 10) if schedule.search_due(step)] == [3, 6, 9]
    assert not P2OSchedule(ScheduleSettings(trigger="epoch")).search_due(50)  # the epoch trigger: at the epoch end


def test_collapse_trigger_reads_a_full_window_and_keeps_its_gap():
    settings = ScheduleSettings(trigger="collapse", collapse_window=3, collapse_threshold=0.5, every_n_steps=4)
    schedule = P2OSchedule(settings)
    fired = []
    # all-wrong shares per step 1..10: the mean of the last 3 reaches 0.5 from step 3 on (0.4, 0.5, 0.6 -> 0.5)
    for step, share in enumerate([0.4, 0.5, 0.6, 0.9, 0.9, 0.9, 0.9, 0.0, 0.0, 0.0], start=1):
        schedule.collect([], share)
        if schedule.search_due(step):
            fired.append(step)
            schedule.start_search(step)  # where the callback searches, the gap starts again
    # step 3 fires (window full, mean 0.5); steps 4-6 are within the gap of 4; step 7 fires (mean 0.9);
    # step 8: mean 0.6 but within the gap; steps 9-10: means 0.3, 0.0
    assert fired == [3, 7]
    assert schedule.recent_all_wrong == [0.0, 0.0, 0.0]  # the last collapse_window steps only


def test_a_search_needs_min_hard_samples_and_the_epoch_trigger_collects_per_epoch(caplog):
    schedule = P2OSchedule(ScheduleSettings(min_hard_samples=3))
    schedule.collect([("a", "1"), ("b", "2")], 0.0)
    schedule.collect([("a", "1")], 0.0)  # a prompt hard again is one hard sample
    assert schedule.hard_pool == {"a": "1", "b": "2"}
    assert not schedule.start_search(step=7) and schedule.last_search_step == 7
    assert "search due at RL step 7 skipped: 2 hard samples < min_hard_samples=3" in caplog.text  # said, not silent
    assert schedule.hard_pool == {}  # the reference collects hard samples per epoch, searched or not
    steps = P2OSchedule(ScheduleSettings(trigger="steps", min_hard_samples=3))
    steps.collect([("a", "1"), ("b", "2")], 0.0)
    assert not steps.start_search(step=7) and steps.hard_pool == {"a": "1", "b": "2"}  # the steps trigger keeps it
    steps.collect([("c", "3")], 0.0)
    assert steps.start_search(step=8)


@pytest.mark.parametrize("lifetime", ["epoch", "forever"])
def test_template_lifetime_epoch_as_the_reference(lifetime):
    """Templates apply in the epoch after their search only; a skipped search leaves none; forever keeps them."""
    schedule = P2OSchedule(ScheduleSettings(min_hard_samples=2, template_lifetime=lifetime))
    # epoch 0: a, b hard -> search -> their templates for epoch 1
    schedule.collect([("a", "2"), ("b", "4")], 0.0)
    assert schedule.distilled_prompts(0) is None  # nothing applied during epoch 0
    schedule.end_epoch(0)
    assert schedule.start_search(step=10)
    schedule.install(record({"a": ["T."] * 2, "b": ["T."] * 2}), epoch=0)
    assert schedule.assignments == {"a": ["T."] * 2, "b": ["T."] * 2} and schedule.hard_pool == {}
    assert schedule.assigned_answers == {"a": "2", "b": "4"}
    # epoch 1: c, d hard (a, b were rolled out with templates): a, b's plain accuracy is measured, then they expire
    schedule.collect([("c", "6"), ("d", "8")], 0.0)
    assert schedule.distilled_prompts(1) == (["a", "b"], ["2", "4"])
    schedule.end_epoch(1)
    assert schedule.start_search(step=20)
    schedule.install(record({"c": ["U."] * 2}), epoch=1)
    if lifetime == "epoch":
        assert schedule.assignments == {"c": ["U."] * 2}
        assert schedule.distilled_prompts(2) == (["c"], ["6"])
    else:
        assert set(schedule.assignments) == {"a", "b", "c"}
        assert schedule.distilled_prompts(2) == (["a", "b", "c"], ["2", "4", "6"])
    # epoch 2: too few hard samples, the search is skipped: under "epoch" nothing is left
    schedule.collect([("e", "10")], 0.0)
    schedule.end_epoch(2)
    assert not schedule.start_search(step=30)
    assert schedule.assignments == ({} if lifetime == "epoch" else {"a": ["T."] * 2, "b": ["T."] * 2, "c": ["U."] * 2})
    assert schedule.hard_pool == {}
    assert len(schedule.searches) == 2


def test_search_metrics_are_the_latest_search():
    schedule = P2OSchedule(ScheduleSettings(min_hard_samples=2))
    schedule.collect([("a", "2"), ("b", "4")], 0.0)
    schedule.install(record({"a": ["T."] * 2}, dev_mean=[0.25, 0.75]), epoch=0)
    metrics = schedule.search_metrics()
    assert metrics["p2o/searches"] == 1 and metrics["p2o/assigned_prompts"] == 1
    assert metrics["p2o/best_dev_score"] == 0.75


def test_state_round_trips_exactly_through_json():
    """A checkpoint holds plain JSON types; a schedule loaded from it continues exactly as the saved one."""
    settings = ScheduleSettings(trigger="collapse", collapse_window=2, every_n_steps=1, min_hard_samples=2)
    saved = P2OSchedule(settings)
    saved.collect([("12345+67890=", "80235"), ("1+1=", "2")], 0.75)
    saved.install(record({"1+1=": ["T."] * 2}), epoch=3)
    saved.collect([("9+9=", "18")], 0.25)
    saved.start_search(step=12)
    state = json.loads(json.dumps(saved.state_dict()))
    loaded = P2OSchedule(settings)
    loaded.load_state_dict(state)
    assert loaded.state_dict() == saved.state_dict() and loaded.searches == saved.searches
    for schedule in (saved, loaded):  # the same next steps
        schedule.collect([("2+2=", "4")], 0.5)
    assert loaded.search_due(13) == saved.search_due(13) and loaded.state_dict() == saved.state_dict()
    assert loaded.distilled_prompts(4) == saved.distilled_prompts(4) == (["1+1="], ["2"])
