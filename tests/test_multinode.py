"""Many nodes: 2 nodes × 1 process on localhost (gloo, CPU), started as torchrun and as SLURM start them, FSDP2
over both and a P²O search: GEPA on global rank 0, every rank scoring its share, both ranks holding its templates,
and the run folder's metrics, searches, checkpoint and exported policy written once.

With one process per node both processes are ``local_rank`` 0: anything that picks "the writer" or "the searcher"
by local rank (or by ``LOCAL_RANK``) instead of the global rank runs twice here, and shows as duplicated rows,
a second search record, or ranks that disagree. Each "node" is a process launched as its launcher launches it:

- torchrun: ``python -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d`` started twice
  with the same rendezvous endpoint and id (the command each node of a cluster runs); Lightning reads the
  ``RANK`` / ``LOCAL_RANK`` / ``GROUP_RANK`` it sets (``TorchElasticEnvironment``).
- SLURM: the variables ``srun`` gives each task of ``--nodes 2 --ntasks-per-node 1`` (``SLURM_PROCID``,
  ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_NTASKS`` ...), no launcher (``SLURMEnvironment``).
- by hand: ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` on each node, Lightning's own launch
  (``LightningEnvironment``).

The launch scripts themselves (``scripts/launch_torchrun.sh``, ``scripts/launch_slurm.sbatch``) run the CLI the same
way, through a stand-in ``srun`` for SLURM; the second launch of the same command resumes the run (``--ckpt_path
last``), as a requeued job or a restarted node does.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, csv_rows, free_port, write_jsonl

from p2o_lightning.cli import cli_main
from p2o_lightning.nodes import NodeLaunchError

SCRIPT = """
import dataclasses, json, os, sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from p2o_lightning.callbacks import P2OCallback
from p2o_lightning.data import PromptDataModule
from p2o_lightning.module import P2OModule
from p2o_lightning.nodes import SharedFolders
from p2o_lightning.outputs import ExportPolicy, MetricsPlot
from p2o_lightning.prompt.schedule import ScheduleSettings
from p2o_lightning.prompt.search import SearchSettings
from p2o_lightning.runs import RunCSVLogger, RunFolder, run_paths
from p2o_lightning.sharded import FSDP2Strategy

world, root, train, options = sys.argv[1], Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
trainer_rank = lambda: int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


class ParityReward(P2OModule):  # rewarded 1 for an odd-length prompt: templates of odd length solve the others
    def sample(self, prompts, answers, sampling):
        rollouts, grade = super().sample(prompts, answers, sampling)
        rewards = [float(len(p) % 2) for p in prompts for _ in range(sampling.n)]
        return rollouts, dataclasses.replace(grade, rewards=rewards)


