r"""GRPO's group advantage in one Triton kernel: rewards (B, K) → advantages (B, K) and collapse flags (B,).

Why
---
GRPO replaces PPO's value function by the group of K rollouts of each prompt: a rollout's advantage is its reward
standardised within its group. The torch version (:func:`p2o_lightning.ops.group_advantage`) makes four passes
over the rewards, counted for B·K rewards::

    mean = rewards.mean(dim=1, keepdim=True)     # read B·K, write B
    centered = rewards - mean                    # read B·K + B, write B·K
    std = rewards.std(dim=1, keepdim=True)       # read B·K (two passes inside), write B
    advantages = centered / (std + eps)          # read B·K + B, write B·K

and P²O's advantage-collapse flag (all K rewards equal) two more (``amax``, ``amin``). The kernel reads each group
once into registers (K ≤ a few hundred) and writes the K advantages and one flag: 4·B·K + 4·B·K + B bytes. This is
a few microseconds either way — the point is one launch instead of ~8 and no host sync, and a single place that
states the definition the loss relies on.

Definition (the reference's, exactly)::

    A = (r − mean_K(r)) / (std_K(r) + eps)     std unbiased (÷ K−1), as verl's GRPO
    A =  r − mean_K(r)                         norm_by_std=False (Dr. GRPO)
    K = 1 → A = 0                              (no group; the flag is True: no spread)

A collapsed group (all rewards equal) gets A = 0 because r − mean = 0 exactly for 0/1 rewards.

Broadcasting to tokens. The advantage is per rollout; every response token of a rollout shares it. The loss takes
``advantages`` of shape (B·K,) and broadcasts it as ``advantages[:, None]`` over the (B·K, T) token grid inside its
kernel (it reads one float per row), so no (B·K, T) advantage tensor is ever built.

No backward: rewards are not differentiable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _guard  # noqa: F401  (refuses the top-level name `kernels`)
from .aot import KernelSpace

__all__ = ["group_advantage", "group_advantage_and_collapse"]

MAX_K = 256  # rollouts per group a launch supports (one group's rewards are one program's registers)
# The launch configs of a GPU launch: ~4K rewards per program (BLOCK_B groups × K rounded up to a power of 2), 4
# warps; compiled for sm_80, sm_90 and sm_100 by the AOT test (SPACES below, kernels/aot.py).
CONFIGS = tuple(dict(BLOCK_B=4096 // k, BLOCK_K=k) for k in (2**i for i in range(1, MAX_K.bit_length())))
NUM_WARPS = 4


@triton.jit
def _group_advantage_kernel(
    R_ptr,  # pointer to the rewards, (B, K), float
    A_ptr,  # out: pointer to the advantages, (B, K), the rewards' dtype
    F_ptr,  # out: pointer to the collapse flags, (B,) int8: 1 where the K rewards are all equal
    B,  # number of groups (prompts)
    K,  # rollouts per group
    stride_rb,  # elements between groups of the rewards
    stride_ab,  # elements between groups of the advantages
    eps,  # added to the std
    NORM_BY_STD: tl.constexpr,  # divide by (std + eps) (GRPO) or not (Dr. GRPO)
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 rewards
    BLOCK_B: tl.constexpr,  # groups per program
    BLOCK_K: tl.constexpr,  # K rounded up to a power of 2
):
    groups = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    cols = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    ok = (groups < B)[:, None] & (cols < K)[None, :]  # (BLOCK_B, BLOCK_K)
    r = tl.load(R_ptr + groups[:, None] * stride_rb + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
    r_max = tl.max(tl.where(ok, r, float("-inf")), axis=1)
    r_min = tl.min(tl.where(ok, r, float("inf")), axis=1)
    collapsed = r_max == r_min  # (BLOCK_B,) all K rewards equal: no signal
    mean = tl.sum(r, axis=1) / K  # (BLOCK_B,)
    # a collapsed group's advantages are exactly 0, as the reference's: the GPU's fp32 division is approximate
    # (sum / K ≠ r for K = 5, seen on an H200), and (r - mean) / (std + eps) would turn its last bit into ~0.01
    centered = tl.where(ok & ~collapsed[:, None], r - mean[:, None], 0.0)
    if NORM_BY_STD:
        std = tl.sqrt(tl.sum(centered * centered, axis=1) / (K - 1))  # unbiased; K ≥ 2 (the launcher handles 1)
        adv = centered / (std[:, None] + eps)
    else:
        adv = centered
    tl.store(A_ptr + groups[:, None] * stride_ab + cols[None, :], adv.to(A_ptr.dtype.element_ty), mask=ok)
    tl.store(F_ptr + groups, collapsed.to(tl.int8), mask=groups < B)


# The launch space (:class:`.aot.KernelSpace`): what the launcher below may pass the kernel.
SPACES = (
    KernelSpace(
        "group_advantage",
        _group_advantage_kernel,
        pointers=dict(R_ptr="in", A_ptr="in", F_ptr="*i8"),
        scalars=dict(eps="fp32"),
        configs=tuple(dict(c, num_warps=NUM_WARPS, num_stages=3) for c in CONFIGS),
        dtypes={
            "fp32": ("fp32", {"COMPUTE": tl.float32}),
            "bf16": ("fp32", {"COMPUTE": tl.float32}),
            "fp16": ("fp32", {"COMPUTE": tl.float32}),
        },  # float64 rewards also run (COMPUTE=fp64), not compiled here: ~30 s a case cold, 255 registers
        features=dict(NORM_BY_STD=(True, False)),
    ),
)


def group_advantage_and_collapse(
    rewards: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6, block_b: int | None = None
) -> tuple[Tensor, Tensor]:
    """Advantages (B, K) and collapse flags (B,) bool of ``rewards`` (B, K), in one launch.

    The flags equal :func:`p2o_lightning.ops.collapsed_groups`; ``block_b`` overrides the groups per program.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (B, K), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    n_groups, k = rewards.shape
    if k > MAX_K:
        raise ValueError(f"the group-advantage kernel supports K <= {MAX_K} rollouts per group, got {k}")
    if k == 1 or n_groups == 0:  # no group to normalise against: zeros (and, with one reward, no spread)
        return torch.zeros_like(rewards), torch.ones(n_groups, dtype=torch.bool, device=rewards.device)
    if rewards.stride(1) != 1:
        rewards = rewards.contiguous()
    advantages = torch.empty_like(rewards, memory_format=torch.contiguous_format)  # (B, K)
    flags = torch.empty(n_groups, dtype=torch.int8, device=rewards.device)  # (B,)
    block_k = triton.next_power_of_2(k)
    # ~4K rewards per program: a few registers per thread at 4 warps, and B/BLOCK_B programs fill the SMs (fewer
    # in the interpreter, where a smaller tile is faster)
    interpreted = not isinstance(_group_advantage_kernel, triton.runtime.JITFunction)
    block_b = block_b or (
        max(1, min(triton.next_power_of_2(n_groups), 4096 // block_k)) if interpreted else 4096 // block_k
    )
    _group_advantage_kernel[(triton.cdiv(n_groups, block_b),)](
        rewards, advantages, flags, n_groups, k, rewards.stride(0), advantages.stride(0), eps,
        NORM_BY_STD=norm_by_std, COMPUTE=tl.float64 if rewards.dtype == torch.float64 else tl.float32,
        BLOCK_B=block_b, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )  # fmt: skip
    return advantages, flags.view(torch.bool)  # 0 / 1 bytes: a zero-copy reinterpretation


def group_advantage(rewards: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Triton twin of :func:`p2o_lightning.ops.group_advantage`: (B, K) rewards → (B, K) advantages."""
    return group_advantage_and_collapse(rewards, norm_by_std=norm_by_std, eps=eps)[0]
