"""Tests of the Triton kernels (p2o_lightning.kernels) against the reference ops and float64 autograd.

Without CUDA the kernels run in the Triton interpreter: TRITON_INTERPRET=1 must be in the environment before
``@triton.jit`` decorates them, which happens when a kernel module is first imported — on the first call of an op
of ``p2o_lightning.kernels`` (the package itself imports no triton), so this module can set it at collection,
whatever the order of the test files. Shapes are small and odd (the interpreter runs numpy, one program at a time);
several tests shrink the tiles (``small_tiles``) so that N, V and H span several partial tiles and splits.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton's kernels

import dataclasses  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

from helpers import (  # noqa: E402
    LargestOutput,
    assert_close,
    check_logprob_against_float64,
    make_logprob_inputs,
    naive_logprob,
    read_csv,
    small_data,
    trainer,
    with_loss_settings,
)

from p2o_lightning import ops  # noqa: E402
from p2o_lightning.backend import get_ops  # noqa: E402
from p2o_lightning.kernels import functional as kernels  # noqa: E402
from p2o_lightning.loss import CONTEXT_MASK_SCOPES, KL_ESTIMATORS, LOSS_AGGS, context_ratio_mask  # noqa: E402
from p2o_lightning.module import P2OModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def small_tiles(monkeypatch):
    """Force 16-row, 128-column, 32-wide tiles, groups of 3 row blocks and 3 vocabulary splits: every loop, mask and
    partial group of the kernels runs."""
    from p2o_lightning.kernels import logprob

    tiles = dict(BLOCK_N=16, BLOCK_V=128, BLOCK_H=32, GROUP_N=3, num_warps=4)
    monkeypatch.setattr(logprob, "_forward_config", lambda *a: dict(tiles))
    monkeypatch.setattr(logprob, "_backward_config", lambda *a: dict(tiles))
    monkeypatch.setattr(logprob, "_num_splits", lambda *a: 3)


# ----------------------------------------------------------------------------------------------------------------
# linear_logprob
# ----------------------------------------------------------------------------------------------------------------


# (N, H, V, chunk_size, tiles): the odd shape with the default tiles (one row block, 2 vocab tiles in the
# interpreter), and one where N, H, V are not multiples of the 16 / 32 / 128 tiles, 3 splits, 4 backward chunks.
SHAPES = [(37, 80, 1001, 1024, "default"), (50, 48, 515, 16, "small")]
# dtype → (forward atol, grad rtol, grad atol as a share of the largest |grad|), outputs float32 in every case.
# 16-bit: ∂L/∂z is stored in the input dtype before the two matmuls (and the interpreter truncates that store).
TOLERANCES = {
    torch.float32: (1e-4, 1e-4, 2e-5),
    torch.bfloat16: (1e-4, 3e-2, 4e-3),
    torch.float16: (1e-4, 1e-2, 1e-3),
}


@pytest.mark.parametrize("return_entropy", [True, False], ids=["logp+entropy", "logp"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-H{h}-V{v}-C{c}-{t}" for n, h, v, c, t in SHAPES])
def test_linear_logprob_matches_float64_reference(shape, temperature, dtype, return_entropy, request):
    n, h, v, chunk, tiles = shape
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    fn = functools.partial(kernels.linear_logprob, chunk_size=chunk)
    check_logprob_against_float64(fn, n, h, v, dtype, temperature, return_entropy, TOLERANCES[dtype], DEVICE)


@pytest.mark.parametrize("h", [64, 80], ids=["even-H", "odd-H"])
def test_tuning_space_configs_match_float64_reference(h, monkeypatch):
    """Every config the measured tuning may record (cut-cross-entropy's 256 × 128 × 32 tile among them), forward and
    backward, against float64: with H a multiple of every BLOCK_H (the EVEN_H loads, no mask along H) and not."""
    from p2o_lightning.kernels import logprob

    configs = [*logprob.tuning_space("forward", torch.bfloat16), *logprob.tuning_space("backward", torch.bfloat16)]
    assert any(c["BLOCK_N"] == 256 and c["BLOCK_V"] == 128 and c["BLOCK_H"] == 32 for c in configs)
    for config in {json.dumps(c, sort_keys=True): c for c in configs}.values():
        monkeypatch.setattr(logprob, "_forward_config", lambda *a, c=config: dict(c))
        monkeypatch.setattr(logprob, "_backward_config", lambda *a, c=config: dict(c))
        monkeypatch.setattr(logprob, "_num_splits", lambda *a: 2)
        check_logprob_against_float64(
            kernels.linear_logprob, 40, h, 300, torch.bfloat16, 0.8, True, TOLERANCES[torch.bfloat16], DEVICE
        )


def test_linear_logprob_equals_the_reference_op(small_tiles):
    # the oracle of the trainer: same outputs and grads as ops.linear_logprob to float32 rounding
    hidden, weight, targets = make_logprob_inputs(41, 40, 301, torch.float32, seed=2, device=DEVICE)
    results = []
    for op in (ops.linear_logprob, kernels.linear_logprob):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp, entropy = op(h, w, targets, temperature=0.7, return_entropy=True, chunk_size=8)
        grads = torch.autograd.grad([logp, entropy], [h, w], [torch.ones_like(logp) * 0.3, -torch.ones_like(logp)])
        results.append((logp, entropy, *grads))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


def test_linear_logprob_entropy_on_a_known_distribution():
    # logits [0, 0] → p = [½, ½]: logp = ln ½ = −0.6931, entropy = ln 2 = 0.6931
    one = torch.ones(1, 1, device=DEVICE)
    logp, entropy = kernels.linear_logprob(one, torch.zeros(2, 1, device=DEVICE), torch.tensor([1], device=DEVICE))
    assert logp.item() == pytest.approx(-math.log(2), abs=1e-6) and entropy is None
    # logits [1, 0]: ∂entropy/∂z_0 = −p_0 (z_0 − Σ p z) = −p_0 (1 − p_0) = −0.1966 (sharper = lower)
    weight = torch.tensor([[1.0], [0.0]], device=DEVICE, requires_grad=True)
    _, entropy = kernels.linear_logprob(one, weight, torch.tensor([0], device=DEVICE), return_entropy=True)
    entropy.sum().backward()
    p0 = 1 / (1 + math.exp(-1))
    assert weight.grad[0, 0].item() == pytest.approx(-p0 * (1 - p0), abs=1e-6)


def test_linear_logprob_leading_dims_ignore_index_and_one_sided_grads():
    hidden, weight, targets = make_logprob_inputs(24, 40, 301, torch.float32, ignore_index=-1, device=DEVICE)
    hidden = hidden.view(4, 6, 40).requires_grad_(True)  # (B, T, H) as the trainer passes it
    logp, _ = kernels.linear_logprob(hidden, weight, targets.view(4, 6), ignore_index=-1, chunk_size=8)
    assert logp.shape == (4, 6)
    (grad_hidden,) = torch.autograd.grad(logp, hidden, torch.full_like(logp, 0.5))
    assert weight.grad is None
    hidden64 = hidden.detach().double().view(24, 40).requires_grad_(True)
    ref_logp, _ = naive_logprob(hidden64, weight, targets, ignore_index=-1)
    (ref_hidden,) = torch.autograd.grad(ref_logp, hidden64, torch.full_like(ref_logp, 0.5))
    assert_close(logp.flatten(), ref_logp, rtol=1e-5, atol=1e-4)
    assert_close(grad_hidden.view(24, 40), ref_hidden, rtol=1e-4, atol=1e-5)
    # the weight alone
    weight.requires_grad_(True)
    logp, _ = kernels.linear_logprob(hidden.detach(), weight, targets.view(4, 6), ignore_index=-1)
    logp.sum().backward()
    weight64 = weight.detach().double().requires_grad_(True)
    naive_logprob(hidden64.detach(), weight64, targets, ignore_index=-1)[0].sum().backward()
    assert_close(weight.grad, weight64.grad, rtol=1e-4, atol=1e-5)


def test_linear_logprob_under_no_grad_keeps_no_graph():
    hidden, weight, targets = make_logprob_inputs(9, 16, 31, torch.float32, device=DEVICE)
    weight.requires_grad_(True)
    with torch.no_grad():
        logp, entropy = kernels.linear_logprob(hidden, weight, targets, return_entropy=True)
    assert not logp.requires_grad and not entropy.requires_grad and logp.grad_fn is None


class _LargestTorchOutput(LargestOutput):
    """The largest tensor a torch op produces, except the interpreter's byte copies of kernel arguments."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith(("set_", "copy_")):  # the interpreter's host round trip of every argument
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the dispatch recorder sees CPU ops")
def test_linear_logprob_holds_no_logits_forward_and_one_chunk_backward(small_tiles):
    n, h, v, chunk = 64, 8, 1001, 16  # N·V = 64,064 ≫ chunk·V = 16,016 ≫ V·H = 8,008 (the weight)
    hidden, weight, targets = make_logprob_inputs(n, h, v, torch.float32, device=DEVICE)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with _LargestTorchOutput() as forward:
        logp, entropy = kernels.linear_logprob(hidden, weight, targets, return_entropy=True, chunk_size=chunk)
    assert forward.max_numel == 4 * 3 * n  # the (4 values, 3 splits, N) partials: no logits at all
    with _LargestTorchOutput() as backward:
        torch.autograd.grad([logp, entropy], [hidden, weight], [torch.randn(n), torch.randn(n)])
    assert backward.max_numel <= chunk * v  # one buffer of ∂L/∂z of at most chunk × V elements at a time
    with _LargestTorchOutput() as naive:  # the recorder does see a materialised implementation's logits
        naive_logprob(hidden, weight, targets)
    assert naive.max_numel >= n * v


@pytest.mark.parametrize("n_ctx", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_logprob_multi_equals_single_calls(n_ctx, dtype, small_tiles):
    n, h, v = 37, 48, 515
    _, weight, targets = make_logprob_inputs(n, h, v, dtype, device=DEVICE)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(n_ctx, n, h, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    weight.requires_grad_(True)
    logp, entropy = kernels.linear_logprob_multi(hidden, weight, targets, temperature=0.8, return_entropy=True)
    assert logp.shape == entropy.shape == (n_ctx, n)
    singles = [
        kernels.linear_logprob(hidden[c], weight, targets, temperature=0.8, return_entropy=True) for c in range(n_ctx)
    ]
    # C stacked contexts sum in another order than one context alone (numpy's BLAS under the interpreter, the tile
    # schedule on a GPU): equal to a few float32 ulps of values up to log V ≈ 6, 10x tighter than against float64
    close = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(logp, torch.stack([s[0] for s in singles]), **close)
    torch.testing.assert_close(entropy, torch.stack([s[1] for s in singles]), **close)
    # backward: the C contexts' grads equal the single calls' (grad_weight summed over contexts)
    g = torch.randn(2, n_ctx, n, generator=gen).to(DEVICE)
    got = torch.autograd.grad([logp, entropy], [hidden, weight], [g[0], g[1]])
    outs = [o for c, s in enumerate(singles) for o in s]
    expected = torch.autograd.grad(outs, [hidden, weight], [g[i, c] for c in range(n_ctx) for i in range(2)])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[0], expected[0], **tol)
    torch.testing.assert_close(got[1].float(), expected[1].float(), **tol)


def test_linear_logprob_rejects_bad_shapes():
    with pytest.raises(ValueError, match="targets"):
        kernels.linear_logprob(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        kernels.linear_logprob(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        kernels.linear_logprob_multi(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# group_advantage
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_by_std", [True, False], ids=["grpo", "dr-grpo"])
@pytest.mark.parametrize("k", [1, 2, 5, 16, 33])
def test_group_advantage_matches_reference(k, norm_by_std):
    from p2o_lightning.kernels.advantage import group_advantage_and_collapse

    gen = torch.Generator().manual_seed(k)
    binary = (torch.rand(37, k, generator=gen) > 0.6).float()  # 0/1 rewards: many collapsed groups
    binary[0], binary[1] = 0.0, 1.0
    graded = torch.rand(37, k, generator=gen, dtype=torch.float64)  # continuous rewards, float64
    for rewards in (binary, graded, binary.long()):
        rewards = rewards.to(DEVICE)
        expected = ops.group_advantage(rewards, norm_by_std=norm_by_std)
        got, collapsed = group_advantage_and_collapse(rewards, norm_by_std=norm_by_std, block_b=8)  # 5 programs
        assert got.dtype == expected.dtype and got.shape == (37, k)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(collapsed, ops.collapsed_groups(rewards.float()))
        torch.testing.assert_close(kernels.group_advantage(rewards, norm_by_std=norm_by_std), expected)


def test_group_advantage_by_hand():
    # mean 0.25; deviations [0.75, −0.25, −0.25, −0.25]; unbiased std 0.5 → [1.5, −0.5, −0.5, −0.5]; collapsed → 0
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], device=DEVICE)
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    torch.testing.assert_close(kernels.group_advantage(rewards), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rewards"):
        kernels.group_advantage(torch.zeros(4))
    # one group is one program's registers: K is bounded by the launch configs compiled for the GPUs (AOT test)
    with pytest.raises(ValueError, match="supports K <= 256 rollouts per group, got 257"):
        kernels.group_advantage(torch.zeros(2, 257, device=DEVICE))


# ----------------------------------------------------------------------------------------------------------------
# policy_loss
# ----------------------------------------------------------------------------------------------------------------


ref_loss = with_loss_settings(ops.policy_loss)  # the loss's settings as keyword arguments
kernel_loss = with_loss_settings(kernels.policy_loss)


def loss_inputs(b=6, t=37, seed=0, dtype=torch.float32, per_token_adv=False):
    gen = torch.Generator().manual_seed(seed)
    logp = torch.randn(b, t, generator=gen) * 0.4 - 1.0
    old_logp = logp + torch.randn(b, t, generator=gen) * 0.3  # ratios spread across both clip bounds …
    old_logp[:, ::4] -= 1.5  # … and every 4th token's ratio ~e^1.5 = 4.5, past the dual-clip bound 3
    ref_logp = logp + torch.randn(b, t, generator=gen) * 0.3
    context_logp = old_logp + torch.randn(b, t, generator=gen) * 3  # |log ρ| > ln 100 on some tokens
    advantages = torch.randn(b, t, generator=gen) if per_token_adv else torch.randn(b, generator=gen)
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[2] = False  # one empty sequence
    tensors = dict(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref=ref_logp, ctx=context_logp)
    return {k: v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE) for k, v in tensors.items()}


def run_both(inputs, grad_scale=1.7, **kwargs):
    """(loss, stats, ∂(grad_scale·loss)/∂logp) of the reference and of the kernel."""
    out = []
    for op in (ref_loss, kernel_loss):
        logp = inputs["logp"].clone().requires_grad_(True)
        loss, stats = op(logp, inputs["old_logp"], inputs["advantages"], inputs["mask"], **kwargs)
        (grad,) = torch.autograd.grad(loss * grad_scale, logp)  # upstream grad ≠ 1
        out.append((loss, stats, grad))
    return out


def assert_same_loss(ref, got, rtol=1e-5, atol=1e-6):
    (loss, stats, grad), (k_loss, k_stats, k_grad) = ref, got
    assert k_loss.dtype == loss.dtype and k_grad.dtype == grad.dtype
    torch.testing.assert_close(k_loss, loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(k_grad, grad, rtol=rtol, atol=atol)
    assert k_stats.keys() == stats.keys()
    for key in stats:
        assert k_stats[key].dtype == torch.float32 and not k_stats[key].requires_grad, key
        torch.testing.assert_close(k_stats[key], stats[key], rtol=rtol, atol=atol, msg=key)


LOSS_CASES = list(itertools.product(LOSS_AGGS, KL_ESTIMATORS, [None, 3.0], [None, *CONTEXT_MASK_SCOPES]))


@pytest.mark.parametrize(
    "loss_agg, kl_estimator, clip_ratio_c, context", LOSS_CASES, ids=["-".join(map(str, c)) for c in LOSS_CASES]
)
def test_policy_loss_matches_reference(loss_agg, kl_estimator, clip_ratio_c, context):
    inputs = loss_inputs(seed=len(loss_agg) + len(kl_estimator))
    kwargs = dict(
        ref_logp=inputs["ref"], kl_coef=0.1, kl_estimator=kl_estimator, loss_agg=loss_agg, clip_ratio_c=clip_ratio_c,
        clip_high=0.28, context_logp=inputs["ctx"] if context else None, context_mask_scope=context or "tokens",
    )  # fmt: skip
    ref, got = run_both(inputs, **kwargs)
    assert_same_loss(ref, got)
    assert ref[1]["clip_frac"] > 0 and (clip_ratio_c is None or ref[1]["dual_clip_frac"] > 0)  # branches taken
    assert not context or ref[1]["context_masked_frac"] > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # no reference model: kl = 0
        dict(kl_coef=0.0, with_ref=True),  # KL reported, not in the loss
        dict(per_token_adv=True, kl_coef=0.05, with_ref=True),
        dict(dtype=torch.float64, kl_coef=0.05, with_ref=True, clip_ratio_c=2.0),
        dict(float_mask=True, loss_agg="seq-mean-token-mean", with_ref=True, kl_coef=0.1, clip_ratio_c=3.0),
        dict(context_ratio_bounds=(0.5, 2.0), with_ctx=True),
    ],
    ids=["no-ref", "kl-reported", "per-token-adv", "fp64", "float-mask", "ctx-bounds"],
)
def test_policy_loss_options_match_reference(kwargs):
    kwargs = dict(kwargs)
    inputs = loss_inputs(dtype=kwargs.pop("dtype", torch.float32), per_token_adv=kwargs.pop("per_token_adv", False))
    if kwargs.pop("with_ref", False):
        kwargs["ref_logp"] = inputs["ref"]
    if kwargs.pop("with_ctx", False):
        kwargs["context_logp"] = inputs["ctx"]
    if kwargs.pop("float_mask", False):
        weights = torch.linspace(0.5, 1.5, inputs["mask"].numel(), device=DEVICE).view_as(inputs["logp"])
        inputs["mask"] = inputs["mask"].float() * weights  # token weights, not only 0/1
    tol = dict(rtol=1e-12, atol=1e-12) if inputs["logp"].dtype == torch.float64 else {}
    assert_same_loss(*run_both(inputs, **kwargs), **tol)


def test_policy_loss_bf16_logprobs_computed_in_float32():
    inputs = loss_inputs(dtype=torch.bfloat16)
    ref, got = run_both(inputs, ref_logp=inputs["ref"], kl_coef=0.1)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    assert_same_loss(ref, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope", CONTEXT_MASK_SCOPES)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_policy_loss_micro_batches_with_global_denominators_equal_one_batch(loss_agg, scope):
    inputs = loss_inputs(b=6, t=9, seed=3)
    kwargs = dict(
        ref_logp=inputs["ref"], kl_coef=0.05, loss_agg=loss_agg, context_logp=inputs["ctx"], context_mask_scope=scope
    )
    logp = inputs["logp"].clone().requires_grad_(True)
    full, _ = kernel_loss(logp, inputs["old_logp"], inputs["advantages"], inputs["mask"], **kwargs)
    (full_grad,) = torch.autograd.grad(full, logp)
    total = torch.zeros((), device=DEVICE)
    n_kept = (inputs["mask"] & context_ratio_mask(inputs["old_logp"], inputs["ctx"], (0.01, 10.0))).sum()
    n_tokens = inputs["mask"].sum() if scope == "policy_gradient" else n_kept  # what a token-mean divides by
    for s in [slice(0, 2), slice(2, 5), slice(5, 6)]:
        part_kwargs = {k: (v[s] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        part, _ = kernel_loss(
            logp[s], inputs["old_logp"][s], inputs["advantages"][s], inputs["mask"][s], **part_kwargs,
            num_tokens=n_tokens, num_seqs=6,
        )  # fmt: skip
        total = total + part
    (micro_grad,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(micro_grad, full_grad)
    # and the same numerator / denominators through the reference
    ref_full, _ = ref_loss(logp, inputs["old_logp"], inputs["advantages"], inputs["mask"], **kwargs)
    torch.testing.assert_close(full, ref_full)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_policy_loss_all_masked_is_zero_not_nan(loss_agg):
    inputs = loss_inputs(b=3, t=4)
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    ref, got = run_both(inputs, loss_agg=loss_agg)
    assert got[0].item() == 0.0 and torch.equal(got[2], torch.zeros_like(got[2]))
    assert got[1]["ratio_min"].item() == got[1]["ratio_max"].item() == 1.0
    assert_same_loss(ref, got)


def test_policy_loss_by_hand():
    # A = 1, ratio = e^0.5 = 1.6487 > 1.2: clipped to 1.2, loss −1.2, no gradient; A = −1, ratio e^1.5 = 4.48:
    # dual-clip caps −A·ratio = 4.48 at −A·c = 3, no gradient; the third token, ratio 1 and A = 2, gives −2, grad −2
    logp = torch.tensor([[0.5, 1.5, 0.0]], device=DEVICE, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0]], device=DEVICE)
    loss, stats = kernel_loss(
        logp, torch.zeros(1, 3, device=DEVICE), adv, torch.ones(1, 3, device=DEVICE), clip_ratio_c=3.0
    )
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 + 3.0 - 2.0) / 3, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2.0 / 3]], device=DEVICE))
    assert stats["clip_frac"].item() == pytest.approx(1 / 3) and stats["dual_clip_frac"].item() == pytest.approx(1 / 3)
    # context ratio mask: ρ = exp(old − context) = [1, e^−6 (dropped), e^3 (dropped), 1]
    logp = torch.zeros(1, 4, device=DEVICE, requires_grad=True)
    context = torch.tensor([[0.0, 6.0, -3.0, 0.0]], device=DEVICE)
    ones = torch.ones(1, 4, device=DEVICE)
    # the reference's scope: the cut tokens keep their place in the denominator: (−1 + 0 + 0 − 1) / 4
    loss, stats = kernel_loss(logp, logp.detach(), ones[:, 0], ones, context_logp=context)
    loss.backward()
    assert loss.item() == pytest.approx(-0.5) and stats["context_masked_frac"].item() == pytest.approx(0.5)
    assert logp.grad.tolist() == [[-0.25, 0.0, 0.0, -0.25]]
    # scope tokens: they leave the loss: (−1 − 1) / 2
    logp.grad = None
    loss, _ = kernel_loss(logp, logp.detach(), ones[:, 0], ones, context_logp=context, context_mask_scope="tokens")
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert logp.grad.tolist() == [[-0.5, 0.0, 0.0, -0.5]]


