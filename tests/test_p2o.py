"""P²O end to end: the adapter's contract, the callback's state, and a real P²O fit on the embedded world."""

import dataclasses

import lightning as L
import pytest
import torch
from helpers import KillAt, read_csv, small_data, small_module, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from p2o_lightning.callbacks import P2OCallback
from p2o_lightning.prompt.adapter import P2OAdapter
from p2o_lightning.prompt.record import SearchRecord, read_records
from p2o_lightning.prompt.reflection import OfflineProposer
from p2o_lightning.prompt.schedule import ScheduleSettings
from p2o_lightning.prompt.search import SearchSettings


def loaded(module):
    module.configure_model()
    return module


def test_adapter_contract_and_no_raise(tiny_world):
    module = loaded(small_module(tiny_world))
    module.policy.train()
    adapter = P2OAdapter(module, max_new_tokens=8, batch_size=2)
    batch = [
        {"prompt": "12+30=", "answer": "42"},
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "5+5=", "answer": "10"},
    ]
    out = adapter.evaluate(batch, {"template": "Add the digits."}, capture_traces=True)
    assert len(out.outputs) == len(out.scores) == len(out.trajectories) == 3
    assert all(s in (0.0, 1.0) for s in out.scores) and adapter.num_examples == 3
    assert module.policy.training  # evaluation restored training mode
    data = adapter.make_reflective_dataset({"template": "x"}, out, ["template"])
    assert len(data["template"]) == 3 and "correct answer is '42'" in data["template"][0]["Feedback"]
    assert adapter.evaluate(batch, {"template": ""}).trajectories is None

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    module.sample = broken  # a failing batch scores 0 and says why, never raises
    out = adapter.evaluate(batch, {"template": "Add."}, capture_traces=True)
    assert out.scores == [0.0, 0.0, 0.0] and "out of memory" in out.trajectories[0]["feedback"]


def test_callback_rejects_bad_settings(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="trigger='sometimes'"):
        ScheduleSettings(trigger="sometimes")
    with pytest.raises(ValueError, match="search_patience must be >= 1 or null, got 0"):
        SearchSettings(search_patience=0)
    callback = P2OCallback(schedule=ScheduleSettings(tau=9))
    t = trainer(tmp_path, max_steps=1, callbacks=[callback])
    with pytest.raises(ValueError, match=r"schedule.tau=9 is larger than K=num_rollouts=4"):
        t.fit(small_module(tiny_world), datamodule=small_data())


def test_callback_state_round_trip():
    callback = P2OCallback(reflection=OfflineProposer(vocabulary=["add", "carry"], seed=3))
    schedule = callback.schedule
    schedule.hard_pool = {"12345+67890=": "80235"}
    schedule.assignments = {"99999+1=": ["Add the digits."] * 4}
    schedule.searches = [SearchRecord(rollout_step=3, templates=["", "Add."], dev_mean=[0.0, 0.5])]
    schedule.recent_all_wrong = [0.5, 0.75]
    schedule.last_search_step = 12
    callback.reflection.mutate("add", 3)
    state = callback.state_dict()
    other = P2OCallback(reflection=OfflineProposer(vocabulary=["add", "carry"], seed=0))
    other.load_state_dict(state)
    assert other.state_dict() == state and other.schedule.searches == schedule.searches
    assert other.reflection.mutate("add", 2) == callback.reflection.mutate("add", 2)


def test_search_record_file_round_trip(tmp_path):
    """A record is written atomically and read back equal; a file that is not one is named, or passed over."""
    record = SearchRecord(
        rollout_step=24, epoch=0, num_hard=3, num_train=2, num_dev=1, templates=["", "Add."], parents=[[None], [0]],
        dev_mean=[0.0, 1.0], dev_scores=[{"1+1=": 0.0}, {"1+1=": 1.0}], pareto_front={"1+1=": [1]},
        discovery_eval_counts=[0, 3], metric_calls=4, evaluations=2, cover=[1], assignments={"1+1=": ["Add."] * 2},
        seconds=1.5, cpu_seconds=1.25,
    )  # fmt: skip
    path = record.write(tmp_path / "p2o", 0)
    assert path.name == "search_000.json" and not list((tmp_path / "p2o").glob("*.tmp"))
    assert SearchRecord.read(path) == record and record.best == 1 and record.ranked(1) == [1]
    assert SearchRecord.skipped(5, 1, "teacher down").best is None
    (tmp_path / "p2o" / "search_001.json").write_text('{"rollout_st')  # a copy cut short
    with pytest.raises(ValueError, match=r"search_001.json: not a search record"):
        read_records(tmp_path)
    assert read_records(tmp_path, strict=False) == [record]
    with pytest.raises(ValueError, match=r"unknown fields \['dev_means'\]"):
        SearchRecord.from_dict({"dev_means": [0.0]})


