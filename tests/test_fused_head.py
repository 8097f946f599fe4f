"""The fused head of a single update (``p2o_lightning/fused_head.py``, ``kernels/fused_head.py``): the loss at ratio 1
and its gradients w.r.t. hidden states and LM head, computed in the log-prob pass, against autograd through the
unfused path (the float64 full-logits log-prob, then ``policy_loss`` with ``old_logp = logp.detach()``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter; before triton imports

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
from helpers import assert_close, make_logprob_inputs, naive_logprob, one_step, small_module  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from p2o_lightning.backend import get_ops  # noqa: E402
from p2o_lightning.fused_head import RatioOneLoss  # noqa: E402
from p2o_lightning.loss import LossSettings  # noqa: E402
from p2o_lightning.ops import policy_loss  # noqa: E402
from p2o_lightning.step.update import FUSED_HEAD_MIN_VOCAB  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the op tests run compiled on a GPU (gpu_check.py)
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton is not installed"))]  # fmt: skip

# (B, T, H, V): T·B not a multiple of any chunk or block, V and H odd
SHAPES = [(3, 13, 19, 53), (5, 7, 33, 257)]
# loss settings of policy_loss; "context" adds P²O's context ratio mask (policy_gradient scope)
LOSSES = {
    "token-mean": dict(loss_agg="token-mean"),
    "token-mean k3 T=0.7": dict(loss_agg="token-mean", kl_coef=0.1, kl_estimator="k3", temperature=0.7),
    "seq-mean-token-mean k2 context": dict(loss_agg="seq-mean-token-mean", kl_coef=0.05, kl_estimator="k2",
                                           context=True),
    "seq-mean-token-sum k1 per-token A": dict(loss_agg="seq-mean-token-sum", kl_coef=0.2, kl_estimator="k1",
                                              per_token_adv=True, num_seqs=7.0),
    "token-mean context num_tokens": dict(loss_agg="token-mean", context=True, num_tokens=40.0, temperature=1.3),
}  # fmt: skip


def _inputs(b, t, h, v, dtype, seed=0):
    """hidden (B, T, H), weight (V, H), targets (B, T) (ignore_index where masked), mask, advantages, π_ref."""
    hidden, weight, _ = make_logprob_inputs(b * t, h, v, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = 0  # an empty row
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T) right-padded responses
    targets = torch.randint(0, v, (b, t), generator=gen).masked_fill(~mask, -100)
    advantages = torch.randn(b, generator=gen)
    ref_noise = torch.randn(b, t, generator=gen)
    context_noise = torch.empty(b, t).uniform_(-4, 4, generator=gen)  # log ρ beyond log 0.01 / log 10 for some
    return hidden.view(b, t, h), weight, targets, mask, advantages, ref_noise, context_noise


def _case(shape, setting, dtype=torch.float32, seed=0):
    """The inputs of a case, π_ref and the context around the true log-probs, and policy_loss's keyword arguments."""
    b, t, h, v = shape
    hidden, weight, targets, mask, advantages, ref_noise, context_noise = (
        x.to(DEVICE) for x in _inputs(b, t, h, v, dtype, seed)
    )
    temperature = setting.get("temperature", 1.0)
    with torch.no_grad():
        true = naive_logprob(hidden.reshape(-1, h), weight, targets.reshape(-1), temperature)[0].view(b, t).float()
    if setting.get("per_token_adv"):
        advantages = advantages[:, None] * (1 + ref_noise.abs())  # (B, T), TIS-weighted advantages
    context = true + context_noise if setting.get("context") else None
    settings = LossSettings(  # clip and dual-clip set: inactive at ratio 1
        clip_ratio_c=3.0, loss_agg=setting["loss_agg"], kl_coef=setting.get("kl_coef", 0.0),
        kl_estimator=setting.get("kl_estimator", "k3"),
        context_ratio_bounds=(0.01, 10.0) if context is not None else None,
    )  # fmt: skip
    kwargs = dict(settings=settings, num_tokens=setting.get("num_tokens"), num_seqs=setting.get("num_seqs"))
    kwargs["ref_logp"] = true + 0.3 * ref_noise if settings.kl_coef > 0 else None
    return hidden, weight, targets, mask, advantages, temperature, kwargs, context


