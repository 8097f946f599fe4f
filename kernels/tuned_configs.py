"""The launch configs and ∂L/∂z buffer bound measured fastest on a device, read by the log-prob launchers first.

``benchmarks/tune_logprob.py`` times every config of :func:`.logprob.tuning_space` (cut-cross-entropy's tile among
them) and several backward buffer bounds on the device it runs on, and writes the winners to
``kernels/tuned/<device kind>.json`` (``cuda-nvidia-h100-80gb-hbm3`` for an H100 SXM: the device's name, lowered,
runs of other characters as ``-``; ``$P2O_TUNED_DIR`` replaces the folder). The launchers of :mod:`.logprob` then
launch, for a shape, the recorded config of the same dtype, V, H and entropy flag measured at the nearest N
(log scale); a shape with none falls back to ``triton.autotune`` over the launch spaces. So a device that has been
tuned once starts from its measured winners, with no autotuning at the first call.

File format (``format`` 1)::

    {"format": 1, "device": ..., "device_kind": ..., "capability": "sm_90", "date": ..., "commit": ...,
     "versions": {"torch": ..., "triton": ...},
     "forward":  [{"dtype": "bf16", "N": 4096, "V": 151936, "H": 4096, "entropy": false,
                   "config": {"BLOCK_N": ..., "BLOCK_V": ..., "BLOCK_H": ..., "GROUP_N": ..., "num_warps": ...,
                              "num_stages": ...}, "ms": ..., "tried": 8}, ...],
     "backward": [same keys, "ms" of the ∂L/∂z kernel over the whole vocabulary],
     "logits_budget": {"bf16": 268435456}}

A file that does not parse or lacks a field is an error naming the file and the field: a tuned file is written by
the tuning script and committed, so a broken one is a bug to fix, not a case to skip.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path

import torch

from . import _guard  # noqa: F401  (refuses the top-level name `kernels`)

__all__ = ["DTYPE_NAMES", "device_kind", "load", "logits_budget", "lookup", "path_for", "select", "write"]

FORMAT = 1
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CONFIG_KEYS = ("BLOCK_N", "BLOCK_V", "BLOCK_H", "GROUP_N", "num_warps", "num_stages")
ENTRY_KEYS = ("dtype", "N", "V", "H", "entropy", "config")


def tuned_dir() -> Path:
    return Path(os.environ.get("P2O_TUNED_DIR") or Path(__file__).resolve().parent / "tuned")


def device_kind(name: str) -> str:
    """``cuda-<name lowered, runs of other characters as '-'>``, as the benchmarks name their result files."""
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def path_for(kind: str) -> Path:
    return tuned_dir() / f"{kind}.json"


@functools.cache
def load(path: Path) -> dict | None:
    """The parsed, checked file at ``path``; None when there is none."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rerun benchmarks/tune_logprob.py on the device") from err
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, this code reads format {FORMAT}")
    for kernel in ("forward", "backward"):
        for i, entry in enumerate(data.get(kernel, [])):
            missing = [k for k in ENTRY_KEYS if k not in entry] + [
                f"config.{k}" for k in CONFIG_KEYS if k not in entry.get("config", {})
            ]
            if missing:
                raise ValueError(f"{path}: {kernel}[{i}] lacks {', '.join(missing)}")
    return data


def _for_device(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    return load(path_for(device_kind(torch.cuda.get_device_name(device))))


def lookup(kernel: str, device: torch.device, dtype: torch.dtype, *, n: int, v: int, h: int, entropy: bool):
    """The recorded config of ``kernel`` for this dtype, V, H and entropy flag at the N nearest ``n`` (log scale),
    as a launch-config dict; None without a tuned file for the device or such an entry.
    """
    data = _for_device(device)
    return select(data, kernel, DTYPE_NAMES.get(dtype), n=n, v=v, h=h, entropy=entropy) if data else None


def select(data: dict, kernel: str, dtype_name: str | None, *, n: int, v: int, h: int, entropy: bool) -> dict | None:
    """:func:`lookup` in a loaded file's ``data``: the config of the entry of this dtype, V, H and entropy flag whose
    N is nearest ``n`` on a log scale (the first of a tie), or None.
    """
    key = (dtype_name, v, h, entropy)
    entries = [e for e in data.get(kernel, []) if (e["dtype"], e["V"], e["H"], e["entropy"]) == key]
    if not entries:
        return None
    best = min(entries, key=lambda e: abs(math.log2(e["N"]) - math.log2(max(n, 1))))
    return {k: best["config"][k] for k in CONFIG_KEYS}


def logits_budget(device: torch.device, dtype: torch.dtype) -> int | None:
    """The backward's ∂L/∂z buffer bound (elements) measured fastest on the device for ``dtype``, or None."""
    data = _for_device(device)
    if data is None:
        return None
    return data.get("logits_budget", {}).get(DTYPE_NAMES.get(dtype, ""))


def write(path: Path, meta: dict, forward: list[dict], backward: list[dict], budgets: dict[str, int]) -> Path:
    """Write a tuned file (``meta``: device, device_kind, capability, date, commit, versions); returns ``path``."""
    data = {"format": FORMAT, **meta, "forward": forward, "backward": backward, "logits_budget": budgets}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    load.cache_clear()
    load(path)  # what was written reads back
    return path
