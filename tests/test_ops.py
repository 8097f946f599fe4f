"""Tests of the reference ops (p2o_lightning/ops.py) against float64 autograd and hand-computed values.

linear_logprob is checked against the naive float64 path (materialised logits, log_softmax, autograd) on odd
shapes, with random upstream grads on both outputs; the PPO / GRPO ops against values worked out in comments.
"""

from __future__ import annotations

import functools
import math
import sys
import types

import pytest
import torch
from helpers import (
    LargestOutput,
    assert_close,
    check_logprob_against_float64,
    make_logprob_inputs,
    naive_logprob,
    with_loss_settings,
)

from p2o_lightning import ops
from p2o_lightning.backend import get_ops, resolve_backend
from p2o_lightning.ops import (
    collapsed_groups,
    group_advantage,
    kl_penalty,
    linear_logprob,
    linear_logprob_multi,
)

policy_loss = with_loss_settings(ops.policy_loss)  # the loss's settings as keyword arguments

# ----------------------------------------------------------------------------------------------------------------
# linear_logprob
# ----------------------------------------------------------------------------------------------------------------

# (N, H, V, chunk_size): odd sizes, a single token, chunks that do / do not divide N, a chunk larger than N
SHAPES = [(37, 80, 1001, 16), (1, 80, 1001, 1024), (64, 32, 257, 16), (37, 80, 1001, 1000), (50, 16, 33, 7)]
# dtype → (forward atol, grad rtol, grad atol as a share of the largest |grad|). Outputs are float32 in every case
# (computed in float32 from the same low-precision values the reference upcasts); bf16 grads are rounded to bf16
# (8 bits of mantissa). float32 grads sum V terms of p·(z − s) with |z| up to ~20 at T = 0.6: ~1e-5 of the max.
TOLERANCES = {torch.float32: (1e-4, 1e-4, 2e-5), torch.bfloat16: (1e-4, 1.6e-2, 1e-3)}


@pytest.mark.parametrize("return_entropy", [True, False], ids=["logp+entropy", "logp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-H{h}-V{v}-C{c}" for n, h, v, c in SHAPES])
def test_linear_logprob_matches_float64_reference(shape, temperature, dtype, return_entropy):
    n, h, v, chunk = shape
    fn = functools.partial(linear_logprob, chunk_size=chunk)
    check_logprob_against_float64(fn, n, h, v, dtype, temperature, return_entropy, TOLERANCES[dtype])


def test_linear_logprob_entropy_sign_on_a_known_distribution():
    # hidden = [1], weight = [[0], [0]] → logits [0, 0] → p = [½, ½]: logp = ln ½ = −0.6931, entropy = ln 2 = 0.6931
    logp, entropy = linear_logprob(torch.ones(1, 1), torch.zeros(2, 1), torch.tensor([1]), return_entropy=True)
    assert logp.item() == pytest.approx(-math.log(2), abs=1e-6)
    assert entropy.item() == pytest.approx(math.log(2), abs=1e-6)
    # weight = [[1], [0]] → logits [1, 0]; ∂entropy/∂z_0 = −p_0 (z_0 − Σ p z) = −p_0 (1 − p_0) < 0 (sharper = lower)
    weight = torch.tensor([[1.0], [0.0]], requires_grad=True)
    _, entropy = linear_logprob(torch.ones(1, 1), weight, torch.tensor([0]), return_entropy=True)
    entropy.sum().backward()
    p0 = 1 / (1 + math.exp(-1))  # 0.7311
    assert weight.grad[0, 0].item() == pytest.approx(-p0 * (1 - p0), abs=1e-6)  # −0.1966