def test_search_and_state_survive_a_kill(tiny_world, tmp_path):
    """A run killed after a search and resumed keeps the hard pool, searches and RNG: steps after the kill match."""

    def run(root, ckpt_path=None, kill_at=None):
        L.seed_everything(0)
        callback = P2OCallback(
            schedule=ScheduleSettings(trigger="steps", every_n_steps=2, min_hard_samples=4,
                                      clear_pool_after_search=False),
            search=SearchSettings(dev_size=4, max_metric_calls=40, parents_per_iteration=2),
        )  # fmt: skip
        callbacks = [ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=0)]
        callbacks += [callback] + ([KillAt(kill_at)] if kill_at else [])
        t = trainer(root, max_steps=4, callbacks=callbacks, limit_val_batches=0)
        t.fit(small_module(tiny_world), datamodule=small_data(batch_size=2), ckpt_path=ckpt_path)
        return callback

    full = run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path / "resumed", kill_at=3)
    resumed = run(tmp_path / "resumed", ckpt_path="last")
    assert len(full.schedule.searches) == len(resumed.schedule.searches) == 2
    timed = ("seconds", "cpu_seconds")  # what a search cost in time differs between runs; all else is equal
    untimed = [{k: v for k, v in s.to_dict().items() if k not in timed} for s in full.schedule.searches]
    assert untimed == [{k: v for k, v in s.to_dict().items() if k not in timed} for s in resumed.schedule.searches]
    assert full.schedule.hard_pool == resumed.schedule.hard_pool
    assert full.reflection.state_dict() == resumed.reflection.state_dict()
    assert read_records(tmp_path / "full/run") == full.schedule.searches  # the files say what the state holds
    a, b = read_csv(tmp_path / "full/run/metrics.csv"), read_csv(tmp_path / "resumed/run/metrics.csv")
    searched = [r for _, r in sorted(a.items()) if "p2o/search_metric_calls" in r]  # what each search cost
    for key, field in (("p2o/search_metric_calls", "metric_calls"), ("p2o/search_evaluations", "evaluations")):
        assert {int(float(r[key])) for r in searched} == {getattr(s, field) for s in full.schedule.searches}
    assert all(float(r["time/search_s"]) > 0 for r in searched)
    for step in (2, 3):
        for key in ("train/reward", "train/entropy", "p2o/hard_pool"):
            assert float(a[step][key]) == pytest.approx(float(b[step][key]), rel=1e-5), (step, key)


@pytest.mark.slow
def test_p2o_fit_rescues_hard_prompts(default_world, tmp_path):
    """A short real P²O fit: the search runs, templates reach hard prompts, and their groups get a gradient."""
    import json

    from p2o_lightning.data import PromptDataModule
    from p2o_lightning.module import P2OModule
    from p2o_lightning.tasks.addition import world_splits

    # 32 training problems = 2 steps of 16: the search at the end of epoch 0 assigns templates to the hard ones,
    # which come round again in epoch 1 (as in the paper, templates apply to the same prompts next epoch)
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in world_splits()["train"][:32])
    )
    L.seed_everything(0)
    callback = P2OCallback(
        reflection=OfflineProposer(seed=0), schedule=ScheduleSettings(trigger="epoch", min_hard_samples=8),
        search=SearchSettings(dev_size=300, max_metric_calls=300, parents_per_iteration=4), seed=0,
    )  # fmt: skip
    module = P2OModule(
        model=str(default_world), rollout={"num_rollouts": 8, "max_new_tokens": 48}, update={"micro_batch_size": 64},
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4), validation={"num_samples": 0},
    )  # fmt: skip
    data = PromptDataModule(train_file=str(train), val_files={"dev": str(train)}, batch_size=16)
    t = trainer(tmp_path, max_steps=4, callbacks=[callback], limit_val_batches=0)
    t.fit(module, datamodule=data)

    assert len(callback.schedule.searches) >= 1
    search = callback.schedule.searches[0]
    assert max(search.dev_mean) > search.dev_mean[0]  # a template beats the plain prompt on hard problems
    assert search.assignments and all(len(v) == 8 for v in search.assignments.values())
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    # at the end of epoch 1 the plain-prompt accuracy of the prompts that held templates was measured
    assert any(r.get("p2o/distilled_greedy_acc", "") != "" for r in rows.values())
    after = [rows[s] for s in sorted(rows) if s >= 2 and "p2o/templated_share" in rows[s]]
    assert any(float(r["p2o/templated_share"]) > 0 for r in after)
    assert sum(float(r["p2o/rescued_groups"]) for r in after) > 0  # hard groups whose advantage is not all zero
    assert any(float(r["train/grad_norm"]) > 0 for r in after)


