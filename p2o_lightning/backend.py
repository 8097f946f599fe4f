"""Which implementation of each op a run uses: the torch references or the Triton kernels of ``p2o_lightning.kernels``.

:func:`resolve_backend` turns ``backend: auto | torch | triton`` and the device into ``torch`` or ``triton``;
:func:`get_ops` hands out the chosen ops as one :class:`Ops`: the references of :mod:`p2o_lightning.ops` and
:mod:`p2o_lightning.fused_head`, with each op ``p2o_lightning.kernels.functional`` provides swapped in on ``triton``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from p2o_lightning.fused_head import fused_linear_policy_loss
from p2o_lightning.ops import group_advantage, linear_logprob, linear_logprob_multi, policy_loss

Backend = Literal["auto", "torch", "triton"]

_DISPATCHED = ("linear_logprob", "linear_logprob_multi", "group_advantage", "policy_loss", "fused_linear_policy_loss")


@dataclass(frozen=True)
class Ops:
    """The ops of one backend; every op the Triton kernels do not provide (yet) is the torch reference."""

    backend: str  # "torch" or "triton"
    linear_logprob: Callable[..., tuple[Tensor, Tensor | None]]
    linear_logprob_multi: Callable[..., tuple[Tensor, Tensor | None]]
    group_advantage: Callable[..., Tensor]
    policy_loss: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    fused_linear_policy_loss: Callable[..., tuple[Tensor, Tensor, Tensor | None]]  # p2o_lightning.fused_head


def _kernel_ops() -> dict[str, Callable]:
    """Return the ops ``p2o_lightning.kernels`` provides, by name (empty when it provides none or cannot import)."""
    try:
        kernels = importlib.import_module("p2o_lightning.kernels.functional")
    except ImportError:
        return {}
    return {name: getattr(kernels, name) for name in _DISPATCHED if callable(getattr(kernels, name, None))}


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Resolve ``backend`` ("auto" | "torch" | "triton") on ``device`` to the backend used: "torch" or "triton".

    "auto" is "triton" only on CUDA when ``p2o_lightning.kernels`` provides at least one op, else "torch". An
    explicit "triton" needs those kernels and CUDA (or ``TRITON_INTERPRET=1`` to run them on CPU); otherwise it
    raises RuntimeError rather than silently falling back.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown backend={backend!r}; expected 'auto', 'torch' or 'triton'")
    if backend == "torch":
        return "torch"
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "triton" if on_cuda and _kernel_ops() else "torch"
    if not _kernel_ops():
        raise RuntimeError(
            "backend='triton' was requested but the Triton kernels (p2o_lightning.kernels) are not implemented yet; "
            "use backend='torch' or 'auto'"
        )
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' requires a CUDA device (got {device}) or TRITON_INTERPRET=1 to interpret the kernels "
            "on CPU; use backend='torch' or 'auto'"
        )
    return "triton"


def get_ops(backend: str, device: torch.device | str) -> Ops:
    """Return the ops of the backend that :func:`resolve_backend` picks for ``backend`` on ``device``."""
    resolved = resolve_backend(backend, device)
    reference = {
        "linear_logprob": linear_logprob,
        "linear_logprob_multi": linear_logprob_multi,
        "group_advantage": group_advantage,
        "policy_loss": policy_loss,
        "fused_linear_policy_loss": fused_linear_policy_loss,
    }
    if resolved == "triton":
        reference.update(_kernel_ops())
    return Ops(backend=resolved, **reference)