def test_linear_logprob_logp_only_and_custom_ignore_index():
    hidden, weight, targets = make_logprob_inputs(23, 40, 301, torch.float32, ignore_index=-1)
    hidden.requires_grad_(True)
    logp, entropy = linear_logprob(hidden, weight, targets, ignore_index=-1, chunk_size=8)
    assert entropy is None
    (grad_hidden,) = torch.autograd.grad(logp, hidden, torch.full_like(logp, 0.5))
    hidden64 = hidden.detach().double().requires_grad_(True)
    ref_logp, _ = naive_logprob(hidden64, weight, targets, ignore_index=-1)
    (ref_hidden,) = torch.autograd.grad(ref_logp, hidden64, torch.full_like(ref_logp, 0.5))
    assert_close(logp, ref_logp, rtol=1e-5, atol=1e-4)
    assert_close(grad_hidden, ref_hidden, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hidden_grad, weight_grad", [(True, False), (False, True)])
def test_linear_logprob_grads_hidden_and_weight_independently(hidden_grad, weight_grad):
    hidden, weight, targets = make_logprob_inputs(19, 24, 97, torch.float32)
    hidden.requires_grad_(hidden_grad)
    weight.requires_grad_(weight_grad)
    logp, _ = linear_logprob(hidden, weight, targets, chunk_size=4)
    logp.sum().backward()
    ref_logp, _ = naive_logprob(hidden.detach().double().requires_grad_(), weight.detach().double(), targets)
    hidden64 = hidden.detach().double().requires_grad_(True)
    weight64 = weight.detach().double().requires_grad_(True)
    naive_logprob(hidden64, weight64, targets)[0].sum().backward()
    assert (hidden.grad is not None) == hidden_grad and (weight.grad is not None) == weight_grad
    grad, ref = (hidden.grad, hidden64.grad) if hidden_grad else (weight.grad, weight64.grad)
    assert_close(grad, ref, rtol=1e-4, atol=1e-5)


def test_linear_logprob_under_no_grad_keeps_no_graph():
    hidden, weight, targets = make_logprob_inputs(9, 8, 31, torch.float32)
    weight.requires_grad_(True)  # a frozen reference model's head may still be a Parameter
    with torch.no_grad():
        logp, entropy = linear_logprob(hidden, weight, targets, return_entropy=True)
    assert not logp.requires_grad and not entropy.requires_grad and logp.grad_fn is None


def test_linear_logprob_flattens_leading_dims():
    hidden, weight, targets = make_logprob_inputs(10, 16, 53, torch.float32)
    logp, entropy = linear_logprob(hidden.view(2, 5, 16), weight, targets.view(2, 5), return_entropy=True)
    flat_logp, flat_entropy = linear_logprob(hidden, weight, targets, return_entropy=True)
    assert logp.shape == entropy.shape == (2, 5)
    torch.testing.assert_close(logp.flatten(), flat_logp, rtol=0, atol=0)
    torch.testing.assert_close(entropy.flatten(), flat_entropy, rtol=0, atol=0)


def test_linear_logprob_saves_no_tokens_by_vocab_tensor():
    n, h, v = 40, 8, 501
    hidden, weight, targets = make_logprob_inputs(n, h, v, torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def saved_shapes(fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            fn()
        return shapes

    shapes = saved_shapes(lambda: linear_logprob(hidden, weight, targets, return_entropy=True, chunk_size=8))
    assert sorted(shapes) == sorted([(n, h), (v, h), (n,), (n,)])  # hidden, weight, targets, lse
    # the hook does see a materialised implementation's (N, V) tensors: this test can fail
    assert (n, v) in saved_shapes(lambda: naive_logprob(hidden, weight, targets))


@pytest.mark.parametrize("return_entropy", [True, False])
def test_linear_logprob_never_allocates_more_than_one_chunk_of_logits(return_entropy):
    n, h, v, chunk = 64, 8, 1001, 16  # N·V = 64,064 ≫ chunk·V = 16,016 ≫ V·H = 8,008
    hidden, weight, targets = make_logprob_inputs(n, h, v, torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with LargestOutput() as mode:
        outputs = linear_logprob(hidden, weight, targets, return_entropy=return_entropy, chunk_size=chunk)
        outputs = [o for o in outputs if o is not None]
        torch.autograd.grad(outputs, [hidden, weight], [torch.randn(n) for _ in outputs])
    assert mode.max_numel == chunk * v
    with LargestOutput() as naive_mode:  # the recorder sees the naive path's (N, V) logits
        naive_logprob(hidden, weight, targets)
    assert naive_mode.max_numel >= n * v


@pytest.mark.parametrize("v", [101, 1001, 4001])
def test_linear_logprob_chunks_follow_a_logits_budget_whatever_the_vocabulary(v):
    # budget 8,000 logits: 79 rows of V=101, 7 rows of V=1001, and 1 row of V=4001 (a chunk holds ≥ 1 row)
    n, h, budget = 64, 8, 8000
    hidden, weight, targets = make_logprob_inputs(n, h, v, torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    rows = ops.chunk_rows(v, budget)
    assert rows == {101: 79, 1001: 7, 4001: 1}[v]
    with LargestOutput() as mode:
        logp, entropy = linear_logprob(hidden, weight, targets, return_entropy=True, logits_budget=budget)
        torch.autograd.grad([logp, entropy], [hidden, weight], [torch.randn(n), torch.randn(n)])
    largest_input = max(v * h, n * h)  # the weight (and its grad) and hidden are not chunks of logits
    assert mode.max_numel == max(min(rows, n) * v, largest_input)
    assert min(rows, n) * v <= max(budget, v)
    ref_logp, ref_entropy = naive_logprob(hidden.detach().double(), weight.detach().double(), targets)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-4)


def test_chunk_rows_budget_and_token_cap():
    assert ops.chunk_rows(32768) == 1024  # the default budget: 1,024 tokens of a 32,768 vocabulary …
    assert ops.chunk_rows(151936) == 220  # … and the same memory for Qwen's 151,936
    assert ops.chunk_rows(151936, chunk_size=64) == 64  # a token count caps the rows
    assert ops.chunk_rows(100, logits_budget=10) == 1
    with pytest.raises(ValueError, match="logits_budget must be >= 1"):
        ops.chunk_rows(100, logits_budget=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        linear_logprob(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), chunk_size=0)


def test_linear_logprob_rejects_bad_shapes():
    with pytest.raises(ValueError, match="targets"):
        linear_logprob(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        linear_logprob(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))


def test_linear_logprob_multi_equals_single_calls():
    """Two contexts (h_x, h_tx) of the same targets in one call = two calls, forward and both gradients."""
    gen = torch.Generator().manual_seed(3)
    n_ctx, b, t, h, v = 2, 3, 5, 16, 41
    hidden = torch.randn(n_ctx, b, t, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    targets = torch.randint(0, v, (b, t), generator=gen)
    targets[1, 3:] = -100  # a padded tail
    logp, ent = linear_logprob_multi(hidden, weight, targets, temperature=0.7, return_entropy=True, chunk_size=4)
    assert logp.shape == ent.shape == (n_ctx, b, t) and (logp[:, 1, 3:] == 0).all()
    singles = [linear_logprob(hidden[c], weight, targets, temperature=0.7, return_entropy=True) for c in range(2)]
    torch.testing.assert_close(logp, torch.stack([s[0] for s in singles]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, torch.stack([s[1] for s in singles]), rtol=0, atol=1e-6)
    g = torch.randn(2, n_ctx, b, t, generator=gen)
    got = torch.autograd.grad([logp, ent], [hidden, weight], [g[0], g[1]])
    outs = [o for s in singles for o in s]
    expected = torch.autograd.grad(outs, [hidden, weight], [g[i, c] for c in range(n_ctx) for i in range(2)])
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must be \\(C,\\) \\+ targets"):
        linear_logprob_multi(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# group_advantage, collapsed_groups
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rewards, expected",
    [
        # mean 0.25; deviations [0.75, −0.25, −0.25, −0.25]; unbiased var = (0.5625 + 3·0.0625)/3 = 0.25, std 0.5
        ([1.0, 0.0, 0.0, 0.0], [1.5, -0.5, -0.5, -0.5]),
        # mean 0.5; deviations ±0.5; var = 4·0.25/3 = 1/3, std 0.57735 → ±0.5/0.57735 = ±0.86603
        ([1.0, 1.0, 0.0, 0.0], [0.86603, 0.86603, -0.86603, -0.86603]),
        # mean 2; deviations [−1, 0, 1]; var = 2/2 = 1, std 1
        ([1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]),
        # collapsed: no spread, every advantage 0 (0 / (0 + eps))
        ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),
        ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]),
    ],
)
def test_group_advantage_by_hand(rewards, expected):
    got = group_advantage(torch.tensor([rewards]))
    torch.testing.assert_close(got, torch.tensor([expected]), rtol=1e-4, atol=1e-5)


def test_group_advantage_rows_are_independent_and_dr_grpo():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    # Dr. GRPO: r − mean: row 0 mean 0.25, row 1 mean 0.75
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.25, 0.25, 0.25, -0.75]])
    torch.testing.assert_close(group_advantage(rewards, norm_by_std=False), expected)
    # row 1 normalised: std 0.5 → [0.5, 0.5, 0.5, −1.5]
    torch.testing.assert_close(
        group_advantage(rewards), torch.tensor([[1.5, -0.5, -0.5, -0.5], [0.5, 0.5, 0.5, -1.5]]), rtol=1e-4, atol=1e-5
    )