def test_policy_loss_errors_and_gradient_only_to_logp():
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2), mask=torch.ones(2, 3))
    for kwargs, error in [
        (dict(loss_agg="token-sum"), "'token-sum'"),
        (dict(kl_coef=0.1), "ref_logp"),
        (dict(kl_estimator="k9"), "'k9'"),
        (dict(clip_ratio_c=0.5), "clip_ratio_c"),
        (dict(advantages=torch.zeros(3)), "advantages"),
        (dict(mask=torch.ones(2, 4)), "mask"),
        (dict(context_logp=torch.zeros(2, 3), context_ratio_bounds=(2.0, 10.0)), "context_ratio_bounds"),
        (dict(old_logp=torch.zeros(2, 3, requires_grad=True)), "detach old_logp"),
        (dict(ref_logp=torch.zeros(2, 3, requires_grad=True)), "detach ref_logp"),
    ]:
        with pytest.raises(ValueError, match=error):
            kernel_loss(**{**args, **kwargs})


# ----------------------------------------------------------------------------------------------------------------
# Dispatch, signatures, the import name
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear_logprob", "group_advantage", "policy_loss"])
def test_kernels_have_the_reference_signatures(name):
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(getattr(kernels, name)) == params(getattr(ops, name))
    from p2o_lightning.kernels import advantage, logprob, loss

    impl = {"linear_logprob": logprob, "group_advantage": advantage, "policy_loss": loss}[name]
    assert params(getattr(impl, name)) == params(getattr(ops, name))


