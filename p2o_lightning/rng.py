"""The process RNG streams a resumed run must continue from: torch (CPU and CUDA), Python and numpy.

Saved in the checkpoint by :class:`~p2o_lightning.module.P2OModule` so that a run resumed with ``--ckpt_path last``
samples exactly the rollouts the uninterrupted run would have. Numpy's key array is stored as a tensor, so the
checkpoint loads with ``torch.load(weights_only=True)``.

Each rank's streams drift apart (a rank whose rollouts all end early draws fewer tokens), and a checkpoint's
metadata is written by rank 0 alone: :func:`capture_rank_rng_states` gathers every rank's state into it, and
:func:`rank_rng_state` picks a rank's own on resume (rank 0's where the run resumes on more ranks than it had).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def capture_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def capture_rank_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng_state`, in rank order; a collective: every rank calls it together."""
    state = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def rank_rng_state(saved: list[dict[str, Any]] | dict[str, Any], rank: int) -> dict[str, Any]:
    """The state ``rank`` resumes from: its own, or rank 0's if the checkpoint had fewer ranks (or one state)."""
    if isinstance(saved, dict):  # a checkpoint of one process
        return saved
    return saved[rank] if rank < len(saved) else saved[0]