def test_group_advantage_single_rollout_and_integer_rewards():
    assert torch.equal(group_advantage(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))  # K = 1: no group
    got = group_advantage(torch.tensor([[1, 0, 0, 0]]))  # int rewards become float
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([[1.5, -0.5, -0.5, -0.5]]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="rewards"):
        group_advantage(torch.zeros(4))


def test_collapsed_groups():
    rewards = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
    assert collapsed_groups(rewards).tolist() == [True, True, False, True]
    assert collapsed_groups(torch.tensor([[1.0], [0.0]])).tolist() == [True, True]  # K = 1: no spread


# ----------------------------------------------------------------------------------------------------------------
# kl_penalty
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator, value, grad",
    [
        # logp = 0, ref = ln 2 → d = ref − logp = 0.6931
        ("k1", -math.log(2), 1.0),  # −d = −0.6931;  ∂/∂logp = 1
        ("k2", 0.5 * math.log(2) ** 2, -math.log(2)),  # ½ d² = 0.2402;  ∂/∂logp = −d = −0.6931
        ("k3", 1.0 - math.log(2), -1.0),  # e^d − d − 1 = 2 − 0.6931 − 1 = 0.3069;  ∂/∂logp = 1 − e^d = −1
    ],
)
def test_kl_penalty_by_hand(estimator, value, grad):
    logp = torch.zeros(1, requires_grad=True)
    kl = kl_penalty(logp, torch.tensor([math.log(2)]), estimator)
    kl.sum().backward()
    assert kl.item() == pytest.approx(value, abs=1e-6)
    assert logp.grad.item() == pytest.approx(grad, abs=1e-6)


