"""The RL step's stages on the tiny world: one-pass context log-probs, the skipped old pass, statistics, clipping."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter; before triton imports

from types import SimpleNamespace  # noqa: E402

import lightning as L  # noqa: E402
import pytest  # noqa: E402
from helpers import ParityReward, one_step, small_data, small_module, trainer  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from p2o_lightning.backend import get_ops  # noqa: E402
from p2o_lightning.optim import OptimizerStep  # noqa: E402
from p2o_lightning.rollout import SamplingParams  # noqa: E402
from p2o_lightning.step.distill import opening_gate, opening_open_rows, reprompt  # noqa: E402
from p2o_lightning.step.logprobs import token_logprobs  # noqa: E402
from p2o_lightning.step.sample import GroupSampler  # noqa: E402
from p2o_lightning.step.stats import UpdateStats, rank_reduction, reduction  # noqa: E402
from p2o_lightning.tasks.addition import world_splits  # noqa: E402


def _distilled_batch(module, n_prompts=3):
    """A real rollout batch whose rows are sampled under templates and trained under the plain prompt."""
    module.configure_model()
    prompts = [p.prompt for p in world_splits()["train"][:n_prompts]]
    answers = [p.answer for p in world_splits()["train"][:n_prompts]]
    k = module.rollout.num_rollouts
    assignments = {p: ["Add.", "Carry.", "", "Add."][:k] for p in prompts}
    torch.manual_seed(0)
    sample_groups = GroupSampler(module.sample, SamplingParams(k, 1.0, 1.0, 8), assignments)
    batch = sample_groups([{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
    return reprompt(batch, module.engine.encode_prompts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_pass_context_logprobs_equal_two_passes(tiny_world, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    module = small_module(tiny_world, backend=backend, micro_batch_size=5)
    batch = _distilled_batch(module)
    assert batch.reprompted and not torch.equal(batch.sampled_prompt_ids, batch.prompt_ids)
    ops, settings = get_ops(backend, "cpu"), module.ppo.logprob
    with torch.no_grad():
        # one pass: log π(y|x) and log π(y|t(x)) from one linear_logprob_multi call per micro-batch
        logp, entropy, context = token_logprobs(
            module.policy, batch, ops, settings, return_entropy=True, with_context=True
        )
        # two passes: the trained prompts, then the sampled prompts, each through linear_logprob
        logp2, entropy2, _ = token_logprobs(module.policy, batch, ops, settings, return_entropy=True)
        sampled = batch.with_(prompt_ids=batch.sampled_prompt_ids, prompt_mask=batch.sampled_prompt_mask)
        context2 = token_logprobs(module.policy, sampled, ops, settings)[0]
    torch.testing.assert_close(logp, logp2, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, entropy2, rtol=0, atol=1e-5)
    torch.testing.assert_close(context, context2, rtol=0, atol=1e-5)
    # the templated rows' two contexts differ (a check that cannot pass by scoring x twice)
    rows = torch.tensor(batch.plan.distilled_rows)
    assert (context[rows] - logp[rows]).abs().max() > 1e-3
    # rows sampled under x itself (the seed template "") have the same context twice: ρ = 1
    torch.testing.assert_close(context[~rows], logp[~rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_single_update_skips_old_pass_with_equal_losses_and_gradients(tiny_world, tmp_path, kl_coef):
    fused, a = one_step(tiny_world, tmp_path / "fused", fuse=True, kl_coef=kl_coef)
    separate, b = one_step(tiny_world, tmp_path / "separate", fuse=False, kl_coef=kl_coef)
    assert a["train/reward"] == b["train/reward"]  # the same rollouts
    assert a["p2o/templated_share"] == 1.0
    for key in ("train/loss", "train/pg_loss", "train/entropy", "train/kl", "train/context_masked_frac"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert a["train/ratio_min"] == a["train/ratio_max"] == 1.0  # π_old is π_θ detached: every ratio is exactly 1
    assert b["train/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert a["train/loss"] != 0.0  # the step did learn something: parity rewards spread within groups
    for p, q in zip(fused.policy.parameters(), separate.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fuse", [True, False])
def test_skill_anchor_adds_the_templated_prompts_loss(tiny_world, tmp_path, fuse):
    # every row templated (no plain rows), so with SGD and one update the step is linear in the loss:
    # L_anchor = L_PPO(y | x; ratio mask) + w · L_PPO(y | t(x)) = L_distill + w · L_no-distill
    templates = ("Add.", "Carry.", "Add.", "Carry.")
    runs = {
        name: one_step(tiny_world, tmp_path / name, fuse, templates=templates, **kw)
        for name, kw in {"distill": {}, "no_distill": {"distill": False}, "anchor": {"anchor_weight": 0.5}}.items()
    }
    rewards = {name: seen["train/reward"] for name, (_, seen) in runs.items()}
    assert len(set(rewards.values())) == 1  # the same rollouts in all three
    start = dict(AutoModelForCausalLM.from_pretrained(str(tiny_world)).named_parameters())
    moved = {name: dict(m.policy.lm.named_parameters()) for name, (m, _) in runs.items()}
    changed = 0
    for key, p0 in start.items():
        d, n, a = (moved[r][key].detach() - p0.detach() for r in ("distill", "no_distill", "anchor"))
        torch.testing.assert_close(a, d + 0.5 * n, rtol=1e-4, atol=1e-6)
        changed += int(not torch.allclose(a, d, atol=1e-6))
    assert changed > 0  # the anchor did move the weights beyond distillation
    assert runs["anchor"][1]["train/anchor_loss"] != 0.0
    with pytest.raises(ValueError, match="anchor_weight"):
        small_module(tiny_world, anchor_weight=-1.0)


@pytest.mark.parametrize("fuse", [True, False])
def test_skill_anchor_backward_of_its_own_equals_one_backward(tiny_world, tmp_path, monkeypatch, fuse):
    # the anchor's backward runs apart (timed as time/anchor_backward_s): the gradients add up to those of one
    # backward of L_distill + w · L_anchor, the loss before the split, up to summation order
    apart, seen = one_step(tiny_world, tmp_path / "apart", fuse, anchor_weight=0.5)
    pending = []  # every backward's loss, then one backward of their sum before the optimizer step

    step = OptimizerStep.__call__

    def one_backward_then_step(self, *args):
        torch.stack(pending).sum().backward()  # what manual_backward does on one CPU device in float32
        pending.clear()
        return step(self, *args)

    monkeypatch.setattr(ParityReward, "manual_backward", lambda self, loss: pending.append(loss))
    monkeypatch.setattr(OptimizerStep, "__call__", one_backward_then_step)
    summed, seen_summed = one_step(tiny_world, tmp_path / "summed", fuse, anchor_weight=0.5)
    assert seen["train/reward"] == seen_summed["train/reward"] and seen["train/anchor_loss"] != 0.0
    assert seen["train/loss"] == pytest.approx(seen_summed["train/loss"], rel=1e-6)  # L_distill + w · L_anchor
    for p, q in zip(apart.policy.parameters(), summed.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # P²O's extras, each on its own and inside its stage (an anchored step has both)
    for clock in ("_s", "_cpu_s"):
        assert 0 < seen[f"time/anchor_backward{clock}"] < seen[f"time/update{clock}"]
        stages = seen[f"time/logprob{clock}"] + seen[f"time/update{clock}"]
        assert 0 < seen[f"time/context_forward{clock}"] < stages


def test_extra_costs_are_zero_without_them(tiny_world, tmp_path):
    # the paper's loss: a context forward, no anchor backward; a step without distilled rows (GRPO): neither
    _, paper = one_step(tiny_world, tmp_path / "paper", fuse=True)
    _, grpo = one_step(tiny_world, tmp_path / "grpo", fuse=True, templates=("", "", "", ""))
    assert paper["p2o/templated_share"] == 1.0 and grpo["p2o/templated_share"] == 0.0
    assert paper["time/context_forward_s"] > 0 and paper["time/anchor_backward_s"] == 0.0
    assert grpo["time/context_forward_s"] == grpo["time/context_forward_cpu_s"] == 0.0
    assert grpo["time/anchor_backward_s"] == grpo["time/anchor_backward_cpu_s"] == 0.0
    assert rank_reduction("time/context_forward_cpu_s") == "mean"  # each rank's own process clock, as run_cpu_s


def test_opening_gate_by_hand():
    # 3 rows × 5 tokens, opening = the first 2 tokens, γ = 0.5 (log γ = -0.693)
    old = torch.tensor([[-5.0, -5.0, -1.0, -1.0, -1.0],  # row 0: rest log ρ = -1, -1, -1 -> mean -1 < log γ: closed
                        [-5.0, -5.0, -1.2, -1.0, 0.0],  # row 1: rest log ρ = -0.2, 0, (masked) -> -0.1: open
                        [-5.0, -5.0, -3.0, -3.0, -3.0]])  # row 2: not distilled (a plain row): always open  # fmt: skip
    context = torch.tensor([[-0.1, -0.1, 0.0, 0.0, 0.0],
                            [-0.1, -0.1, -1.0, -1.0, -9.0],
                            [-0.1, -0.1, 0.0, 0.0, 0.0]])  # fmt: skip
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    distilled = torch.tensor([True, True, False])
    keep = opening_gate(old, context, mask, distilled, opening_tokens=2, gate=0.5)
    assert keep.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert opening_open_rows(keep, distilled, 2) == 1  # row 1 only (row 2 is not distilled)
    # a prompt whose plain rollouts all failed has nothing to lose: row 0 opens too
    lose = opening_gate(old, context, mask, distilled, 2, 0.5, nothing_to_lose=torch.tensor([True, False, False]))
    assert lose.eq(1).all()
    # a row with nothing after its opening (EOS within it) is carried: open
    short = opening_gate(old, context, torch.tensor([[1, 1, 0, 0, 0]] * 3), distilled, opening_tokens=2, gate=0.5)
    assert short.eq(1).all()


def test_opening_gate_in_the_step(tiny_world, tmp_path):
    # a gate every row passes (γ tiny) is no gate: the same weights as without it; a gate no row passes (γ = 1
    # where the plain prompt trails its templates) cuts the distilled openings' policy gradient: other weights.
    # Every row templated: no group has plain rollouts, so none opens for having nothing to lose
    t = ("Add.", "Carry.", "Add.", "Carry.")
    base, seen0 = one_step(tiny_world, tmp_path / "none", fuse=True, templates=t)
    wide, seen1 = one_step(tiny_world, tmp_path / "wide", True, templates=t, opening_tokens=3, opening_gate=1e-30)
    closed, seen2 = one_step(tiny_world, tmp_path / "closed", True, templates=t, opening_tokens=3, opening_gate=1.0)
    assert seen0["train/reward"] == seen1["train/reward"] == seen2["train/reward"]  # the same rollouts
    for p, q in zip(base.policy.parameters(), wide.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert seen1["train/opening_open_rows"] > seen2["train/opening_open_rows"]
    assert any(not torch.allclose(p, q) for p, q in zip(base.policy.parameters(), closed.policy.parameters()))
    with pytest.raises(ValueError, match="opening_gate"):
        small_module(tiny_world, opening_tokens=2, opening_gate=0.0)


def test_kl_on_plain_rows_leaves_distilled_rows_alone(tiny_world, tmp_path):
    # every row distilled (no "" template): kl_rows="plain" leaves no KL term at all, so the step equals kl_coef=0;
    # kl_rows="all" holds the distilled rows to the reference, a different step. The policy is moved off the
    # reference (its initial weights) before the step, else every KL gradient is 0 at the first step.
    class Nudge(L.Callback):
        def on_train_start(self, trainer, module):
            with torch.no_grad():
                for i, p in enumerate(module.policy.parameters()):
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))

    templates, nudge = ("Add.", "Carry.", "Add.", "Carry."), [Nudge()]
    none, _ = one_step(tiny_world, tmp_path / "none", True, templates=templates, callbacks=nudge)
    plain, seen = one_step(
        tiny_world, tmp_path / "plain", True, templates=templates, callbacks=nudge, kl_coef=0.5, kl_rows="plain"
    )
    every, seen_all = one_step(
        tiny_world, tmp_path / "all", True, templates=templates, callbacks=nudge, kl_coef=0.5, kl_rows="all"
    )
    assert seen_all["train/kl"] > 0.0
    # every group templated: "untemplated" leaves every row alone too
    untemplated, _ = one_step(
        tiny_world, tmp_path / "untemplated", True, templates=templates, callbacks=nudge, kl_coef=0.5,
        kl_rows="untemplated",
    )  # fmt: skip
    for p, q in zip(none.policy.parameters(), untemplated.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    for p, q in zip(none.policy.parameters(), plain.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    assert seen["train/kl"] == 0.0
    assert any(not torch.allclose(p, q) for p, q in zip(none.policy.parameters(), every.policy.parameters()))
    with pytest.raises(ValueError, match="kl_rows='plain' needs kl_estimator k2 or k3"):
        small_module(tiny_world, kl_coef=0.1, kl_rows="plain", kl_estimator="k1")


def test_update_stats_reduce_as_declared():
    stats = UpdateStats()
    # update 1: two micro-batches holding 3/4 and 1/4 of the mini-batch's tokens
    stats.add_micro({"loss": 0.3, "kl": 0.2, "ratio_min": 0.9, "ratio_max": 1.1}, token_share=0.75)
    stats.add_micro({"loss": 0.1, "kl": 0.6, "ratio_min": 0.8, "ratio_max": 1.3}, token_share=0.25)
    stats.end_update(grad_norm=2.0, skipped_steps=0.0)
    # update 2: one micro-batch
    stats.add_micro({"loss": 0.2, "kl": 0.1, "ratio_min": 0.95, "ratio_max": 1.05}, token_share=1.0)
    stats.end_update(grad_norm=0.0, skipped_steps=1.0)
    out = stats.result()
    assert out["loss"] == pytest.approx(((0.3 + 0.1) + 0.2) / 2)  # sum over micro-batches, mean over updates
    assert out["kl"] == pytest.approx(((0.75 * 0.2 + 0.25 * 0.6) + 0.1) / 2)  # token-weighted, then mean: 0.2
    assert (out["ratio_min"], out["ratio_max"]) == (0.8, 1.3)  # extremes of all
    assert out["grad_norm"] == pytest.approx(1.0) and out["skipped_steps"] == 1.0  # mean; a count adds up
    assert [rank_reduction(k) for k in ("train/loss", "train/ratio_min", "p2o/rescued_groups")] == [
        "mean",
        "min",
        "sum",
    ]
    with pytest.raises(KeyError, match="statistic 'train/novel' declares no reduction"):
        reduction("train/novel")


class _FakeFSDP1Root(FullyShardedDataParallel):
    """Stands in for the root Lightning's FSDPStrategy wraps (FSDP1 needs an accelerator in torch 2.13): its
    ``clip_grad_norm_`` is the one that all-reduces the shards' norms; here it returns a known global norm."""

    def __init__(self, global_norm):
        self.calls, self.global_norm = [], global_norm  # FSDP1's own __init__ is not run: no process group

    def clip_grad_norm_(self, max_norm):
        self.calls.append(max_norm)
        return torch.tensor(self.global_norm)


