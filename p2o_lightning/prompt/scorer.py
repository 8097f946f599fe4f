"""GEPA's ``evaluate`` as a collective: rank 0 drives the search, every rank scores its share of each evaluation.

``gepa.optimize`` is a sequential loop that runs on rank 0 only. Left alone it scores every candidate on rank 0 while
the other ranks wait, which fails two ways: under FSDP2 each evaluation needs the sharded policy's parameters, so
rank 0's all-gather waits for ranks that sit elsewhere (a deadlock); under DDP the waiting ranks block in a
collective of the default process group, and a search longer than its timeout kills them.

:class:`CollectiveScorer` turns each evaluation into a collective step that every rank takes together:

1. rank 0 (inside GEPA) broadcasts ``(examples, template)`` on a *control group*: a separate gloo group with a long
   timeout, so a rank waiting between evaluations (while rank 0 reflects, which can take minutes with a teacher)
   never holds a collective of the training process group (NCCL on GPUs) open;
2. every rank scores examples ``rank, rank + world, ...`` with the same number of policy collectives (under FSDP2 the
   caller's ``score_shard`` gathers the parameters once per evaluation, whatever the share's size), so all ranks
   run the forward together and no rank waits in a collective while another runs a forward;
3. the scores are gathered (on the control group) and put back in the examples' order on rank 0.

When the search ends rank 0 sends ``stop``; :meth:`serve` returns on the other ranks. One process, or no process
group, scores everything locally.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch.distributed as dist

from p2o_lightning.greedy import Scored

ScoreShard = Callable[[Sequence[Mapping[str, str]], str], list[Scored]]  # (examples, template) -> one per example

T = TypeVar("T")
_SCORE, _STOP = "score", "stop"


_CONTROL_GROUPS: dict[datetime.timedelta, Any] = {}


def _control_group(timeout: datetime.timedelta):
    """The gloo group of the control messages, made once per timeout (every rank makes it, in the same order)."""
    if timeout not in _CONTROL_GROUPS:
        _CONTROL_GROUPS[timeout] = dist.new_group(backend="gloo", timeout=timeout)
    return _CONTROL_GROUPS[timeout]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CollectiveScorer:
    """Scores ``examples`` under a template with every rank's share; call it on rank 0, :meth:`serve` elsewhere.

    Args:
        score_shard: scores one rank's share, ``(examples, template) -> [(text, reward, feedback)]``; called on
            every rank for every evaluation, also with an empty share (it must still take part in the policy's
            collectives, e.g. FSDP2's all-gather).
        timeout: how long a rank may wait for the next evaluation (rank 0 reflecting in between) before it fails.
    """

    def __init__(self, score_shard: ScoreShard, timeout: datetime.timedelta = datetime.timedelta(hours=24)) -> None:
        self.score_shard = score_shard
        self.timeout = timeout
        self.rank = dist.get_rank() if _distributed() else 0
        self.world = dist.get_world_size() if _distributed() else 1
        self.group = None
        self.num_scored = 0  # examples scored on this rank (its share of every evaluation)
        self.num_evaluations = 0

    def drive(self, search: Callable[[], T]) -> T | None:
        """Call on every rank: rank 0 runs ``search`` (which calls this scorer); the others serve its evaluations.

        Returns ``search()``'s result on rank 0 and None elsewhere. Rank 0 sends ``stop`` also when the search
        raises, so the serving ranks are released and the error surfaces where it happened.
        """
        if self.world > 1 and self.group is None:
            self.group = _control_group(self.timeout)
        if self.rank != 0:
            self.serve()
            return None
        try:
            return search()
        finally:
            self._send((_STOP, None, None))

    def __call__(self, examples: Sequence[Mapping[str, str]], template: str) -> list[Scored]:
        """Rank 0: the scores of ``examples`` under ``template``, every rank scoring its share."""
        if self.rank != 0:
            raise RuntimeError("CollectiveScorer is called on rank 0 only; the other ranks run serve()")
        self._send((_SCORE, list(examples), template))
        return self._score(list(examples), template)

    def serve(self) -> None:
        """Ranks > 0: score rank 0's evaluations until it says stop."""
        while True:
            kind, examples, template = self._receive()
            if kind == _STOP:
                return
            self._score(examples, template)

    def _score(self, examples: list[Mapping[str, str]], template: str) -> list[Scored]:
        share = examples[self.rank :: self.world]
        mine = self.score_shard(share, template)
        if len(mine) != len(share):
            raise RuntimeError(f"score_shard returned {len(mine)} scores for {len(share)} examples")
        self.num_scored += len(share)
        self.num_evaluations += 1
        if self.world == 1:
            return mine
        parts: list[list[Scored]] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(parts, mine, group=self.group)
        # example i was scored by rank i % world, as its (i // world)-th
        return [tuple(parts[i % self.world][i // self.world]) for i in range(len(examples))]  # type: ignore[misc]

    def _send(self, message: tuple[str, Any, Any]) -> None:
        if self.world > 1:
            dist.broadcast_object_list([message], src=0, group=self.group)

    def _receive(self) -> tuple[str, Any, Any]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
