"""Runs across nodes: what such a run needs from its launch and its filesystem, checked before it trains.

A run across nodes is started by a launcher that tells every process where it stands: torchrun
(``scripts/launch_torchrun.sh``: ``RANK`` / ``GROUP_RANK``, Lightning's ``TorchElasticEnvironment``) or SLURM's
``srun`` (``scripts/launch_slurm.sbatch``: ``SLURM_PROCID`` / ``SLURM_NODEID``, ``SLURMEnvironment``). Two traps
are caught here, each with an error that says what to do:

- **No launcher.** With ``num_nodes > 1`` and neither (``python -m p2o_lightning fit`` started by hand on each
  node, or under a SLURM job named ``bash`` / ``interactive``, which Lightning takes as "not SLURM"), every node
  believes it is node 0 unless ``NODE_RANK`` says otherwise: each waits for a world of ranks that joins another
  node's rendezvous, and the run hangs until the process group's timeout (30 minutes by default).
  :func:`check_node_launch` refuses it before any process group exists.
- **A run folder the nodes do not share.** Metrics, searches and the policy are written by global rank 0, but under
  FSDP2 every rank writes its own shard of each checkpoint into the checkpoint folder, and on resume every rank
  finds ``last.ckpt`` there. On node-local disks the run trains as usual and every checkpoint is missing the other
  nodes' shards, which is found out only at the resume it was for. :class:`SharedFolders` checks at setup that every
  rank sees the folders rank 0 writes (a marker file that rank 0 writes into each), and stops the run, naming the
  ranks, their hosts and the folders they do not see.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment

# where a rank looks for rank 0's marker before it says the folder is not shared (NFS shows a new file to other
# clients once it is closed, but a slow server may take a moment)
MARKER_WAIT_S = 10.0


class NodeLaunchError(RuntimeError):
    """A run across nodes that no launcher started, or whose nodes do not share the run folder."""


def check_node_launch(num_nodes: int, environment: object) -> None:
    """Refuse ``num_nodes > 1`` under Lightning's plain environment when no ``NODE_RANK`` tells this node its place.

    ``environment`` is the trainer's cluster environment (``trainer.strategy.cluster_environment``).
    """
    if num_nodes < 2 or not isinstance(environment, LightningEnvironment) or "NODE_RANK" in os.environ:
        return
    job = os.environ.get("SLURM_JOB_NAME")
    slurm = (
        f" This is a SLURM job named {job!r}, which Lightning does not take for SLURM: name it otherwise "
        "(sbatch --job-name)."
        if job in ("bash", "interactive")
        else ""
    )
    raise NodeLaunchError(
        f"trainer.num_nodes={num_nodes}, but no launcher started this process as one of {num_nodes} nodes: every node "
        "would take itself for node 0 and wait for the others until the process group's timeout." + slurm + " "
        "Launch it with scripts/launch_torchrun.sh (torchrun) on every node, or scripts/launch_slurm.sbatch "
        "(sbatch, srun); or set NODE_RANK, MASTER_ADDR and MASTER_PORT on every node (docs/multi-node.md)."
    )


def _marker_seen(path: Path, deadline: float) -> bool:
    while True:
        if path.is_file():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


class SharedFolders(L.Callback):
    """Stops a run of several ranks at setup when some rank does not see the folders rank 0 writes into.

    Args:
        folders: the trainer's folders to check, ``{what: path}``: :func:`~p2o_lightning.runs.run_paths` (the run
            folder, ``trainer.default_root_dir``, each callback's ``dirpath``) is what the CLI gives.
    """

    def __init__(self, folders: Callable[[L.Trainer], dict[str, str | os.PathLike]]) -> None:
        self.folders = folders

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size < 2 or not dist.is_initialized():
            return
        folders = {k: Path(v).absolute() for k, v in self.folders(trainer).items()}
        token = trainer.strategy.broadcast(uuid.uuid4().hex if trainer.is_global_zero else None)
        markers = {what: path / f".p2o-shared-{token}" for what, path in folders.items()}
        if trainer.is_global_zero:
            for marker in markers.values():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
        trainer.strategy.barrier("shared_folders")
        deadline = time.monotonic() + MARKER_WAIT_S
        unseen = [f"{what} {folders[what]}" for what, marker in markers.items() if not _marker_seen(marker, deadline)]
        everyone: list = [None] * trainer.world_size
        dist.all_gather_object(everyone, (trainer.global_rank, socket.gethostname(), unseen))
        if trainer.is_global_zero:
            for marker in markers.values():
                marker.unlink(missing_ok=True)
        blind = [(rank, host, unseen) for rank, host, unseen in everyone if unseen]
        if blind:
            lines = "; ".join(f"rank {rank} on {host} does not see {', '.join(unseen)}" for rank, host, unseen in blind)
            raise NodeLaunchError(
                f"the run's folders are not shared by all its ranks ({lines}; rank 0 runs on {everyone[0][1]}). "
                "Under FSDP2 every rank writes its shard of a checkpoint into the checkpoint folder, and every rank "
                "reads it on resume: put the run folder on a filesystem every node mounts at the same path (give "
                "it as an absolute path if the nodes start in different directories). Nothing was trained."
            )