def test_self_reflection_uses_the_frozen_reference(tiny_world):
    from p2o_lightning.prompt.reflection import ReflectionError, SelfReflection

    backend = SelfReflection(max_new_tokens=6, temperature=1.0)
    with pytest.raises(ReflectionError, match="not bound"):
        backend("Write a better instruction.")
    module = loaded(small_module(tiny_world))
    backend.bind(module)
    rng = torch.get_rng_state()
    reply = backend("Write a better instruction.")
    assert isinstance(reply, str) and len(reply) <= 6
    assert torch.equal(rng, torch.get_rng_state())  # reflection never shifts the training RNG
    assert backend.gepa_kwargs() == {"reflection_lm": backend}


def test_template_pool_file_is_checked_and_loaded(tmp_path):
    from p2o_lightning.prompt.record import read_assignments

    bad = tmp_path / "pool.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"pool.json: not a search record"):
        read_assignments(bad, 4)
    bad.write_text('{"assignments": {"1+1=": ["Add."]}}')
    with pytest.raises(ValueError, match=r"pool.json: prompt '1\+1=' must map to a list of K=4 template strings"):
        read_assignments(bad, 4)
    bad.write_text('{"templates": ["", "Add."]}')  # a record that assigned nothing (a skipped search)
    with pytest.raises(ValueError, match=r"pool.json: expected a non-empty 'assignments' mapping"):
        read_assignments(bad, 4)
    with pytest.raises(ValueError, match="missing.json: cannot be read"):
        read_assignments(tmp_path / "missing.json", 4)
    good = tmp_path / "search_000.json"
    good.write_text('{"templates": ["", "Add."], "assignments": {"1+1=": ["Add.", "Add.", "", "Add."]}}')
    assert read_assignments(good, 4) == {"1+1=": ["Add.", "Add.", "", "Add."]}


def test_callback_wires_the_schedule_to_the_trainer(monkeypatch, tmp_path):
    """The callback hands the module each search's templates, expires them at the epoch end after the one they applied
    in, and logs the plain-prompt greedy accuracy of the prompts that held them, with its cost apart. (The lifetime
    rules themselves are the schedule's, tested in test_schedule.py.)"""
    from types import SimpleNamespace

    import p2o_lightning.callbacks as callbacks

    def record(assignments):
        return SearchRecord(templates=["", "T."], dev_mean=[0.0, 1.0], assignments=assignments)

    logged = {}
    module = SimpleNamespace(
        rollout=SimpleNamespace(num_rollouts=2, max_new_tokens=8),
        device=torch.device("cpu"),
        template_assignments={},
        rollout_steps=0,
        log=lambda key, value, **kw: logged.__setitem__(key, value),
        # the plain-prompt greedy check: "a" is now solved without its template, "b" not
        sample=lambda prompts, answers, sampling: (
            SimpleNamespace(texts=[""] * len(prompts)),
            SimpleNamespace(rewards=[1.0 if p == "a" else 0.0 for p in prompts], feedback=[""] * len(prompts)),
        ),
    )
    trainer = SimpleNamespace(
        current_epoch=0, is_global_zero=True, strategy=SimpleNamespace(broadcast=lambda obj, src: obj),
        logger=None, default_root_dir=str(tmp_path),
    )  # fmt: skip
    searches = iter([record({"a": ["T."] * 2, "b": ["T."] * 2}), record({"c": ["U."] * 2})])
    ran = []

    def run_search(module, hard_pool, reflection, settings, previous, **where):
        ran.append((sorted(hard_pool), len(previous), where["rollout_step"], where["epoch"], where["folder"]))
        return next(searches), 3

    monkeypatch.setattr(callbacks, "run_search", run_search)
    callback = P2OCallback(schedule=ScheduleSettings(min_hard_samples=2))
    callback.setup(trainer, module, "validate")
    # epoch 0: a, b hard -> search -> their templates for epoch 1
    callback.schedule.hard_pool = {"a": "2", "b": "4"}
    callback.on_train_epoch_end(trainer, module)
    assert module.template_assignments == {"a": ["T."] * 2, "b": ["T."] * 2} and callback.examples_scored == 3
    assert ran == [(["a", "b"], 0, 0, 0, tmp_path / "p2o")] and logged["p2o/searches"] == 1.0
    assert "p2o/distilled_greedy_acc" not in logged  # no template applied in epoch 0
    # epoch 1: c, d hard -> a, b expire, c gets templates
    callback.schedule.hard_pool = {"c": "6", "d": "8"}
    trainer.current_epoch = 1
    callback.on_train_epoch_end(trainer, module)
    assert logged["p2o/distilled_greedy_acc"] == 0.5  # of a and b, under the plain prompt: a solved, b not
    assert logged["time/distilled_eval_s"] > 0 and logged["time/distilled_eval_cpu_s"] >= 0  # its cost, apart
    assert module.template_assignments == {"c": ["U."] * 2} and logged["p2o/assigned_prompts"] == 1.0
    # epoch 2: too few hard samples: no search, and c's templates expire
    callback.schedule.hard_pool = {"e": "10"}
    trainer.current_epoch = 2
    callback.on_train_epoch_end(trainer, module)
    assert module.template_assignments == {} and len(ran) == 2


