"""The kernels' entry points, one per reference op of :mod:`p2o_lightning.ops`, with the same signatures.

``kernels/`` is installed as ``p2o_lightning.kernels`` and is deliberately *not* a regular package (it has no
``__init__.py``): ``python`` run from the repository root puts the checkout on ``sys.path``, where a regular package
named ``kernels`` would shadow the PyPI package ``kernels`` that transformers imports while loading any model. A
folder without ``__init__.py`` is only a namespace portion, and Python picks a regular package of the same name
anywhere on ``sys.path`` over it, so ``import kernels`` is always the PyPI package when it is installed.

One file per op family, each laid out like the Triton tutorials / Liger-Kernel (kernels → launchers → one
``torch.autograd.Function``):

- :mod:`.logprob` — :func:`linear_logprob` (fused LM head + log-softmax + gather + entropy, backward to hidden and
  weight) and :func:`linear_logprob_multi` (C contexts sharing the weight: P²O's context ratio mask);
- :mod:`.advantage` — :func:`group_advantage` (GRPO / Dr. GRPO, plus the collapse flags);
- :mod:`.loss` — :func:`policy_loss` (PPO-clip, clip-higher, dual-clip, k1/k2/k3 KL, context ratio mask, three
  aggregations, with every statistic of the reference);
- :mod:`.fused_head` — :func:`fused_linear_policy_loss` (one PPO update: the loss at ratio 1 and the LM head's
  gradients from one computation of each chunk's logits, the softmax, loss terms and ∂L/∂z in one kernel).

The trainer reaches them only through :func:`p2o_lightning.backend.get_ops` (``backend: triton``, or ``auto`` on CUDA).

Importing this module does not import triton. Triton decides at ``@triton.jit`` decoration time whether a kernel
is compiled for a GPU or run by the interpreter (``TRITON_INTERPRET=1``); the functions below import their kernel
module on first call, so that the environment at the first *call* decides, not an early import of this module
(a test suite can set ``TRITON_INTERPRET=1`` in any test module and run in any order).
"""

from __future__ import annotations

from torch import Tensor

from p2o_lightning.loss import LossSettings  # plain torch: the loss's settings, read by every implementation

from . import _guard  # noqa: F401  (refuses the top-level name `kernels`)

__all__ = ["fused_linear_policy_loss", "group_advantage", "linear_logprob", "linear_logprob_multi", "policy_loss"]


def linear_logprob(
    hidden: Tensor,  # (..., H)
    weight: Tensor,  # (V, H)
    targets: Tensor,  # (...) int64
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    logits_budget: int = 2**25,  # p2o_lightning.ops.LOGITS_BUDGET (this module imports nothing at import time)
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Fused :func:`p2o_lightning.ops.linear_logprob`; see :mod:`p2o_lightning.kernels.logprob`."""
    from .logprob import linear_logprob as kernel

    return kernel(
        hidden, weight, targets, temperature=temperature, return_entropy=return_entropy,
        ignore_index=ignore_index, logits_budget=logits_budget, chunk_size=chunk_size,
    )  # fmt: skip


def linear_logprob_multi(
    hidden: Tensor,  # (C, ..., H)
    weight: Tensor,  # (V, H)
    targets: Tensor,  # (...) int64
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    logits_budget: int = 2**25,  # p2o_lightning.ops.LOGITS_BUDGET (this module imports nothing at import time)
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the same targets under C contexts, the weight streamed once; see :mod:`.logprob`."""
    from .logprob import linear_logprob_multi as kernel

    return kernel(
        hidden, weight, targets, temperature=temperature, return_entropy=return_entropy,
        ignore_index=ignore_index, logits_budget=logits_budget, chunk_size=chunk_size,
    )  # fmt: skip


def group_advantage(rewards: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Fused :func:`p2o_lightning.ops.group_advantage`; see :mod:`p2o_lightning.kernels.advantage`."""
    from .advantage import group_advantage as kernel

    return kernel(rewards, norm_by_std=norm_by_std, eps=eps)


def policy_loss(
    logp: Tensor,  # (B, T)
    old_logp: Tensor,  # (B, T)
    advantages: Tensor,  # (B,) or (B, T)
    mask: Tensor,  # (B, T)
    settings: LossSettings,
    *,
    ref_logp: Tensor | None = None,
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
    context_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Fused :func:`p2o_lightning.ops.policy_loss`; see :mod:`p2o_lightning.kernels.loss`."""
    from .loss import policy_loss as kernel

    return kernel(
        logp, old_logp, advantages, mask, settings, ref_logp=ref_logp, num_tokens=num_tokens, num_seqs=num_seqs,
        context_logp=context_logp,
    )  # fmt: skip


def fused_linear_policy_loss(
    hidden: Tensor,  # (..., H)
    weight: Tensor,  # (V, H)
    targets: Tensor,  # (...) int64
    loss,  # p2o_lightning.fused_head.RatioOneLoss
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    logits_budget: int = 2**25,
    chunk_size: int | None = None,
    head_dtype=None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Fused :func:`p2o_lightning.fused_head.fused_linear_policy_loss`; see :mod:`p2o_lightning.kernels.fused_head`."""
    from .fused_head import fused_linear_policy_loss as kernel

    return kernel(
        hidden, weight, targets, loss, temperature=temperature, return_entropy=return_entropy,
        ignore_index=ignore_index, logits_budget=logits_budget, chunk_size=chunk_size, head_dtype=head_dtype,
    )  # fmt: skip