def test_kl_penalty_k3_is_zero_at_equality_and_unknown_estimator_raises():
    x = torch.randn(5)
    assert torch.equal(kl_penalty(x, x, "k3"), torch.zeros(5))
    with pytest.raises(ValueError, match="'k4'"):
        kl_penalty(x, x, "k4")


# ----------------------------------------------------------------------------------------------------------------
# policy_loss
# ----------------------------------------------------------------------------------------------------------------


def one_token_loss(advantage, log_ratio, **kwargs):
    """policy_loss of a single token with logp − old_logp = log_ratio; returns (loss, ∂loss/∂logp, stats)."""
    logp = torch.tensor([[log_ratio]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1), **kwargs)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


@pytest.mark.parametrize(
    "advantage, log_ratio, expected_loss, clipped",
    [
        # ratio = e^0.5 = 1.6487 > 1.2, clipped to 1.2: max(−1.6487, −1.2) = −1.2, no gradient
        (1.0, 0.5, -1.2, True),
        # ratio = e^−0.5 = 0.6065 < 0.8, clipped to 0.8: max(−0.6065, −0.8) = −0.6065, the unclipped term
        (1.0, -0.5, -math.exp(-0.5), False),
        # A < 0, ratio 1.6487: max(1.6487, 1.2) = 1.6487, unclipped (pessimistic bound)
        (-1.0, 0.5, math.exp(0.5), False),
        # A < 0, ratio 0.6065 clipped to 0.8: max(0.6065, 0.8) = 0.8, no gradient
        (-1.0, -0.5, 0.8, True),
        # ratio = e^0.1 = 1.1052 inside [0.8, 1.2]: −A·ratio = −2.2103 with A = 2
        (2.0, 0.1, -2 * math.exp(0.1), False),
    ],
)
def test_policy_loss_ppo_clip_by_hand(advantage, log_ratio, expected_loss, clipped):
    loss, grad, stats = one_token_loss(advantage, log_ratio)
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    # ∂/∂logp of −A·ratio is −A·ratio; the clipped branch is constant
    assert grad == pytest.approx(0.0 if clipped else -advantage * math.exp(log_ratio), abs=1e-5)
    assert stats["clip_frac"].item() == float(clipped)
    assert stats["ratio_mean"].item() == pytest.approx(math.exp(log_ratio), abs=1e-5)
    assert stats["approx_kl_old"].item() == pytest.approx(0.5 * log_ratio**2, abs=1e-6)


