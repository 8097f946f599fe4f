"""Resume anywhere: a 2-rank FSDP2 run with P²O, killed with ``kill -9``, resumes from its distributed checkpoint
(a folder) to the same weights, search state and metric rows as the uninterrupted run; the same checkpoint resumes
on 1 process without FSDP2 (consolidated) and on 3 ranks (DCP reshards), and a truncated one is named, not loaded.

The runs are subprocesses (Lightning launches the other ranks, gloo on CPU) of one script, shared by the tests
through a module fixture: the uninterrupted run, the killed run, and its checkpoint copied before each resume.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO, csv_rows

from p2o_lightning.checks import check_checkpoint_file
from p2o_lightning.cli import cli_main
from p2o_lightning.sharded import consolidated_checkpoint

SCRIPT = """
import dataclasses, json, os, signal, sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from p2o_lightning.callbacks import P2OCallback
from p2o_lightning.prompt.schedule import ScheduleSettings
from p2o_lightning.prompt.search import SearchSettings
from p2o_lightning.data import PromptDataModule
from p2o_lightning.module import P2OModule
from p2o_lightning.outputs import AtomicCheckpointIO, _full
from p2o_lightning.runs import RunCSVLogger, RunFolder
from p2o_lightning.sharded import FSDP2Strategy

cfg = json.loads(sys.argv[1])
root = Path(cfg["root"])


class ParityReward(P2OModule):  # rewarded 1 for an odd prompt + response length: spread within groups, and
    def sample(self, prompts, answers, sampling):  # templates that change the prompt's parity help the hard ones
        rollouts, grade = super().sample(prompts, answers, sampling)
        rows = [p for p in prompts for _ in range(sampling.n)]
        rewards = [float((len(p) + len(t)) % 2) for p, t in zip(rows, rollouts.texts)]
        return rollouts, dataclasses.replace(grade, rewards=rewards)


