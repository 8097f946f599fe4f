"""Distributed checkpoints (FSDP2): written atomically, checked before they load, loadable on any number of ranks.

Under FSDP2 (Lightning's ``ModelParallelStrategy``, the policy sharded by ``fully_shard`` in ``configure_model``)
``last.ckpt`` is a folder: one shard per rank written by ``torch.distributed.checkpoint`` (DCP), its ``.metadata``,
and Lightning's ``meta.pt`` with the training state.

- :class:`FSDP2Strategy` is ``ModelParallelStrategy`` with three changes. By default it shards over every rank
  (Lightning's default leaves a node's devices to tensor parallelism, which the policy does not apply). It writes
  each checkpoint into a temporary folder beside its target and swaps it in once every rank's shard is written and
  rank 0 finds the folder whole: DCP itself overwrites the shards of the previous checkpoint in place, so a kill
  mid-save would leave a folder mixing two steps, and on nodes that do not share the folder each would hold only
  its own ranks' shards. And it checks a checkpoint before loading it
  (:func:`~p2o_lightning.checks.check_checkpoint_file`: a missing or truncated shard is named, nothing loads). On
  load DCP reshards: a checkpoint written by N ranks resumes on any number of ranks.
- :func:`consolidated_checkpoint` reads such a folder into one ordinary checkpoint (full tensors, no process
  group), as Lightning's ``consolidate_checkpoint`` does: what a single process without FSDP2 resumes from
  (:class:`~p2o_lightning.outputs.AtomicCheckpointIO` calls it for a folder).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout

from p2o_lightning.checks import LIGHTNING_META, check_checkpoint_file, check_checkpoint_folder
from p2o_lightning.nodes import check_node_launch


def consolidated_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """The distributed checkpoint ``folder`` as one Lightning checkpoint: ``state_dict`` and ``optimizer_states``
    as full tensors, the rest from ``meta.pt``. Checked first (:func:`check_checkpoint_folder`); needs the whole
    checkpoint in CPU memory, and as much free space beside ``folder`` for a moment (DCP's converter writes a file).
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    check_checkpoint_folder(folder)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.consolidate-") as tmp:
        full = Path(tmp) / "full.pt"
        dcp_to_torch_save(folder, full)
        sharded = torch.load(full, map_location="cpu", weights_only=True)
    checkpoint = torch.load(folder / LIGHTNING_META, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = sharded.pop("state_dict")
    # DCP keys optimizer states by parameter name; torch's Optimizer.load_state_dict matches them by position
    optimizers = sorted((k for k in sharded if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:]))
    checkpoint["optimizer_states"] = [sharded.pop(k) for k in optimizers]
    return checkpoint


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_in(new: Path, path: Path) -> None:
    """Move the finished checkpoint ``new`` (file or folder) onto ``path``, replacing what is there. A file replaces
    a file atomically; a folder cannot replace anything in one rename, so the old one is renamed aside first.
    """
    if not path.is_dir():
        os.replace(new, path)
        return
    old = path.with_name(f".{path.name}.old")
    _remove(old)
    os.replace(path, old)
    os.replace(new, path)
    _remove(old)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (same arguments) for FSDP2 over every rank, whose checkpoints are
    written atomically and checked before they load.

    Its defaults shard over all ranks: ``data_parallel_size="auto"`` is the number of ranks (Lightning's would be
    the number of nodes, leaving a node's devices to tensor parallelism, which the policy does not apply) and
    ``tensor_parallel_size=1``. ``timeout`` bounds how long a rank waits in a collective for one that is lost.
    """

    def __init__(
        self,
        data_parallel_size: int | str = "auto",
        tensor_parallel_size: int | str = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend, timeout
        )
        self._all_ranks = data_parallel_size == "auto" and tensor_parallel_size in ("auto", 1)

    def setup_environment(self) -> None:
        check_node_launch(self.num_nodes, self.cluster_environment)  # several nodes need a launcher: else a hang
        if self._all_ranks:  # ModelParallelStrategy's own sizes, set before it resolves "auto" to the number of nodes
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
        super().setup_environment()
        if self._all_ranks and self.device_mesh["data_parallel"].size() != self.world_size:  # checked: not public API
            raise RuntimeError(
                f"FSDP2Strategy: the data-parallel mesh does not span the {self.world_size} ranks (this Lightning "
                "version sets ModelParallelStrategy's sizes elsewhere): give data_parallel_size explicitly"
            )

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Write into ``.<name>.tmp`` beside ``filepath``, then (rank 0, once every rank has written its shard and
        the folder is checked whole) swap it in: the previous checkpoint stays whole until the new one is, but for
        the moment between two renames. A new folder that rank 0 finds incomplete (a rank wrote its shard where
        rank 0 does not see it: the nodes do not share the folder) is not swapped in, and every rank stops.
        """
        path = Path(self.broadcast(filepath))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.is_global_zero:
            _remove(tmp)  # left by a save that was killed
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()  # every shard written
        error = None
        if self.is_global_zero:
            try:
                if tmp.is_dir():
                    check_checkpoint_folder(tmp)
                swap_in(tmp, path)
            except ValueError as err:
                error = str(err)
        error = self.broadcast(error)
        if error is not None:
            raise RuntimeError(
                f"the checkpoint for {path} was not saved: {error}. Every rank had written its shard, so it was "
                "written where global rank 0 does not see it (the nodes must share the checkpoint folder: one "
                "filesystem, at the same path) or the filesystem lost it. A previous checkpoint there is kept."
            )
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Check the checkpoint (folder or file) on every rank, so that all stop together, then load it (DCP
        reshards a folder onto this run's ranks).
        """
        path = Path(self.broadcast(checkpoint_path))
        check_checkpoint_file(path)
        return super().load_checkpoint(path, weights_only=weights_only)