def test_policy_loss_clip_higher_is_asymmetric():
    # ratio = e^0.2 = 1.2214: with clip_high = 0.28 it is inside [0.8, 1.28] → −1.2214 (the token still learns) …
    loss, grad, stats = one_token_loss(1.0, 0.2, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-math.exp(0.2), abs=1e-5) and grad == pytest.approx(-math.exp(0.2), abs=1e-5)
    assert stats["clip_frac"].item() == 0.0
    # … while the symmetric clip caps it at 1.2 → −1.2, no gradient
    loss, grad, _ = one_token_loss(1.0, 0.2)
    assert loss == pytest.approx(-1.2, abs=1e-6) and grad == 0.0
    # the low side keeps 0.2: A = −1, ratio = e^−0.25 = 0.7788 < 0.8 → max(0.7788, 0.8) = 0.8
    loss, grad, _ = one_token_loss(-1.0, -0.25, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(0.8, abs=1e-6) and grad == 0.0


@pytest.mark.parametrize(
    "advantage, log_ratio, expected_loss, dual",
    [
        # A < 0, ratio = e^1.5 = 4.4817: PPO-clip gives max(4.4817, 1.2) = 4.4817; dual-clip caps at −A·c = 3
        (-1.0, 1.5, 3.0, True),
        # A < 0, ratio 1.6487 < c = 3: unchanged
        (-1.0, 0.5, math.exp(0.5), False),
        # A > 0 is never dual-clipped: max(−4.4817, −1.2) = −1.2
        (1.0, 1.5, -1.2, False),
    ],
)
def test_policy_loss_dual_clip_by_hand(advantage, log_ratio, expected_loss, dual):
    loss, grad, stats = one_token_loss(advantage, log_ratio, clip_ratio_c=3.0)
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    assert stats["dual_clip_frac"].item() == float(dual)
    if dual:
        assert grad == 0.0


# Two sequences of three tokens, ratio 1 everywhere, A = [1, 2] → token losses [[−1, −1, −1], [−2, −2, −2]]
AGG_MASK = [[1, 1, 0], [1, 0, 0]]
AGG_EMPTY_ROW_MASK = [[1, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize(
    "loss_agg, expected, expected_empty_row",
    [
        # (−1 −1 −2) / 3 = −4/3;            empty row: (−1 −1) / 2 = −1
        ("token-mean", -4 / 3, -1.0),
        # ((−2)/2 + (−2)/1) / 2 = −1.5;     empty row: (−1 + 0) / 2 = −0.5
        ("seq-mean-token-mean", -1.5, -0.5),
        # ((−2) + (−2)) / 2 = −2;           empty row: (−2 + 0) / 2 = −1
        ("seq-mean-token-sum", -2.0, -1.0),
    ],
)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_policy_loss_aggregations_by_hand(loss_agg, expected, expected_empty_row, mask_dtype):
    advantages = torch.tensor([1.0, 2.0])
    for mask, value in [(AGG_MASK, expected), (AGG_EMPTY_ROW_MASK, expected_empty_row)]:
        logp = torch.zeros(2, 3, requires_grad=True)
        loss, stats = policy_loss(
            logp, torch.zeros(2, 3), advantages, torch.tensor(mask).to(mask_dtype), loss_agg=loss_agg
        )
        loss.backward()
        assert loss.item() == pytest.approx(value, abs=1e-6)
        assert stats["pg_loss"].item() == pytest.approx(value, abs=1e-6)
        assert torch.isfinite(logp.grad).all()
        assert (logp.grad[torch.tensor(mask) == 0] == 0).all()  # masked tokens get no gradient


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_policy_loss_all_masked_is_zero_not_nan(loss_agg):
    logp = torch.randn(3, 4, requires_grad=True)
    loss, stats = policy_loss(logp, torch.randn(3, 4), torch.randn(3), torch.zeros(3, 4), loss_agg=loss_agg)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(3, 4))
    assert all(torch.isfinite(v) for v in stats.values())
    assert stats["ratio_min"].item() == stats["ratio_max"].item() == 1.0


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_policy_loss_micro_batches_with_global_denominators_equal_one_batch(loss_agg):
    gen = torch.Generator().manual_seed(0)
    b, t = 6, 9
    logp = (torch.randn(b, t, generator=gen) * 0.3).requires_grad_(True)
    old_logp, ref_logp = torch.randn(b, t, generator=gen) * 0.3, torch.randn(b, t, generator=gen) * 0.3
    advantages = torch.randn(b, generator=gen)
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[4] = False  # one empty sequence
    kwargs = dict(kl_coef=0.05, loss_agg=loss_agg)

    full, _ = policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, **kwargs)
    (full_grad,) = torch.autograd.grad(full, logp)
    total = torch.zeros(())
    for s in [slice(0, 2), slice(2, 5), slice(5, 6)]:
        part, _ = policy_loss(
            logp[s],
            old_logp[s],
            advantages[s],
            mask[s],
            ref_logp=ref_logp[s],
            **kwargs,
            num_tokens=mask.sum(),
            num_seqs=b,
        )
        total = total + part
    (micro_grad,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(micro_grad, full_grad)


def test_policy_loss_kl_term_by_hand():
    # ratio 1 and A = 0 → pg = 0; ref = logp + ln 2 → k3 = 2 − ln 2 − 1 = 0.3069 per token; loss = 0.1 · 0.3069
    logp = torch.zeros(2, 2, requires_grad=True)
    ref_logp = torch.full((2, 2), math.log(2))
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = policy_loss(logp, torch.zeros(2, 2), torch.zeros(2), mask, ref_logp=ref_logp, kl_coef=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)), abs=1e-6)
    assert stats["kl"].item() == pytest.approx(1 - math.log(2), abs=1e-6)
    assert stats["pg_loss"].item() == 0.0
    # ∂k3/∂logp = 1 − e^d = −1, × kl_coef 0.1, ÷ 3 masked tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.1 / 3, -0.1 / 3], [-0.1 / 3, 0.0]]))
    # with kl_coef = 0 the KL is still reported when ref_logp is given, but not in the loss
    loss, stats = policy_loss(logp, torch.zeros(2, 2), torch.zeros(2), mask, ref_logp=ref_logp)
    assert loss.item() == 0.0 and stats["kl"].item() == pytest.approx(1 - math.log(2), abs=1e-6)
    _, stats = policy_loss(logp, torch.zeros(2, 2), torch.zeros(2), mask)
    assert stats["kl"].item() == 0.0


