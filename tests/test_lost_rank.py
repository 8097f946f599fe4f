"""A rank lost mid-step (``kill -9``, or stopped: a hung process) makes the other exit with an error naming it,
within the strategy's timeout, instead of hanging.

The two ranks are started as torchrun starts them (``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` set, one process
each), so no launcher kills the survivor for us: what the survivor does is the trainer's own doing.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import REPO, free_port

from p2o_lightning.ranks import LostRankError, LostRanks

SCRIPT = """
import json, os, signal, sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch

from p2o_lightning.data import PromptDataModule
from p2o_lightning.module import P2OModule
from p2o_lightning.ranks import LostRanks
from p2o_lightning.sharded import FSDP2Strategy

world, out, how = sys.argv[1], Path(sys.argv[2]), sys.argv[3]


class Lose(L.Callback):  # rank 1 is lost in the middle of RL step 2: after its forward, before its backward
    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_rank == 1 and pl_module.rollout_steps == 1:
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)


L.seed_everything(0)
module = P2OModule(model=world, rollout={"num_rollouts": 4, "max_new_tokens": 8}, update={"micro_batch_size": 8},
                   validation={"num_samples": 0}, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(timeout=timedelta(seconds=20)),
                    max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                    limit_val_batches=0, default_root_dir=str(out), callbacks=[LostRanks(), Lose()])
train = out / "train.jsonl"
train.write_text("".join(json.dumps({"prompt": f"{i}+{i + 3}=", "answer": str(2 * i + 3)}) + "\\n" for i in range(8)))
trainer.fit(module, datamodule=PromptDataModule(batch_size=2, train_file=str(train), val_files={"dev": str(train)}))
"""


@pytest.mark.parametrize("how", ["kill", "stop"], ids=["kill-9", "stopped"])
def test_lost_rank_is_named_by_the_other_within_the_timeout(tiny_world, tmp_path, how):
    script = tmp_path / "lose_rank.py"
    script.write_text(SCRIPT)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path, MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), WORLD_SIZE="2", NODE_RANK="0")  # fmt: skip
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in (0, 1)]  # closed below
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(tiny_world), str(tmp_path), how],
            cwd=tmp_path,
            env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=logs[r],
            stderr=subprocess.STDOUT,
        )
        for r in (0, 1)
    ]
    try:
        start = time.monotonic()
        ranks[0].wait(timeout=300)
        elapsed = time.monotonic() - start
        lost = ranks[1].poll()
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        for log in logs:
            log.close()
    out0 = (tmp_path / "rank0.log").read_text()
    assert lost == (-signal.SIGKILL if how == "kill" else None), out0[-3000:]  # rank 1 was dead, or stopped
    assert ranks[0].returncode not in (0, None), out0[-3000:]
    assert "LostRankError: rank 1 of 2 is lost (its heartbeat" in out0, out0[-3000:]
    assert elapsed < 240  # the stopped rank: within the 20 s timeout, not Lightning's default 30 min


@pytest.mark.parametrize("torchrun", [False, True], ids=["lightning-or-slurm", "torchrun"])
def test_an_unreachable_store_names_its_host_not_a_rank(torchrun):
    """Under torchrun the store is the master node's agent's, which closes it when it restarts the run's workers
    (``--max-restarts``): rank 0 saw it gone and said "rank 0 of 2 is lost" of itself. No rank is named now."""
    callback = LostRanks(period_s=0.1)
    callback._where, callback.rank, callback.world, callback.torchrun = ("127.0.0.1", free_port()), 0, 2, torchrun
    callback._thread = threading.current_thread()  # as after setup: the heartbeat runs
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:18624")
    with pytest.raises(LostRankError) as err:
        callback.on_exception(None, None, gloo)
    message = str(err.value)
    assert message.startswith(f"the run's rendezvous store at 127.0.0.1:{callback._where[1]} no longer answers: its")
    assert ("torchrun agent" in message) == torchrun and ("rank 0's process" in message) != torchrun
    assert "Rank 0 of 2 stops too" in message and "is lost" not in message
    assert err.value.__cause__ is gloo