def _unfused(hidden, weight, targets, mask, advantages, temperature, kwargs, context):
    """The oracle: float64 full-logits log-probs, policy_loss at ratio 1 (clip and dual-clip set: inactive there)."""
    b, t, h = hidden.shape
    hidden64 = hidden.detach().double().requires_grad_(True)
    weight64 = weight.detach().double().requires_grad_(True)
    logp, entropy = naive_logprob(hidden64.reshape(-1, h), weight64, targets.reshape(-1), temperature)
    logp = logp.view(b, t)
    ref = kwargs["ref_logp"]
    loss, _ = policy_loss(
        logp, logp.detach(), advantages.double(), mask, **dict(kwargs, ref_logp=None if ref is None else ref.double()),
        context_logp=None if context is None else context.double(),
    )  # fmt: skip
    grad_hidden, grad_weight = torch.autograd.grad(0.7 * loss, [hidden64, weight64])  # upstream grad 0.7 ≠ 1
    return loss.detach(), logp.detach(), entropy.detach().view(b, t), grad_hidden, grad_weight


def _fused(op, hidden, weight, targets, mask, advantages, temperature, kwargs, context, **op_kwargs):
    head_loss = RatioOneLoss.of(advantages, mask, **kwargs, context_logp=context)
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    loss, logp, entropy = op(hidden, weight, targets, head_loss, temperature=temperature, return_entropy=True,
                             **op_kwargs)  # fmt: skip
    assert not logp.requires_grad and not entropy.requires_grad
    grad_hidden, grad_weight = torch.autograd.grad(0.7 * loss, [hidden, weight])
    return loss.detach(), logp, entropy, grad_hidden, grad_weight


def _assert_matches(fused, unfused, fwd_atol, grad_rtol, grad_atol):
    (loss, logp, entropy, gh, gw), (loss64, logp64, entropy64, gh64, gw64) = fused, unfused
    assert_close(loss, loss64, rtol=1e-5, atol=fwd_atol)
    assert_close(logp, logp64, rtol=1e-5, atol=fwd_atol)
    assert_close(entropy, entropy64, rtol=1e-5, atol=fwd_atol)
    assert gh64.abs().max() > 0 and gw64.abs().max() > 0  # a case with gradient
    assert_close(gh, gh64, rtol=grad_rtol, atol=grad_atol * gh64.abs().max().item())
    assert_close(gw, gw64, rtol=grad_rtol, atol=grad_atol * gw64.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", list(LOSSES), ids=list(LOSSES))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{b}x{t}x{h}x{v}" for b, t, h, v in SHAPES])