def test_policy_loss_stats_cover_masked_tokens_only():
    # log-ratios [[0.1, 3.0], [−0.2, 0.0]], the 3.0 token masked out: ratios e^0.1, e^−0.2, e^0 remain
    logp = torch.tensor([[0.1, 3.0], [-0.2, 0.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    _, stats = policy_loss(logp, torch.zeros(2, 2), torch.ones(2), mask)
    assert stats["ratio_max"].item() == pytest.approx(math.exp(0.1), abs=1e-6)
    assert stats["ratio_min"].item() == pytest.approx(math.exp(-0.2), abs=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx((math.exp(0.1) + math.exp(-0.2) + 1) / 3, abs=1e-6)
    assert stats["clip_frac"].item() == 0.0
    assert all(not v.requires_grad and v.ndim == 0 for v in stats.values())


def test_policy_loss_per_token_advantages_equal_broadcast():
    gen = torch.Generator().manual_seed(3)
    logp, old_logp = torch.randn(3, 5, generator=gen) * 0.3, torch.randn(3, 5, generator=gen) * 0.3
    advantages, mask = torch.randn(3, generator=gen), torch.ones(3, 5)
    a, _ = policy_loss(logp, old_logp, advantages, mask)
    b, _ = policy_loss(logp, old_logp, advantages[:, None].expand(3, 5), mask)
    torch.testing.assert_close(a, b)


def test_policy_loss_computes_in_float32_from_bf16_logprobs():
    gen = torch.Generator().manual_seed(4)
    logp, old_logp = torch.randn(3, 5, generator=gen) * 0.3, torch.randn(3, 5, generator=gen) * 0.3
    logp16 = logp.bfloat16().requires_grad_(True)
    advantages, mask = torch.randn(3, generator=gen), torch.ones(3, 5)
    loss16, _ = policy_loss(logp16, old_logp.bfloat16(), advantages, mask)
    loss32, _ = policy_loss(logp16.detach().float(), old_logp.bfloat16().float(), advantages, mask)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32)
    loss16.backward()
    assert logp16.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(loss_agg="token-sum"), "'token-sum'"),
        (dict(kl_coef=0.1), "ref_logp"),
        (dict(kl_estimator="k9", ref_logp=torch.zeros(2, 3), kl_coef=0.1), "'k9'"),
        (dict(clip_ratio_c=0.5), "clip_ratio_c"),
        (dict(advantages=torch.zeros(3)), "advantages"),
        (dict(mask=torch.ones(2, 4)), "mask"),
    ],
)
def test_policy_loss_errors(kwargs, error):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2), mask=torch.ones(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=error):
        policy_loss(**args)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------