def test_optimizer_step_clips_with_the_fsdp1_roots_norm(monkeypatch):
    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.full((3,), 2.0)  # this rank's shard: norm √12 ≈ 3.46
    root = object.__new__(_FakeFSDP1Root)
    _FakeFSDP1Root.__init__(root, global_norm=5.0)
    policy = torch.nn.Module()
    policy.p = params[0]
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=root), precision_plugin=SimpleNamespace())
    step = OptimizerStep(max_grad_norm=1.0)
    step.clip(policy.parameters(), trainer, "at global step 0")
    assert root.calls == [1.0] and step.grad_norm == 5.0  # the root clipped, by the global norm
    torch.testing.assert_close(params[0].grad, torch.full((3,), 2.0))  # torch.nn.utils did not clip the shard
    # without FSDP1 the plain clip runs: norm √12, clipped to 1
    trainer.strategy.model = policy
    step.clip(policy.parameters(), trainer, "at global step 0")
    assert step.grad_norm == pytest.approx(12**0.5)
    torch.testing.assert_close(params[0].grad.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-6)
    # a non-finite norm stops training (no GradScaler), naming the step
    params[0].grad = torch.tensor([float("inf"), 0.0, 0.0])
    with pytest.raises(FloatingPointError, match="non-finite gradient norm .* at global step 0"):
        step.clip(policy.parameters(), trainer, "at global step 0")


def test_fp16_overflow_skips_the_step_and_logs_it(tiny_world, tmp_path):
    """16-mixed: clipping sees unscaled gradients; an overflowing step is skipped by the GradScaler and logged."""
    from lightning.pytorch.plugins import MixedPrecision

    L.seed_everything(0)
    module = ParityReward(
        model=str(tiny_world), rollout={"num_rollouts": 4, "max_new_tokens": 12},
        update={"micro_batch_size": 8, "max_grad_norm": 1.0}, optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # so large that the first backward overflows fp16
    skipped = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            skipped.append(float(trainer.callback_metrics["train/skipped_steps"]))

    t = trainer(
        tmp_path, max_steps=2, callbacks=[Record()], limit_val_batches=0,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
    )  # fmt: skip
    t.fit(module, datamodule=small_data())
    assert skipped[0] == 1.0  # logged, not a FloatingPointError
    assert scaler.get_scale() < 2.0**40  # the scaler saw the overflow and backed off
    assert t.global_step == 2