def test_fused_head_equals_autograd_of_the_unfused_loss(backend, setting, shape):
    case = _case(shape, LOSSES[setting])
    op = get_ops(backend, DEVICE).fused_linear_policy_loss
    # chunk_size 8: several row chunks, the last one partial
    fused = _fused(op, *case, chunk_size=8)
    unfused = _unfused(*case)
    _assert_matches(fused, unfused, fwd_atol=2e-5, grad_rtol=1e-4, grad_atol=1e-5)
    # the masked rows: log-prob 0, entropy 0, no gradient
    hidden, _, targets = case[:3]
    ignored = targets == -100
    assert (fused[1][ignored] == 0).all() and (fused[2][ignored] == 0).all()
    assert (fused[3][ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_head_float64_and_bfloat16_inputs(backend):
    """float64 inputs compute in float32 (as the log-prob op) and get float64 gradients; bf16 inputs bf16 ones."""
    op = get_ops(backend, DEVICE).fused_linear_policy_loss
    setting = LOSSES["token-mean k3 T=0.7"]
    # the reference upcasts bf16 to float32; the kernel's matmuls stay bf16 (bf16 logits, as Liger's): coarser
    bf16 = (2e-5, 1e-2, 1e-2) if backend == "torch" else (0.05, 0.05, 0.02)
    for dtype, tolerances in ((torch.float64, (2e-5, 1e-4, 1e-5)), (torch.bfloat16, bf16)):
        case = _case(SHAPES[0], setting, dtype=dtype)
        fused = _fused(op, *case)
        assert fused[3].dtype == fused[4].dtype == dtype
        _assert_matches(fused, _unfused(*case), *tolerances)


def test_the_coefficient_is_the_loss_gradient_wrt_logp():
    """RatioOneLoss.terms gives policy_loss's value per token and autograd's ∂L/∂logp, for every estimator."""
    gen = torch.Generator().manual_seed(3)
    b, t = 4, 9
    logp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    mask = torch.rand(b, t, generator=gen) < 0.7
    adv, ref = torch.randn(b, generator=gen, dtype=torch.float64), logp - torch.randn(b, t, generator=gen).double()
    context = logp + torch.empty(b, t, dtype=torch.float64).uniform_(-6, 6, generator=gen)
    for estimator in ("k1", "k2", "k3"):
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
            settings = LossSettings(kl_coef=0.3, kl_estimator=estimator, loss_agg=agg)
            leaf = logp.clone().requires_grad_(True)
            expected, _ = policy_loss(leaf, leaf.detach(), adv, mask, settings, ref_logp=ref, context_logp=context)
            (grad,) = torch.autograd.grad(expected, leaf)
            weights = RatioOneLoss.of(adv, mask, settings, ref_logp=ref, context_logp=context)
            value, coef = weights.flat().terms(logp.reshape(-1).float(), slice(None))
            torch.testing.assert_close(value.sum().double(), expected.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(coef.double(), grad.reshape(-1), rtol=1e-5, atol=1e-6)
    # the context ratio mask cut some tokens (this test would not see a wrong mask otherwise)
    log_rho = (logp - context)[mask]
    assert ((log_rho < -4.6) | (log_rho > 2.31)).any()


def test_refuses_the_tokens_scope_with_a_context_mask():
    with pytest.raises(ValueError, match="policy_gradient"):
        RatioOneLoss.of(
            torch.ones(2), torch.ones(2, 3), LossSettings(context_mask_scope="tokens"), context_logp=torch.zeros(2, 3)
        )
    with pytest.raises(ValueError, match="ref_logp"):
        RatioOneLoss.of(torch.ones(2), torch.ones(2, 3), LossSettings(kl_coef=0.1))


# ----------------------------------------------------------------------------------------------------------------
# The trainer: one RL step with the fused head equals the unfused one; its passes decide where it runs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        # P²O rows (distilled, templated and plain); the tiny world's templates move log-probs little: a narrow
        # context ratio mask cuts ~40% of the tokens
        dict(context_ratio_bounds=(0.99, 1.01)),
        dict(kl_coef=0.05, loss_agg="seq-mean-token-mean", temperature=0.8),
        dict(kl_coef=0.1, kl_estimator="k2", loss_agg="seq-mean-token-sum", backend="triton"),
    ],
    ids=["p2o", "kl-k3-seq-mean-T0.8", "kl-k2-seq-sum-triton"],
)
def test_one_step_with_the_fused_head_equals_the_unfused_step(tiny_world, tmp_path, monkeypatch, kw):
    import p2o_lightning.fused_head as fused_head_mod

    calls = []
    softmax_chunk = fused_head_mod.softmax_chunk
    monkeypatch.setattr(fused_head_mod, "softmax_chunk", lambda *a: calls.append(1) or softmax_chunk(*a))
    unfused, b = one_step(tiny_world, tmp_path / "unfused", fuse=True, **kw)
    assert not calls  # the default path never runs the fused head
    fused, a = one_step(tiny_world, tmp_path / "fused", fuse=True, fused_head=True, **kw)
    if kw.get("backend") != "triton":
        assert calls  # the fused head ran (the reference's chunks)
    assert a["train/reward"] == b["train/reward"]  # the same rollouts
    for key in ("train/loss", "train/pg_loss", "train/entropy", "train/kl", "train/context_masked_frac"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert a["train/loss"] != 0.0
    if "context_ratio_bounds" in kw:
        assert 0 < a["train/context_masked_frac"] < 1  # the mask is at work in this step
    moved = 0
    start = dict(AutoModelForCausalLM.from_pretrained(str(tiny_world)).named_parameters())
    for (name, p), q in zip(fused.policy.lm.named_parameters(), unfused.policy.lm.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(p, start[name]))
    assert moved > 0  # SGD moved the weights: equal parameters mean equal gradients


def test_the_passes_run_the_fused_head_only_at_ratio_one(tiny_world):
    """PPOUpdate.passes: fused where π_old is π_θ detached and no skill anchor; else the unfused path."""
    batch = SimpleNamespace(num_groups=4, reprompted=True, sampling_logp=None)

    def passes(tis_cap=None, **kw):
        return small_module(tiny_world, fused_head=True, **kw).ppo.passes(batch, tis_cap)

    assert passes().fused_head and not passes().old_pass  # one epoch, one mini-batch: ratio 1
    assert not passes(ppo_epochs=2).fused_head  # a second epoch's ratio is not 1
    assert not passes(ppo_mini_batch_size=2).fused_head  # nor a second mini-batch's
    assert passes(ppo_mini_batch_size=4).fused_head  # one mini-batch of all 4 groups
    assert not passes(tis_cap=2.0).fused_head  # TIS weights need π_old before the update
    assert not passes(anchor_weight=0.5).fused_head  # the anchor's loss needs log π(y|t(x)) with a gradient
    assert not passes(context_mask_scope="tokens").fused_head  # its means divide by the kept tokens (old pass)
    # by default (fused_head=None) the vocabulary decides: on from FUSED_HEAD_MIN_VOCAB, where it wins
    default = small_module(tiny_world).ppo
    assert not default.passes(batch, None).fused_head  # no vocabulary given: off
    assert not default.passes(batch, None, vocab_size=100).fused_head  # the embedded world's: off
    assert default.passes(batch, None, vocab_size=FUSED_HEAD_MIN_VOCAB).fused_head
    assert not default.passes(batch, 2.0, vocab_size=151_936).fused_head  # still only where it applies
    assert not small_module(tiny_world, fused_head=False).ppo.passes(batch, None, vocab_size=151_936).fused_head
    # a head_dtype reads only the fused head: it turns the default on
    assert small_module(tiny_world, head_dtype="bfloat16").ppo.passes(batch, None, vocab_size=100).fused_head


def test_head_dtype_is_refused_where_it_would_not_apply(tiny_world):
    with pytest.raises(ValueError, match="needs fused_head True or None"):
        small_module(tiny_world, fused_head=False, head_dtype="bfloat16")
    with pytest.raises(ValueError, match="head_dtype='float16' is unknown"):
        small_module(tiny_world, fused_head=True, head_dtype="float16")
    module = small_module(tiny_world, fused_head=True, head_dtype="bfloat16", ppo_epochs=2, tis_cap=2.0)
    with pytest.raises(ValueError, match="ppo_epochs=2, tis_cap=2.0 would take the unfused path"):
        module.ppo.check_head_dtype(2.0, 4, torch.device("cpu"))
    small_module(tiny_world, fused_head=True, head_dtype="bfloat16").ppo.check_head_dtype(None, 4, torch.device("cpu"))


def test_a_bf16_head_step_stays_close_to_the_float32_one(tiny_world, tmp_path):
    f32, a = one_step(tiny_world, tmp_path / "f32", fuse=True, fused_head=True)
    bf16, b = one_step(tiny_world, tmp_path / "bf16", fuse=True, fused_head=True, head_dtype="bfloat16")
    assert a["train/reward"] == b["train/reward"]
    assert b["train/entropy"] == pytest.approx(a["train/entropy"], rel=0.02)
    assert b["train/loss"] == pytest.approx(a["train/loss"], rel=0.05, abs=1e-3)
    assert any(not torch.equal(p, q) for p, q in zip(f32.policy.parameters(), bf16.policy.parameters()))


def test_the_backward_runs_once():
    """The stored gradients are scaled in place (no (V, H) copy): a second backward through them is refused."""
    hidden, weight, targets, mask, advantages, *_ = _inputs(2, 5, 8, 11, torch.float32)
    weight.requires_grad_(True)
    loss, _, _ = get_ops("torch", "cpu").fused_linear_policy_loss(
        hidden, weight, targets, RatioOneLoss.of(advantages, mask, LossSettings())
    )
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()