def test_dispatch_today_is_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    name = "p2o_lightning.kernels.functional"
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))  # no ops
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"  # CUDA, but no kernels yet
    assert resolve_backend("torch", "cuda") == "torch"
    fns = get_ops("auto", "cpu")
    assert fns.backend == "torch"
    assert (fns.linear_logprob, fns.group_advantage, fns.policy_loss) == (
        linear_logprob,
        group_advantage,
        ops.policy_loss,
    )
    assert fns.linear_logprob_multi is linear_logprob_multi
    with pytest.raises(RuntimeError, match="not implemented yet"):
        resolve_backend("triton", "cuda")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", "cpu")


def test_dispatch_uses_kernels_when_they_exist(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fake = types.ModuleType("p2o_lightning.kernels.functional")
    fake.linear_logprob = lambda *a, **k: "kernel"  # the first kernel landed; the other ops stay the reference
    monkeypatch.setitem(sys.modules, "p2o_lightning.kernels.functional", fake)
    assert resolve_backend("auto", "cpu") == "torch"  # "auto" never picks the interpreter
    fns = get_ops("auto", torch.device("cuda"))
    assert fns.backend == "triton" and fns.linear_logprob is fake.linear_logprob
    assert fns.policy_loss is ops.policy_loss
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"


# ---------------------------------------------------------------------------------------------- context ratio mask
def test_context_ratio_mask_by_hand():
    from p2o_lightning.loss import context_ratio_mask

    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    # log ρ = logp − context_logp = [0, -5, +3, -4.6]  ->  ρ = [1, 0.0067, 20.1, 0.01005]
    context = torch.tensor([[-1.0, 4.0, -4.0, 3.6]])
    assert context_ratio_mask(logp, context, (0.01, 10.0)).tolist() == [[True, False, False, True]]
    assert context_ratio_mask(logp, context, (0.001, 100.0)).tolist() == [[True, True, True, True]]
    with pytest.raises(ValueError, match="context ratio bounds"):
        context_ratio_mask(logp, context, (2.0, 10.0))


def test_policy_loss_context_ratio_mask_drops_tokens():
    logp = torch.zeros(1, 4, requires_grad=True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 4)
    # ρ = exp(old − context) = [1, e^-6 (dropped), e^3 = 20.1 (dropped), 1]
    context = torch.tensor([[0.0, 6.0, -3.0, 0.0]])
    # the reference (scope policy_gradient): the cut tokens lose their PPO term but stay in the token-mean
    # denominator: (-1 + 0 + 0 - 1) / 4 = -0.5, and each kept token's gradient is -A·ratio / 4
    loss, stats = policy_loss(logp, old, adv, mask, context_logp=context)
    assert loss.item() == pytest.approx(-0.5)
    assert stats["context_masked_frac"].item() == pytest.approx(0.5)
    loss.backward()
    assert logp.grad.tolist() == [[-0.25, 0.0, 0.0, -0.25]]
    # scope tokens: the cut tokens leave the loss: token-mean over the 2 kept tokens of -A·ratio = -1 each
    logp.grad = None
    loss, stats = policy_loss(logp, old, adv, mask, context_logp=context, context_mask_scope="tokens")
    assert loss.item() == pytest.approx(-1.0)
    assert stats["context_masked_frac"].item() == pytest.approx(0.5)
    loss.backward()
    assert logp.grad.tolist() == [[-0.5, 0.0, 0.0, -0.5]]
    _, plain = policy_loss(logp, old, adv, mask)
    assert plain["context_masked_frac"].item() == 0.0
    with pytest.raises(ValueError, match="context_mask_scope='all' is unknown"):
        policy_loss(logp, old, adv, mask, context_logp=context, context_mask_scope="all")


def test_policy_loss_context_ratio_mask_never_touches_kl():
    logp = torch.zeros(1, 4, requires_grad=True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([0.0])  # no PPO term: the loss is the KL term alone
    mask = torch.ones(1, 4)
    ref = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # k1 = logp − ref = -1 on every token
    context = torch.tensor([[0.0, 6.0, -3.0, 0.0]])  # tokens 1 and 2 cut by the context ratio mask
    loss, stats = policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.5, kl_estimator="k1", context_logp=context)
    # policy_gradient scope: β · mean over all 4 response tokens of k1 = 0.5 · -1; ∂/∂logp = 0.5 · 1 / 4
    assert loss.item() == pytest.approx(-0.5)
    assert stats["kl"].item() == pytest.approx(-1.0)
    loss.backward()
    assert logp.grad.tolist() == [[0.125, 0.125, 0.125, 0.125]]
    logp.grad = None
    loss, _ = policy_loss(
        logp, old, adv, mask, ref_logp=ref, kl_coef=0.5, kl_estimator="k1", context_logp=context,
        context_mask_scope="tokens",
    )  # fmt: skip
    # tokens scope: the KL of the 2 kept tokens only, over 2: 0.5 · -1; ∂/∂logp = 0.5 / 2 on the kept tokens
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    assert logp.grad.tolist() == [[0.25, 0.0, 0.0, 0.25]]
