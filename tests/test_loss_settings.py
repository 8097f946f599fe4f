"""One loss, every implementation: the torch reference, the fused head and the Triton path, over a grid of
:class:`~p2o_lightning.loss.LossSettings`, give equal losses and gradients.

The loss is the update's (:mod:`p2o_lightning.step.update`): the PPO-clip term on log π(y | x), its context ratio mask
reading π_old(y | t(x)), and P²O's skill anchor, ``anchor_weight`` × the loss of :attr:`LossSettings.anchor` on
log π(y | t(x)) of the distilled rows. Each implementation computes it from hidden states and the LM head, as the
trainer does, and the gradients are taken w.r.t. the hidden states of both prompts and the head:

- ratio ≠ 1 (an update after the π_old pass): ``linear_logprob`` then ``policy_loss`` of the torch and the Triton
  backend (:func:`p2o_lightning.backend.get_ops`);
- ratio 1 (a single update, π_old = π_θ detached): the same two, and the fused head of each backend
  (``fused_linear_policy_loss`` with :class:`~p2o_lightning.fused_head.RatioOneLoss`), which refuses the ``tokens``
  scope with a context ratio mask (its means divide by the tokens the mask keeps; the update then takes the π_old
  pass).

Without CUDA the kernels run in Triton's interpreter (float32; shapes small and odd: no dimension a multiple of a
block). A new loss option is a field of ``LossSettings``, its formula in the implementations, and a row of ``GRID``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter; before triton imports

import dataclasses  # noqa: E402
import itertools  # noqa: E402

import pytest  # noqa: E402

from p2o_lightning.backend import get_ops  # noqa: E402
from p2o_lightning.fused_head import RatioOneLoss  # noqa: E402
from p2o_lightning.loss import KL_ESTIMATORS, LOSS_AGGS, LossSettings, context_ratio_mask  # noqa: E402

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, T, H, V = 3, 7, 9, 37  # odd: B·T, H and V span partial blocks

# every loss option and the values the grid takes; a new option adds its row here
GRID = {
    "loss_agg": LOSS_AGGS,
    "kl": [(0.0, "k3"), *((0.1, estimator) for estimator in KL_ESTIMATORS)],  # (kl_coef, kl_estimator)
    "context": [(None, "policy_gradient"), ((0.5, 2.0), "policy_gradient"), ((0.5, 2.0), "tokens")],
    "anchor_weight": [0.0, 0.5],
}
CASES = list(itertools.product(*GRID.values()))


def _settings(loss_agg, kl, context, anchor_weight, clip_ratio_c) -> LossSettings:
    (kl_coef, kl_estimator), (bounds, scope) = kl, context
    return LossSettings(
        clip_low=0.2, clip_high=0.28, clip_ratio_c=clip_ratio_c, loss_agg=loss_agg, kl_coef=kl_coef,
        kl_estimator=kl_estimator, context_ratio_bounds=bounds, context_mask_scope=scope, anchor_weight=anchor_weight,
    )  # fmt: skip


def _case_id(case) -> str:
    loss_agg, (kl_coef, estimator), (bounds, scope), anchor = case
    kl = f"kl-{estimator}" if kl_coef else "no-kl"
    context = f"mask-{scope}" if bounds else "no-mask"
    return f"{loss_agg}-{kl}-{context}-anchor{anchor}"


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    """Hidden states of the trained prompt x and the sampled prompt t(x) (close: their log-probs differ by a ratio
    the mask cuts on some tokens), the head, targets (ignored past each row's length), advantages, π_ref's and
    π_old's perturbations, and which rows are distilled (the anchor trains those).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden_x = torch.randn(B, T, H, generator=gen)
    hidden_t = hidden_x + 0.5 * torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    lengths = torch.tensor([T, 1, T - 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T): right-padded responses
    targets = torch.randint(0, V, (B, T), generator=gen).masked_fill(~mask, -100)
    tensors = dict(
        hidden_x=hidden_x, hidden_t=hidden_t, weight=weight, targets=targets, mask=mask,
        advantages=torch.randn(B, generator=gen), ref_noise=0.3 * torch.randn(B, T, generator=gen),
        old_noise=0.25 * torch.randn(B, T, generator=gen), distilled=torch.tensor([True, False, True]),
    )  # fmt: skip
    return {k: v.to(DEVICE) for k, v in tensors.items()}


def _loss(ops, settings: LossSettings, x: dict, ratio_one: bool, fused: bool):
    """The update's loss by one implementation, and its gradients w.r.t. (hidden_x, hidden_t, weight)."""
    leaves = [x[k].clone().requires_grad_(True) for k in ("hidden_x", "hidden_t", "weight")]
    hidden_x, hidden_t, weight = leaves
    targets, mask, adv = x["targets"], x["mask"], x["advantages"]
    anchor_mask = mask & x["distilled"][:, None]
    logp_t, _ = ops.linear_logprob(hidden_t, weight, targets)  # log π(y | t(x)): the anchor's and the mask's
    context = logp_t.detach() if ratio_one else logp_t.detach() + x["old_noise"].flip(0)  # π_old(y | t(x))
    with torch.no_grad():
        true_x, _ = ops.linear_logprob(hidden_x, weight, targets)
    ref = true_x + x["ref_noise"] if settings.kl_coef > 0 else None
    if fused:  # ratio 1: the loss's weights, its gradients computed in the log-prob pass
        head = RatioOneLoss.of(adv, mask, settings, ref_logp=ref, context_logp=context)
        loss, _, _ = ops.fused_linear_policy_loss(hidden_x, weight, targets, head)
        stats = None
        if settings.anchor_weight > 0:
            head = RatioOneLoss.of(adv, anchor_mask, settings.anchor)
            anchor, _, _ = ops.fused_linear_policy_loss(hidden_t, weight, targets, head)
            loss = loss + settings.anchor_weight * anchor
    else:
        logp_x, _ = ops.linear_logprob(hidden_x, weight, targets)
        old = logp_x.detach() if ratio_one else logp_x.detach() + x["old_noise"]
        loss, stats = ops.policy_loss(logp_x, old, adv, mask, settings, ref_logp=ref, context_logp=context)
        if settings.anchor_weight > 0:
            anchor, _ = ops.policy_loss(logp_t, context, adv, anchor_mask, settings.anchor)
            loss = loss + settings.anchor_weight * anchor
    grads = torch.autograd.grad(1.3 * loss, leaves, allow_unused=True)  # upstream gradient ≠ 1
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    return loss.detach(), stats, grads


def _assert_equal(got, expected, what: str) -> None:
    (loss, stats, grads), (loss_ref, stats_ref, grads_ref) = got, expected
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6, msg=f"{what}: loss")
    for name, g, g_ref in zip(("hidden_x", "hidden_t", "weight"), grads, grads_ref):
        scale = g_ref.abs().max().item() or 1.0
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * scale, msg=f"{what}: grad of {name}")
    if stats is not None and stats_ref is not None:
        assert stats.keys() == stats_ref.keys()
        for key in stats_ref:
            torch.testing.assert_close(stats[key], stats_ref[key], rtol=1e-5, atol=1e-6, msg=f"{what}: {key}")