class Record(L.Callback):
    # the state at train start (what was restored) and at the end: full weights and AdamW moments on rank 0,
    # P²O state on every rank; `kill -9` of every rank just before RL step cfg["kill_at"]
    def _save(self, trainer, pl_module, tag):
        weights = {k: _full(v) for k, v in pl_module.policy.state_dict().items()}  # a collective under FSDP2
        opt = trainer.optimizers[0]
        moments = {n: _full(opt.state[p]["exp_avg"]) for n, p in pl_module.policy.named_parameters() if p in opt.state}
        p2o = next(c for c in trainer.callbacks if isinstance(c, P2OCallback))
        state = {"rollout_steps": pl_module.rollout_steps, "global_step": trainer.global_step,
                 "assignments": pl_module.template_assignments,
                 "searches": [s.to_dict() for s in p2o.schedule.searches], "hard_pool": p2o.schedule.hard_pool}
        (root / f"{tag}_rank{trainer.global_rank}.json").write_text(json.dumps(state, sort_keys=True))
        if trainer.is_global_zero:
            torch.save({"weights": weights, "exp_avg": moments}, root / f"{tag}.pt")

    def on_train_start(self, trainer, pl_module):
        self._save(trainer, pl_module, "start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.rollout_steps == cfg.get("kill_at"):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module, "end")


if cfg.get("die_in_save"):  # kill -9 in that save, once DCP has written every shard (before the swap)
    import torch.distributed.checkpoint as dcp

    real_save, saves = dcp.save, []

    def dying_save(*args, **kwargs):
        saves.append(1)
        real_save(*args, **kwargs)
        if len(saves) == cfg["die_in_save"]:
            os.kill(os.getpid(), signal.SIGKILL)

    dcp.save = dying_save

L.seed_everything(0)
module = ParityReward(model=cfg["world"], rollout={"num_rollouts": 4, "max_new_tokens": 8},
                      update={"micro_batch_size": 8, "warmup_steps": 2}, validation={"num_samples": 0},
                      optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
p2o = P2OCallback(schedule=ScheduleSettings(trigger="steps", every_n_steps=2, min_hard_samples=2,
                                            template_lifetime="forever", clear_pool_after_search=False),
                  search=SearchSettings(dev_size=4, max_metric_calls=24, parents_per_iteration=2))
checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=0)
fsdp = cfg["fsdp"]
trainer = L.Trainer(accelerator="cpu", devices=cfg["devices"], strategy=FSDP2Strategy() if fsdp else "auto",
                    plugins=[] if fsdp else [AtomicCheckpointIO()], max_steps=cfg["max_steps"],
                    logger=RunCSVLogger(root, name="run"), callbacks=[RunFolder(), p2o, checkpoints, Record()],
                    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                    num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
# 12 problems = 3 steps of 2 prompts on each of 2 ranks: a search at steps 2 and 4, whose templates the hard prompts
# meet again in the next epoch
train = root / "train.jsonl"
train.write_text("".join(json.dumps({"prompt": f"{i}+{i + 3}=", "answer": str(2 * i + 3)}) + "\\n" for i in range(12)))
data = PromptDataModule(batch_size=2, train_file=str(train), val_files={"dev": str(train)})
trainer.fit(module, datamodule=data, ckpt_path=cfg.get("ckpt_path"))
"""

MAX_STEPS, KILL_AT = 5, 3  # the checkpoint of the killed run is at step 2 (every 2 updates, one update per RL step)


def _run(tmp_path, world, root, devices=2, fsdp=True, **cfg):
    root.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "run_resume.py"
    script.write_text(SCRIPT)
    cfg = dict(world=str(world), root=str(root), devices=devices, fsdp=fsdp, max_steps=MAX_STEPS, **cfg)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # this checkout's package
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, str(script), json.dumps(cfg)], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
    """The uninterrupted 2-rank run, and the run killed (every rank, ``kill -9``) before RL step 3: its checkpoint
    (step 2) is kept in ``killed_ckpt`` before any resume writes over it."""
    tmp = tmp_path_factory.mktemp("resume")
    full = _run(tmp, tiny_world, tmp / "full")
    assert full.returncode == 0, full.stderr[-4000:]
    killed = _run(tmp, tiny_world, tmp / "killed", kill_at=KILL_AT)
    assert killed.returncode == -9, killed.stderr[-4000:]
    ckpt = tmp / "killed" / "ckpt" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()  # a distributed checkpoint: a folder of shards
    shutil.copytree(tmp / "killed", tmp / "killed_copy")  # resumed in place by one test, copied by the others
    return {"tmp": tmp, "world": tiny_world, "full": tmp / "full", "killed": tmp / "killed_copy"}


def _resume_copy(runs, name):
    """A fresh copy of the killed run's folder (its metrics rows and step-2 checkpoint) to resume in."""
    root = runs["tmp"] / name
    shutil.copytree(runs["killed"], root)
    return root


def _state(root, tag, rank=0):
    return json.loads((root / f"{tag}_rank{rank}.json").read_text())


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _assert_restored(start, runs):
    """The weights and AdamW moments a resumed run starts from are the killed run's checkpoint's; returns it."""
    saved = consolidated_checkpoint(runs["killed"] / "ckpt" / "last.ckpt")
    _assert_same_tensors(start["weights"], {k.removeprefix("policy."): v for k, v in saved["state_dict"].items()})
    moments = {k.removeprefix("policy."): v["exp_avg"] for k, v in saved["optimizer_states"][0]["state"].items()}
    _assert_same_tensors(start["exp_avg"], moments)
    return saved


def test_killed_fsdp2_run_resumes_as_if_never_stopped(runs):
    root = runs["tmp"] / "killed"  # resumed where it ran, with the same command plus --ckpt_path last
    proc = _run(runs["tmp"], runs["world"], root, ckpt_path="last")
    assert proc.returncode == 0, proc.stderr[-4000:]
    full, resumed = runs["full"], root
    assert _state(resumed, "start")["rollout_steps"] == 2  # restored at the checkpoint, on both ranks
    assert _state(resumed, "start", 1)["rollout_steps"] == 2
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == ["last.ckpt"]  # replaced in place
    # the weights, AdamW moments and P²O state at the end are those of the uninterrupted run, on every rank
    end_full, end_resumed = torch.load(full / "end.pt"), torch.load(resumed / "end.pt")
    assert any(not torch.equal(end_full["weights"][k], v) for k, v in torch.load(full / "start.pt")["weights"].items())
    _assert_same_tensors(end_full["weights"], end_resumed["weights"])
    _assert_same_tensors(end_full["exp_avg"], end_resumed["exp_avg"])
    for rank in (0, 1):
        a, b = _state(full, "end", rank), _state(resumed, "end", rank)
        assert a["searches"] and a["assignments"]  # two searches ran, templates were assigned
        for record in (*a["searches"], *b["searches"]):
            del record["seconds"], record["cpu_seconds"]  # the search's wall and CPU time
        assert a == b, rank
    # metrics.csv: the rows of the uninterrupted run, the same columns filled, the same values (times aside)
    rows_full, rows_resumed = csv_rows(full / "run" / "metrics.csv"), csv_rows(resumed / "run" / "metrics.csv")
    assert [r["step"] for r in rows_full] == [r["step"] for r in rows_resumed] == ["0", "1", "2", "3", "4"]
    for a, b in zip(rows_full, rows_resumed):
        assert a.keys() == b.keys(), a["step"]
        for key in (k for k in a if not k.startswith("time/")):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6, abs=1e-9), (a["step"], key)


def test_checkpoint_of_two_ranks_resumes_on_one_process_without_fsdp2(runs):
    root = _resume_copy(runs, "one")
    proc = _run(runs["tmp"], runs["world"], root, devices=1, fsdp=False, ckpt_path="last")
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = _assert_restored(torch.load(root / "start.pt"), runs)
    searches = json.loads(json.dumps(saved["callbacks"]["P2OCallback"]["searches"]))
    assert _state(root, "start")["searches"] == searches and searches
    assert _state(root, "end")["rollout_steps"] == MAX_STEPS  # and it trained on to the end
    rows = csv_rows(root / "run" / "metrics.csv")
    assert [int(r["step"]) for r in rows if "train/loss" in r] == list(range(MAX_STEPS))  # appended in place


def test_checkpoint_of_two_ranks_resumes_on_three(runs):
    root = _resume_copy(runs, "three")
    proc = _run(runs["tmp"], runs["world"], root, devices=3, ckpt_path="last")
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_restored(torch.load(root / "start.pt"), runs)  # resharded from 2 shards onto 3
    assert all(_state(root, "start", r)["rollout_steps"] == 2 for r in range(3))
    assert _state(root, "end")["rollout_steps"] == MAX_STEPS


def test_truncated_checkpoint_folder_is_named_not_loaded(runs, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    shutil.copytree(runs["killed"] / "ckpt" / "last.ckpt", ckpt)
    check_checkpoint_file(ckpt)  # whole: passes
    shard = sorted(ckpt.glob("*.distcp"))[-1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=rf"{ckpt} is an incomplete distributed checkpoint: its shard {shard.name} "):
        check_checkpoint_file(ckpt)
    shard.unlink()
    with pytest.raises(ValueError, match=rf"its shard {shard.name} is missing"):
        consolidated_checkpoint(ckpt)
    (ckpt / ".metadata").unlink()
    with pytest.raises(ValueError, match=r"without \.metadata \(a save that did not finish\)"):
        check_checkpoint_file(ckpt)


def test_truncated_last_checkpoint_is_named_when_resuming(runs):
    """``--ckpt_path last`` under FSDP2: the folder Lightning picks is checked on every rank before it loads."""
    root = _resume_copy(runs, "truncated")
    shard = sorted((root / "ckpt" / "last.ckpt").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    (root / "start.pt").unlink()  # the killed run's
    proc = _run(runs["tmp"], runs["world"], root, devices=1, ckpt_path="last")
    assert proc.returncode != 0
    assert f"last.ckpt is an incomplete distributed checkpoint: its shard {shard.name} holds 100 of" in proc.stderr
    assert not (root / "start.pt").exists()  # nothing trained


def test_truncated_checkpoint_folder_given_to_the_cli_is_named_before_anything_runs(runs, tmp_path, monkeypatch):
    ckpt = tmp_path / "last.ckpt"
    shutil.copytree(runs["killed"] / "ckpt" / "last.ckpt", ckpt)
    (ckpt / "meta.pt").write_bytes(b"half a")
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "configs" / "toy.yaml"), f"--model.model={runs['world']}"]
    with pytest.raises(ValueError, match=rf"^{ckpt / 'meta.pt'} is not a checkpoint of p2o-lightning: it does not"):
        cli_main([*args, f"--ckpt_path={ckpt}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # nothing was written


def test_data_position_is_kept_on_another_number_of_ranks(monkeypatch):
    import p2o_lightning.data as data

    batches = data.PromptBatches(num_rows=12, batch_size=2, seed=0)
    monkeypatch.setattr(data, "_rank_and_world", lambda: (0, 2))
    it = iter(batches)
    next(it), next(it)  # 2 steps of 2 prompts on each of 2 ranks: 8 prompts of the epoch's order consumed
    state = batches.state_dict()
    assert state == {"epoch": 0, "consumed": 2, "world": 2}
    for world, consumed in ((1, 4), (3, 1), (2, 2)):  # 8 prompts = 4 steps of 2, or 1 step of 6 (2 repeat)
        monkeypatch.setattr(data, "_rank_and_world", lambda world=world: (0, world))
        resumed = data.PromptBatches(num_rows=12, batch_size=2, seed=0)
        resumed.load_state_dict(state)
        assert resumed.yielded == consumed
    resumed.load_state_dict({"epoch": 0, "consumed": 2})  # a checkpoint written before the world size was saved
    assert resumed.yielded == 2


def test_kill_during_a_distributed_save_keeps_the_previous_checkpoint(runs, tmp_path):
    root = tmp_path / "dies"
    proc = _run(runs["tmp"], runs["world"], root, devices=1, die_in_save=2)  # the saves at steps 2 and 4
    assert proc.returncode == -9, proc.stderr[-4000:]
    last = root / "ckpt" / "last.ckpt"
    check_checkpoint_file(last)  # whole
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 2
    assert (root / "ckpt" / ".last.ckpt.tmp" / ".metadata").is_file()  # the new one was written beside it, not over it