def test_get_ops_triton_returns_the_kernels():
    fns = get_ops("triton", DEVICE)
    assert fns.backend == "triton"
    assert (fns.linear_logprob, fns.group_advantage, fns.policy_loss) == (
        kernels.linear_logprob,
        kernels.group_advantage,
        kernels.policy_loss,
    )
    assert get_ops("auto", "cpu").backend == "torch"  # "auto" never picks the interpreter
    if DEVICE.type == "cuda":
        assert get_ops("auto", DEVICE).backend == "triton"


_PROBE = """
import importlib.util, json, sys
if sys.argv[1] == "kernels-first":
    from p2o_lightning.kernels import advantage, functional, logprob, loss  # the kernel modules (and triton) too
import transformers
from transformers.utils import is_kernels_available
spec = importlib.util.find_spec("kernels")
hub = None
if is_kernels_available():
    import transformers.integrations.hub_kernels  # what transformers does while loading any model
    hub = transformers.integrations.hub_kernels.__name__
print(json.dumps({
    "available": is_kernels_available(),
    "hub_kernels": hub,
    "kernels_origin": spec.origin if spec else None,
    "kernels_file": getattr(sys.modules.get("kernels"), "__file__", None),
    "ours": getattr(sys.modules.get("p2o_lightning.kernels.functional"), "__file__", None),
}))
"""