@pytest.mark.parametrize("ratio_one", [False, True], ids=["ratio-not-1", "ratio-1"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_every_implementation_gives_the_same_loss_and_gradients(case, ratio_one):
    index = CASES.index(case)
    settings = _settings(*case, clip_ratio_c=3.0 if index % 2 else None)  # dual-clip on every other case
    x = _inputs(seed=0)
    torch_ops, triton_ops = get_ops("torch", DEVICE), get_ops("triton", DEVICE)
    reference = _loss(torch_ops, settings, x, ratio_one, fused=False)
    assert reference[0] != 0 and reference[2][2].abs().max() > 0  # a loss with a gradient
    if settings.context_ratio_bounds is not None:  # the mask is at work: it cuts some tokens, keeps others
        assert 0 < reference[1]["context_masked_frac"] < 1
    _assert_equal(_loss(triton_ops, settings, x, ratio_one, fused=False), reference, "triton policy_loss")
    if not ratio_one:
        return  # the fused head is the loss of a single update: ratio 1
    for name, ops in (("torch", torch_ops), ("triton", triton_ops)):
        if settings.context_ratio_bounds is not None and settings.context_mask_scope == "tokens":
            with pytest.raises(ValueError, match="policy_gradient"):
                _loss(ops, settings, x, ratio_one, fused=True)
            continue
        _assert_equal(_loss(ops, settings, x, ratio_one, fused=True), reference, f"{name} fused head")


def test_the_grid_covers_every_setting_of_the_loss():
    """Each field of LossSettings is varied by the grid (or fixed on purpose): a new option needs a row of GRID."""
    varied = {"loss_agg", "kl_coef", "kl_estimator", "context_ratio_bounds", "context_mask_scope", "anchor_weight"}
    varied |= {"clip_ratio_c"}  # alternates between the cases
    fixed = {"clip_low", "clip_high"}  # the cases' ratios ≠ 1 cross both clip bounds
    assert {f.name for f in dataclasses.fields(LossSettings)} == varied | fixed


def test_settings_errors_name_the_field():
    for kwargs, field in [
        (dict(loss_agg="token-sum"), "loss_agg"),
        (dict(kl_estimator="k9"), "kl_estimator"),
        (dict(kl_coef=-0.1), "kl_coef"),
        (dict(clip_ratio_c=0.5), "clip_ratio_c"),
        (dict(context_ratio_bounds=(2.0, 10.0)), "context_ratio_bounds"),
        (dict(context_mask_scope="all"), "context_mask_scope"),
        (dict(anchor_weight=float("nan")), "anchor_weight"),
    ]:
        with pytest.raises(ValueError, match=field):
            LossSettings(**kwargs)


def test_the_anchor_is_the_ppo_term_without_kl_or_mask():
    settings = LossSettings(
        kl_coef=0.1, context_ratio_bounds=(0.5, 2.0), anchor_weight=0.5, loss_agg="seq-mean-token-sum"
    )
    assert settings.anchor == LossSettings(kl_coef=0.0, context_ratio_bounds=None, loss_agg="seq-mean-token-sum")


def test_the_context_ratio_mask_cuts_outside_the_bounds():
    logp = torch.zeros(1, 4)
    context = torch.tensor([[0.0, 0.8, -0.8, 0.6]])  # ρ = [1, 0.45, 2.2, 0.55]
    assert context_ratio_mask(logp, context, (0.5, 2.0)).tolist() == [[True, False, False, True]]