class Record(L.Callback):  # where each process stood, and what its P²O callback saw
    def on_fit_end(self, trainer, pl_module):
        p2o = next(c for c in trainer.callbacks if isinstance(c, P2OCallback))
        searches = p2o.schedule.searches
        record = {"global_rank": trainer.global_rank, "local_rank": trainer.local_rank, "node_rank": trainer.node_rank,
                  "world_size": trainer.world_size, "environment": type(trainer.strategy.cluster_environment).__name__,
                  "assignments": pl_module.template_assignments, "searches": len(searches),
                  "examples_scored": p2o.examples_scored, "metric_calls": [s.metric_calls for s in searches]}
        (root / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


L.seed_everything(0)
module = ParityReward(model=world, rollout={"num_rollouts": 4, "max_new_tokens": 8}, update={"micro_batch_size": 8},
                      validation={"num_samples": 0}, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
p2o = P2OCallback(schedule=ScheduleSettings(trigger="steps", every_n_steps=2, min_hard_samples=4,
                                            template_lifetime="forever", clear_pool_after_search=False),
                  search=SearchSettings(dev_size=4, max_metric_calls=40, parents_per_iteration=2))
run = root / "run"
checkpoints = ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, every_n_train_steps=2, save_top_k=0)
if options.get("node_disk") and trainer_rank() == 1:  # rank 1's shards land on its own node's disk, not the shared one
    import lightning.pytorch.strategies.model_parallel as model_parallel

    save = model_parallel._distributed_checkpoint_save
    model_parallel._distributed_checkpoint_save = lambda state, path: save(state, Path(options["node_disk"], path.name))
shared = [SharedFolders(run_paths)] if options.get("shared_check") else []
trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy=FSDP2Strategy(), max_steps=4,
                    logger=RunCSVLogger(root, name="run"),
                    callbacks=[*shared, RunFolder(), checkpoints, ExportPolicy(), MetricsPlot(), p2o, Record()],
                    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                    num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
# 8 problems = 2 steps of 2 prompts on each of 2 ranks: searches at steps 2 and 4
trainer.fit(module, datamodule=PromptDataModule(batch_size=2, train_file=train, val_files={"dev": train}))
"""

# variables of a launcher or a cluster that would tell Lightning another story than the one a test sets up
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
                    "MASTER_PORT")  # fmt: skip


def _env(**extra) -> dict[str, str]:
    """This environment without launcher or SLURM variables, one torch thread, this checkout's package first."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path, **extra)


def _slurm_task(rank: int, port: int) -> dict[str, str]:
    """What ``srun`` sets in task ``rank`` of ``sbatch --nodes 2 --ntasks-per-node 1`` (job 4242), plus the port."""
    return {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "p2o-multinode", "SLURM_NODELIST": "localhost",
        "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank), "MASTER_PORT": str(port),
    }  # fmt: skip


def _by_hand(node: int, port: int) -> dict[str, str]:
    """What Lightning's own multi-node launch reads on each node (its "bare bones cluster"): no launcher."""
    return {"NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[str]:
    """Wait for every process (killing the rest if one hangs past ``timeout``); returns their logs."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
    return [log.read_text() for log in logs]


def _start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _torchrun(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "p2o-multinode"]  # fmt: skip


def _problems(path: Path, n: int = 8) -> Path:
    write_jsonl(path, [{"prompt": f"{i}+{i + 3}=", "answer": str(2 * i + 3)} for i in range(n)])
    return path


def _assert_written_once(run: Path, steps: list[int], searches: int) -> None:
    """The run folder holds one of everything: metrics rows of each step once (under one header), one record per
    search, the last checkpoint (one shard per rank, no leftover temporary folder), the policy, the plot."""
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines.count(lines[0]) == 1  # one header
    rows = csv_rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows if "train/loss" in r] == steps  # once each, in order
    assert sorted(p.name for p in (run / "p2o").iterdir()) == [f"search_{i:03d}.json" for i in range(searches)]
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in (checkpoints / "last.ckpt").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (run / "policy" / "model.safetensors").is_file() and (run / "metrics.png").is_file()
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or ".old" in p.name]


def _two_nodes(world: Path, tmp: Path, launcher: str, disks=None, **options) -> list[tuple[int, str]]:
    """Run SCRIPT as 2 nodes of 1 process, each in its folder of ``disks`` (default both in ``tmp``: a shared
    filesystem), the run in ``run/`` under it. Returns each node's exit status and log."""
    script = tmp / "two_nodes.py"
    script.write_text(SCRIPT)
    train = _problems(tmp / "train.jsonl")
    port = free_port()
    args = [str(script), str(world), ".", str(train), json.dumps(options)]
    disks = disks or (tmp, tmp)
    logs = [tmp / f"node{n}.log" for n in (0, 1)]
    if launcher == "torchrun":  # the same command on both "nodes": the c10d rendezvous gives each its node rank
        procs = [_start([*_torchrun(port), *args], disks[n], _env(), logs[n]) for n in (0, 1)]
    else:
        env = _slurm_task if launcher == "slurm" else _by_hand
        procs = [_start([sys.executable, *args], disks[n], _env(**env(n, port)), logs[n]) for n in (0, 1)]
    out = _wait_all(procs, logs, timeout=300)
    return [(proc.returncode, log) for proc, log in zip(procs, out)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        "torchrun",
        pytest.param("slurm", marks=pytest.mark.multinode),
        pytest.param("by-hand", marks=pytest.mark.multinode),
    ],
)
def test_fsdp2_and_a_p2o_search_on_two_nodes(tiny_world, tmp_path, launcher):
    out = _two_nodes(tiny_world, tmp_path, launcher)
    assert [rc for rc, _ in out] == [0, 0], "\n".join(log[-3000:] for _, log in out)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    environment = dict(torchrun="TorchElasticEnvironment", slurm="SLURMEnvironment")
    environment = environment.get(launcher, "LightningEnvironment")
    for r, rank in enumerate(ranks):  # two nodes of one process: both are local rank 0
        assert (rank["global_rank"], rank["local_rank"], rank["node_rank"]) == (r, 0, r), rank
        assert rank["world_size"] == 2 and rank["environment"] == environment
    # the search ran on global rank 0 only, every rank scored its share of each evaluation, both hold its templates
    assert ranks[0]["searches"] == ranks[1]["searches"] == 2
    assert ranks[0]["assignments"] == ranks[1]["assignments"] and ranks[0]["assignments"]
    assert ranks[0]["metric_calls"] == ranks[1]["metric_calls"]  # the records broadcast from rank 0
    assert ranks[0]["examples_scored"] > 0 and ranks[1]["examples_scored"] > 0
    assert ranks[0]["examples_scored"] + ranks[1]["examples_scored"] == sum(ranks[0]["metric_calls"])
    _assert_written_once(tmp_path / "run", steps=[0, 1, 2, 3], searches=2)


# ----------------------------------------------------------------------------------------------------------------
# The launch scripts, run as documented (the CLI, FSDP2, P²O), twice: the second launch resumes
# ----------------------------------------------------------------------------------------------------------------

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  strategy:
    class_path: p2o_lightning.sharded.FSDP2Strategy
  num_sanity_val_steps: 0
  limit_val_batches: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: runs/two-nodes
  logger:
    class_path: p2o_lightning.runs.RunCSVLogger
    init_args: {save_dir: runs, name: two-nodes}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: runs/two-nodes/checkpoints, save_last: true, every_n_train_steps: 2, save_top_k: 0}
    - class_path: p2o_lightning.outputs.ExportPolicy
    - class_path: p2o_lightning.outputs.MetricsPlot
    - class_path: p2o_lightning.runs.RunFolder
    - class_path: p2o_lightning.callbacks.P2OCallback
      init_args:
        schedule: {trigger: steps, every_n_steps: 2, min_hard_samples: 4}
        search: {dev_size: 4, max_metric_calls: 24, parents_per_iteration: 2}