def _probe(order: str, cwd: Path) -> dict:
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0"))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, order], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cwd", ["repo-root", "tests", "elsewhere"])
def test_import_kernels_is_never_ours(cwd, tmp_path):
    """`import kernels` is the PyPI package (or nothing), never our folder: from the repository root (first on
    sys.path), from tests/ and from elsewhere, before and after our kernels are imported; transformers imports it."""
    where = {"repo-root": REPO, "tests": REPO / "tests", "elsewhere": tmp_path}[cwd]
    plain, ours = _probe("transformers-only", where), _probe("kernels-first", where)
    assert ours["ours"] == str(REPO / "p2o_lightning" / "kernels" / "functional.py")  # this checkout's kernels
    assert ours["available"] == plain["available"]  # transformers' answer does not change
    for probe in (plain, ours):
        for path in (probe["kernels_origin"], probe["kernels_file"]):  # (the venv may live inside the checkout)
            assert path is None or Path(path).resolve() != REPO / "kernels" / "__init__.py", probe
            assert path is None or Path(path).resolve().parent != REPO / "kernels", probe
        if probe["available"]:  # the PyPI package (a dependency of transformers >= 5.25): transformers imports it
            assert probe["hub_kernels"] == "transformers.integrations.hub_kernels"
    with pytest.raises(subprocess.CalledProcessError):  # our modules are not importable under the top-level name
        subprocess.run([sys.executable, "-c", "import kernels.logprob"], cwd=REPO, capture_output=True, check=True)


