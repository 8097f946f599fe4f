"""A rank lost mid-run: the others stop with an error that names it, instead of a socket error or a hang.

When one rank of a distributed run dies (``kill -9``, the OOM killer, its node gone) the others learn of it only
from their next collective: gloo fails at once with "Connection closed by peer [10.0.0.2]:41317", NCCL after the
process group's timeout, and neither says which rank is gone. A rank that is stopped rather than dead (a hung
process, a lost network) fails the collective after that timeout too: ``timeout`` on the strategy
(``FSDP2Strategy(timeout=...)``, ``DDPStrategy(timeout=...)``) bounds how long the others wait.

:class:`LostRanks` keeps a heartbeat per rank in the run's rendezvous store (the TCPStore at the cluster
environment's ``main_address:main_port``, which the process group was built on): a daemon thread adds 1 to its
rank's counter every ``period_s``. When a collective fails on a rank (Lightning's ``on_exception``), it reads every
counter, waits ``3 × period_s`` and reads them again: the ranks whose counters did not move are lost, and the rank
raises :class:`LostRankError` naming them (chained to the collective's error). If the store itself cannot be reached,
its host is what was lost, and no rank is named: rank 0's process under Lightning's own launcher or SLURM, the
master node's agent under torchrun (which also closes it when it stops the run's workers to restart them after one
failed, ``--max-restarts``). An error that is not a failed collective, or a failed collective while every rank
still beats, passes through unchanged.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import timedelta

import lightning as L
import torch.distributed as dist
from lightning.fabric.plugins.environments import TorchElasticEnvironment

KEY = "p2o_lightning/heartbeat/{rank}"
# what a collective says when a peer is gone (gloo) or silent (a timeout); NCCL's errors are DistBackendErrors
COLLECTIVE_FAILURE = re.compile(
    r"gloo|nccl|connection (closed|reset|refused)|broken pipe|timed? ?out|timeout|heartbeat", re.IGNORECASE
)


class LostRankError(RuntimeError):
    """Another rank of the run is gone: its name, and the collective error that revealed it as the cause."""


def _is_collective_failure(err: BaseException | None) -> bool:
    """``err`` or an exception it was raised from is a failed collective or an unreachable store."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and COLLECTIVE_FAILURE.search(str(err))):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


class LostRanks(L.Callback):
    """Names the lost rank when a collective fails (module docstring); nothing happens on one process.

    Args:
        period_s: seconds between two heartbeats of a rank; a failure is diagnosed in about three of them.
    """

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._where: tuple[str, int] | None = None
        self.rank, self.world = 0, 1
        self.torchrun = False  # the store is hosted by torchrun's agent, not by rank 0's process

    def _client(self, timeout_s: float) -> dist.TCPStore:
        host, port = self._where
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size < 2 or self._thread is not None:
            return
        env = getattr(trainer.strategy, "cluster_environment", None)  # a parallel strategy's
        if env is None:
            return
        self._where = (env.main_address, int(env.main_port))
        self.rank, self.world = trainer.global_rank, trainer.world_size
        self.torchrun = isinstance(env, TorchElasticEnvironment)
        store = self._client(timeout_s=60)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, args=(store,), name="p2o-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, store: dist.TCPStore) -> None:
        key = KEY.format(rank=self.rank)
        while not self._stop.is_set():
            try:
                store.add(key, 1)
            except Exception:  # the store's host is gone: on_exception will say so
                return
            self._stop.wait(self.period_s)

    def lost_ranks(self) -> tuple[list[int] | None, str]:
        """The ranks whose heartbeat stopped, and what was seen; None and what that means if the store is unreachable
        (its host is what was lost, not a rank that can be named).
        """
        host, port = self._where
        try:
            store = self._client(timeout_s=max(2.0, 4 * self.period_s))
            counts = [store.add(KEY.format(rank=r), 0) for r in range(self.world)]
            time.sleep(3 * self.period_s)
            moved = [store.add(KEY.format(rank=r), 0) != c for r, c in enumerate(counts)]
        except Exception:
            host_is = (
                "the master node's torchrun agent, which closes it when it stops the run's workers (another worker "
                "failed: with --max-restarts it restarts them) or when its node goes down"
                if self.torchrun
                else "rank 0's process, which is gone (killed, out of memory, or its node went down)"
            )
            return None, f"the run's rendezvous store at {host}:{port} no longer answers: its host is {host_is}"
        lost = [r for r in range(self.world) if not moved[r] and r != self.rank]
        return lost, f"{'its' if len(lost) == 1 else 'their'} heartbeat in the store at {host}:{port} stopped"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._thread is None or not _is_collective_failure(exception):
            return
        lost, seen = self.lost_ranks()
        self.teardown(trainer, pl_module, "fit")
        if lost is None:
            raise LostRankError(
                f"{seen}. Rank {self.rank} of {self.world} stops too; the other ranks' logs say which failed first. "
                "Resume the run with `--ckpt_path last`."
            ) from exception
        if not lost:
            return
        names = ", ".join(map(str, lost))
        raise LostRankError(
            f"rank {names} of {self.world} {'is' if len(lost) == 1 else 'are'} lost ({seen}): killed, out of memory, "
            f"hung, or its node went down; its own log says why. Rank {self.rank} stops too. Resume the run with "
            "`--ckpt_path last`."
        ) from exception

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop.set()
        self._thread = None