model:
  rollout: {num_rollouts: 4, max_new_tokens: 8}
  update: {micro_batch_size: 8}
  validation: {num_samples: 0}
data: {batch_size: 2}
"""

# stands in for srun on one machine: SLURM_NTASKS tasks of the command (options before it skipped), each with the
# variables srun gives a task of --ntasks-per-node 1, its output in task<N>.log; fails if a task fails
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((task = 0; task < SLURM_NTASKS; task++)); do
  SLURM_PROCID=$task SLURM_LOCALID=0 SLURM_NODEID=$task "$@" > "task$task.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def _launch(launcher: str, cwd: Path, args: list[str], port: int) -> list[str]:
    """Launch ``scripts/launch_<launcher>`` with ``args`` as on 2 nodes of 1 process (both nodes' logs)."""
    env = _env(PYTHON=sys.executable)
    if launcher == "torchrun":
        env.update(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID=f"p2o-{port}")
        logs = [cwd / f"node{n}.log" for n in (0, 1)]
        procs = [_start(["bash", str(REPO / "scripts" / "launch_torchrun.sh"), *args], cwd, env, log) for log in logs]
        out = _wait_all(procs, logs, timeout=300)
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in out)
        return out
    bin_dir = cwd / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    job = {k: v for k, v in _slurm_task(0, port).items() if k not in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID")}
    env.update(job, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")  # what sbatch sets in the batch script
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "launch_slurm.sbatch"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = [(cwd / f"task{n}.log").read_text() for n in (0, 1)]
    assert proc.returncode == 0, proc.stderr[-2000:] + "\n".join(o[-3000:] for o in out)
    return out


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_launch_script_trains_on_two_nodes_and_resumes(tiny_world, tmp_path, launcher):
    config = tmp_path / "two-nodes.yaml"
    config.write_text(CONFIG)
    train = _problems(tmp_path / "train.jsonl")
    args = [str(config), f"--model.model={tiny_world}", f"--data.train_file={train}",
            f'--data.val_files={{"dev": "{train}"}}']  # fmt: skip
    run = tmp_path / "runs" / "two-nodes"
    first = _launch(launcher, tmp_path, [*args, "--trainer.max_steps=2"], free_port())
    assert sum("run summary: runs/two-nodes (2 RL steps" in o for o in first) == 1, first  # printed by rank 0 only
    _assert_written_once(run, steps=[0, 1], searches=1)
    # the same command again, as a requeued job or a restarted node runs it: it resumes at the step-2 checkpoint
    again = _launch(launcher, tmp_path, [*args, "--trainer.max_steps=4"], free_port())
    assert "Restored all states from the checkpoint" in "".join(again), again
    _assert_written_once(run, steps=[0, 1, 2, 3], searches=2)


# ----------------------------------------------------------------------------------------------------------------
# What a run across nodes is refused for: no launcher, a run folder the nodes do not share
# ----------------------------------------------------------------------------------------------------------------


def _disks(tmp: Path) -> list[Path]:
    """A folder per "node": its own disk, where the run's relative path ``run/`` leads each node elsewhere."""
    disks = [tmp / "node0-disk", tmp / "node1-disk"]
    for disk in disks:
        disk.mkdir()
    return disks


@pytest.mark.slow
@pytest.mark.multinode
def test_run_folders_on_disks_the_nodes_do_not_share_are_refused_at_setup(tiny_world, tmp_path):
    disks = _disks(tmp_path)
    out = _two_nodes(tiny_world, tmp_path, "slurm", disks=disks, shared_check=True)
    for rc, log in out:  # both stop, at setup, with the same error
        assert rc != 0 and "NodeLaunchError: the run's folders are not shared by all its ranks (rank 1 on " in log
        assert f"does not see run folder {disks[1] / 'run'}" in log, log[-3000:]
    assert not (disks[0] / "run" / "checkpoints" / "last.ckpt").exists()  # nothing trained


@pytest.mark.slow
@pytest.mark.multinode
def test_checkpoint_missing_a_node_s_shards_is_not_swapped_in(tiny_world, tmp_path):
    """Without the setup check (the Python API, no SharedFolders), the first save finds the shard of the node that
    wrote elsewhere missing, swaps in no broken checkpoint and stops every rank."""
    node_disk = tmp_path / "node1-disk"
    out = _two_nodes(tiny_world, tmp_path, "slurm", node_disk=str(node_disk))
    for rc, log in out:
        assert rc != 0, log[-3000:]
        assert "was not saved: " in log and "its shard __1_0.distcp is missing" in log, log[-3000:]
    assert (node_disk / ".last.ckpt.tmp" / "__1_0.distcp").is_file()  # where rank 1 wrote it
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # no broken checkpoint in the run


@pytest.mark.parametrize("slurm_job", [None, "interactive"])
def test_several_nodes_without_a_launcher_are_refused(tiny_world, tmp_path, monkeypatch, slurm_job):
    """``fit --trainer.num_nodes 2`` started by hand, or under a SLURM job named "interactive" (which Lightning does
    not take for SLURM): an error before any process group, not a 30-minute hang waiting for ranks that joined
    another node's rendezvous (what it was)."""
    for name in [*LAUNCH_VARIABLES, *(k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_")))]:
        monkeypatch.delenv(name, raising=False)
    if slurm_job:
        for name, value in {"SLURM_JOB_NAME": slurm_job, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"}.items():
            monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    train = _problems(tmp_path / "train.jsonl")
    args = ["fit", "--config", str(REPO / "configs" / "toy.yaml"), f"--model.model={tiny_world}",
            f"--data.train_file={train}", f'--data.val_files={{"dev": "{train}"}}', "--trainer.num_nodes=2",
            "--trainer.strategy=ddp"]  # fmt: skip
    with pytest.raises(NodeLaunchError, match=r"^trainer.num_nodes=2, but no launcher started this process") as err:
        cli_main(args)
    assert ("SLURM job named 'interactive'" in str(err.value)) == bool(slurm_job)
    assert "scripts/launch_torchrun.sh" in str(err.value) and "scripts/launch_slurm.sbatch" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]  # nothing was written


def test_launch_scripts_refuse_a_launch_without_what_they_need(tmp_path):
    env = _env()
    torchrun = subprocess.run(["bash", str(REPO / "scripts" / "launch_torchrun.sh"), "c.yaml"], env=env,
                              cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert torchrun.returncode != 0 and "set NNODES, the number of nodes" in torchrun.stderr
    slurm = subprocess.run(["bash", str(REPO / "scripts" / "launch_slurm.sbatch"), "c.yaml"], env=env,
                           cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert slurm.returncode != 0 and "not inside a SLURM job: submit this script with sbatch" in slurm.stderr
    usage = subprocess.run(["bash", str(REPO / "scripts" / "launch_slurm.sbatch")], env=env, cwd=tmp_path,
                           capture_output=True, text=True)  # fmt: skip
    assert usage.returncode == 2 and "usage: sbatch" in usage.stderr
    for script in ("launch_torchrun.sh", "launch_slurm.sbatch"):  # a relaunch would wipe the run it should resume
        overwrite = subprocess.run(["bash", str(REPO / "scripts" / script), "c.yaml", "--overwrite=true"], env=env,
                                   cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
        assert overwrite.returncode == 2 and "no --overwrite here: a re" in overwrite.stderr, script