# ----------------------------------------------------------------------------------------------------------------
# The trainer with backend: triton
# ----------------------------------------------------------------------------------------------------------------


class ParityReward(P2OModule):
    """The real module, rewarded 1 for a response of odd length: spread within groups whatever the tiny model says."""

    def sample(self, prompts, answers, sampling):
        rollouts, grade = super().sample(prompts, answers, sampling)
        return rollouts, dataclasses.replace(grade, rewards=[float(len(text) % 2) for text in rollouts.texts])


def _one_rl_step(world, root: Path, backend: str) -> P2OModule:
    L.seed_everything(0)
    module = ParityReward(
        model=str(world), rollout={"num_rollouts": 4, "max_new_tokens": 12}, compute={"backend": backend},
        loss={"kl_coef": 0.05, "clip_ratio_c": 3.0},
        update={"micro_batch_size": 8, "ppo_mini_batch_size": 2, "max_grad_norm": None},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),  # Adam's first step is sign(grad): too forgiving
    )  # fmt: skip
    # 4 prompts in mini-batches of 2: two optimizer steps, the second with ratio ≠ 1 and KL ≠ 0
    trainer(root, max_steps=2, limit_val_batches=0).fit(module, datamodule=small_data())
    return module


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type == "cuda", reason="the tiny trainer runs on CPU, where the kernels are interpreted")
def test_training_step_with_triton_backend_equals_torch(tiny_world, tmp_path):
    """One GRPO step of the real trainer — rollouts, old log-probs with entropy, reference log-probs, advantages, two
    PPO updates with KL and dual-clip — gives the same statistics and updated weights with ``backend: triton``."""
    torch_module = _one_rl_step(tiny_world, tmp_path / "torch", "torch")
    triton_module = _one_rl_step(tiny_world, tmp_path / "triton", "triton")
    assert torch_module.ops.backend == "torch" and triton_module.ops.backend == "triton"
    a = read_csv(tmp_path / "torch" / "run" / "metrics.csv")[0]  # the RL step's row (its 2 updates averaged)
    b = read_csv(tmp_path / "triton" / "run" / "metrics.csv")[0]
    assert float(a["train/grad_norm"]) > 0.1 and float(a["train/kl"]) > 0 and float(a["train/collapse_rate"]) < 1
    keys = ["train/loss", "train/pg_loss", "train/kl", "train/entropy", "train/ratio_max", "train/grad_norm"]
    keys += ["train/clip_frac", "train/reward", "train/approx_kl_old"]
    for key in keys:
        assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-6), key
    moved = 0.0
    for (name, p), q, initial in zip(
        torch_module.policy.named_parameters(), triton_module.policy.parameters(), torch_module.reference.parameters()
    ):
        moved = max(moved, (p - initial).abs().max().item())
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    assert moved > 1e-2  # the two updates did move the weights
