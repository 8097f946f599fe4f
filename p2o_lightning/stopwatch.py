"""Wall and CPU seconds of named pieces of work, added up over a step: the step's stages and P²O's extra costs.

A :class:`Stopwatch` sums, per name, the wall time (``time.perf_counter``) and this process's CPU time
(``time.process_time``: every thread of the process, the clock of ``time/run_cpu_s``, so that a cost reads directly
as a share of the run's CPU time) of every ``with stopwatch.measure(name):`` block; a name measured in several blocks
(micro-batches, PPO updates, the log-prob stage and the update) adds up. :meth:`Stopwatch.metrics` gives them as
``time/<name>_s`` and ``time/<name>_cpu_s``. On a GPU each block synchronises the device at both ends, so that its
wall time is its kernels' and not only their launch.

:func:`measured` is the same block for code that may run without a stopwatch (``None``: nothing is measured).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import torch


class Stopwatch:
    """Per-name sums of wall and process CPU seconds (``wall``, ``cpu``: name → seconds)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = None if device is None else torch.device(device)
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Add the block's wall and CPU seconds to ``name``'s."""
        self._sync()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._sync()
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu

    def metrics(self, names: Iterable[str]) -> dict[str, float]:
        """``time/<name>_s`` and ``time/<name>_cpu_s`` of each of ``names``; 0 for a name not measured."""
        out = {}
        for name in names:
            out[f"time/{name}_s"] = self.wall.get(name, 0.0)
            out[f"time/{name}_cpu_s"] = self.cpu.get(name, 0.0)
        return out


def measured(stopwatch: Stopwatch | None, name: str) -> contextlib.AbstractContextManager:
    """``stopwatch.measure(name)``, or a block that measures nothing when there is no stopwatch."""
    return contextlib.nullcontext() if stopwatch is None else stopwatch.measure(name)