def test_search_runs_without_a_trainer_and_stops_on_patience(tiny_world):
    """One GEPA search is a function of the policy: the record's cost, assignments and dev scores add up; a
    patience of 2 iterations without a better best dev score stops it long before its budget, which alone runs to
    the end."""
    from p2o_lightning.prompt.search import search_templates

    module = loaded(small_module(tiny_world))
    pool = {f"{a}+{b}=": str(a + b) for a, b in [(13, 29), (7, 48), (35, 35), (61, 9), (22, 17), (40, 44), (5, 5)]}
    reflection = OfflineProposer(max_words=3, seed=0)
    reflection.bind(module)
    runs = {}
    for patience in (2, None):
        settings = SearchSettings(dev_size=2, max_metric_calls=120, search_patience=patience, parents_per_iteration=1)
        runs[patience] = search_templates(
            module, pool, reflection, settings, num_rollouts=4, max_new_tokens=8, seed=0, index=0
        )
    stopped, full = runs[2], runs[None]
    assert stopped.num_dev == 2 and stopped.num_train == 5  # dev_size caps half of the pool (3)
    assert full.metric_calls >= 120 > 4 * stopped.metric_calls
    assert len(stopped.dev_mean) == len(stopped.templates) == len(stopped.dev_scores)
    assert set(stopped.assignments) <= set(pool) and all(len(t) == 4 for t in stopped.assignments.values())


def test_warm_start_seeds_the_search_with_the_last_best_template(tiny_world):
    """With warm_start a search is seeded with the best template of the last search that found one (candidate 0 of
    the next record); without it, or before any search, the seed is the empty template (the paper)."""
    from p2o_lightning.prompt.record import SearchRecord
    from p2o_lightning.prompt.search import pick_seed_template, search_templates

    def record(templates, dev_mean):
        return dataclasses.replace(SearchRecord.skipped(0, 0, ""), templates=templates, dev_mean=dev_mean)

    assert pick_seed_template([], warm_start=True) == ""  # no search yet
    previous = [record(["", "Carry."], [0.1, 0.6]), record([], []), record([""], [0.0])]
    assert pick_seed_template(previous, warm_start=True) == "Carry."
    assert pick_seed_template(previous, warm_start=False) == ""
    module = loaded(small_module(tiny_world))
    pool = {f"{a}+{b}=": str(a + b) for a, b in [(13, 29), (7, 48), (35, 35), (61, 9), (22, 17)]}
    reflection = OfflineProposer(max_words=3, seed=0)
    reflection.bind(module)
    settings = SearchSettings(dev_size=2, max_metric_calls=30, search_patience=1, parents_per_iteration=1)
    found = search_templates(
        module, pool, reflection, settings, num_rollouts=4, max_new_tokens=8, seed=0, index=1,
        seed_template=pick_seed_template(previous, warm_start=True),
    )  # fmt: skip
    assert found.templates[0] == "Carry."


def test_reference_is_loaded_only_when_used(tiny_world):
    """kl_coef 0 and no self-reflection: the frozen copy is never loaded; first use loads the initial weights, frozen,
    without touching the run's RNG."""
    module = loaded(small_module(tiny_world))
    assert module._reference == []
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(1.0)  # training moved the policy; the reference keeps the checkpoint's weights
    rng = torch.get_rng_state()
    ref = module.reference
    assert torch.equal(rng, torch.get_rng_state())
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    fresh = loaded(small_module(tiny_world))
    for (name, a), b in zip(ref.named_parameters(), fresh.policy.parameters()):
        assert torch.equal(a, b), name
    assert module.reference is ref  # loaded once
