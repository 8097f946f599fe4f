"""Trimmed micro-batches (``LogProbSettings.trim``), micro-batches by a token budget (``micro_batch_tokens``) and packed
forwards (``pack``, :mod:`p2o_lightning.packing`): each forward on its rows' own widths, its sequences packed end to
end, gives the padded forward's log-probs, entropies, context log-probs, losses and gradients, on random-length
rollouts (GRPO and P²O rows, the fused head's update too)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import small_module

from p2o_lightning.backend import get_ops
from p2o_lightning.loss import LossSettings
from p2o_lightning.settings import UpdateSettings
from p2o_lightning.step.batch import RolloutBatch
from p2o_lightning.step.logprobs import LogProbSettings, micro_batches, rollout_logprobs, trimmed_widths
from p2o_lightning.step.plan import RolloutPlan
from p2o_lightning.step.update import PPOSettings, PPOUpdate

G, K, P, PG, R = 3, 4, 9, 13, 10  # groups, rollouts, trained / sampled prompt widths, response width


def test_trimmed_widths_by_hand():
    response = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    prompt = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]])
    other = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]])
    assert trimmed_widths(response, prompt, other) == (2, [1, 3])
    assert trimmed_widths(response) == (2, [])
    # no response token at all: one column still; an empty prompt keeps its last column (it predicts y_1)
    assert trimmed_widths(torch.zeros(2, 5), torch.zeros(2, 4)) == (1, [3])
    assert trimmed_widths(torch.ones(2, 5), torch.ones(2, 4)) == (5, [0])  # nothing to drop


def test_micro_batches_by_rows_and_by_tokens():
    prompt_len, response_len = torch.tensor([2, 5, 3, 5, 1, 4]), torch.tensor([6, 0, 1, 5, 2, 3])
    batch = SimpleNamespace(
        prompt_mask=(torch.arange(6) >= 6 - prompt_len[:, None]).long(),
        response_mask=(torch.arange(8) < response_len[:, None]).long(),
    )
    rows = torch.arange(6)
    by_rows = micro_batches(batch, rows, LogProbSettings(1.0, 8, micro_batch_size=4))
    assert [m.tolist() for m in by_rows] == [[0, 1, 2, 3], [4, 5]]

    # lengths 8 5 4 10 3 7, longest first: rows 3 (5+5), 0 (2+6), 5 (4+3), 1 (5+0), 2 (3+1), 4 (1+2)
    def by_tokens(budget, cap=4):
        settings = LogProbSettings(1.0, 8, micro_batch_size=cap, micro_batch_tokens=budget)
        return [m.tolist() for m in micro_batches(batch, rows, settings)]

    assert by_tokens(24) == [[3, 0], [5, 1, 2], [4]]  # 2 x (5 + 6), 3 x (5 + 3); a 4th row: 4 x 8 > 24
    assert by_tokens(100) == [[3, 0, 5, 1], [2, 4]]  # at most micro_batch_size rows
    assert by_tokens(9) == [[3], [0], [5], [1], [2], [4]]  # no two rows fit; row 3 (10 tokens) runs alone
    with pytest.raises(ValueError, match="micro_batch_tokens"):  # checked by the module's update settings
        UpdateSettings(micro_batch_tokens=0)


def test_micro_batches_by_tokens_are_as_many_on_every_rank(monkeypatch):
    # another rank cut its rows into 5 micro-batches: this one (3 by its budget) halves its largest ones to match
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op: t.fill_(max(int(t), 5)))
    batch = SimpleNamespace(prompt_mask=torch.ones(6, 2), response_mask=torch.ones(6, 3))  # every row 5 tokens
    settings = LogProbSettings(1.0, 8, micro_batch_size=8, micro_batch_tokens=10)
    assert [m.tolist() for m in micro_batches(batch, torch.arange(6), settings)] == [[0], [1], [2], [3], [4, 5]]
    settings = LogProbSettings(1.0, 8, micro_batch_size=8, micro_batch_tokens=5)  # 6 here: already the most
    assert len(micro_batches(batch, torch.arange(6), settings)) == 6


def _left_padded(gen: torch.Generator, lengths: torch.Tensor, width: int, vocab: int, pad: int):
    ids = torch.randint(3, vocab, (len(lengths), width), generator=gen)
    mask = (torch.arange(width) >= width - lengths[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


def _random_batch(vocab: int, pad: int, templated: bool, seed: int = 0) -> RolloutBatch:
    """G·K rows of random tokens: prompts of 2 … P − 2 tokens, left-padded (the templated rows' sampled prompts of
    3 … Pg − 3), responses of 0 … R − 3 tokens, right-padded, two of them empty; one row out of the loss.
    """
    gen = torch.Generator().manual_seed(seed)
    m = G * K
    prompt_ids, prompt_mask = _left_padded(gen, torch.randint(2, P - 1, (m,), generator=gen), P, vocab, pad)
    lengths = torch.randint(0, R - 2, (m,), generator=gen)
    lengths[[1, 6]] = 0
    response_mask = (torch.arange(R) < lengths[:, None]).long()  # [M, R]
    response_ids = torch.randint(3, vocab, (m, R), generator=gen).masked_fill(response_mask == 0, pad)
    distilled = [templated and i % K != K - 1 for i in range(m)]  # the last rollout of each group: plain
    sampled_ids, sampled_mask = _left_padded(gen, torch.randint(3, PG - 2, (m,), generator=gen), PG, vocab, pad)
    plain = torch.tensor([not d for d in distilled])
    sampled_ids[plain], sampled_mask[plain] = torch.nn.functional.pad(prompt_ids[plain], (PG - P, 0), value=pad), 0
    sampled_mask[plain, PG - P :] = prompt_mask[plain]
    prompts = [f"x{i // K}" for i in range(m)]
    templates = ["t" if d else "" for d in distilled]
    plan = RolloutPlan(
        prompts=prompts,
        templates=templates,
        sampled_prompts=[f"{t} {x}".strip() for t, x in zip(templates, prompts)],
        trained_prompts=prompts,
        templated_groups=[templated] * G,
    )
    in_loss = torch.ones(m)
    in_loss[4] = 0
    return RolloutBatch(
        plan=plan,
        answers=[""] * m,
        sampled_prompt_ids=sampled_ids,
        sampled_prompt_mask=sampled_mask,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        texts=[""] * m,
        rewards=torch.zeros(G, K),
        advantages=torch.randn(m, generator=gen),
        loss_mask=response_mask.float() * in_loss[:, None],
    )


def _update(
    policy0, batch: RolloutBatch, trim: bool, ppo: PPOSettings, loss: LossSettings, tokens: int | None, fused=False
):
    """One PPO update stage from ``policy0`` (a copy, SGD lr 0.1) with micro-batches of 5 rows, or of ``tokens``;
    packed where trimmed, padded otherwise: (stats, batch out, gradients of every optimizer step, the input widths of
    every forward)."""
    policy = copy.deepcopy(policy0)
    widths = []
    hook = lambda m, args, kw: widths.append((args[0].shape[1], kw.get("context_ids")))  # noqa: E731
    policy.register_forward_pre_hook(hook, with_kwargs=True)
    ops = get_ops("torch", "cpu")
    settings = LogProbSettings(
        1.0, 7, micro_batch_size=5, trim=trim, micro_batch_tokens=tokens, pack=trim, fused_head=fused
    )
    update = PPOUpdate(ppo, loss, settings)
    passes = update.passes(batch, None)  # the step's passes, as the module decides them
    if loss.kl_coef > 0:  # the policy itself stands in for the reference: the no-grad pass, trimmed or not
        batch = rollout_logprobs(policy, copy.deepcopy(policy0), batch, ops, settings, need_old=False)
    if passes.old_pass:
        batch = rollout_logprobs(policy, None, batch, ops, settings, need_old=True, with_context=passes.context)
    params = list(policy.parameters())
    grads = []

    def step():
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 0.1 * p.grad
        return 0.0, False

    def zero_grad():
        for p in params:
            p.grad = None

    torch.manual_seed(0)  # the same group shuffle
    stats, out = update(
        batch, passes, policy, ops, lambda loss: loss.backward(), zero_grad, step, lambda: "in the test"
    )
    assert all(p.grad is None for p in params)  # spent gradients are freed, not held through the next rollout
    widths = [(w, None if c is None else c.shape[1]) for w, c in widths]
    return stats, out, grads, widths


CASES = {  # rows templated, PPO settings, loss settings, micro_batch_tokens of the trimmed run
    "grpo-kl": (False, PPOSettings(1, None), LossSettings(kl_coef=0.05), None),
    "grpo-kl-seq-mean-by-tokens": (
        False,
        PPOSettings(1, None),
        LossSettings(kl_coef=0.05, loss_agg="seq-mean-token-mean"),
        40,
    ),
    "p2o-anchor": (True, PPOSettings(1, None), LossSettings(anchor_weight=0.5), None),
    "p2o-anchor-by-tokens": (True, PPOSettings(1, None), LossSettings(anchor_weight=0.5), 40),
    "p2o-two-epochs-tokens-scope": (True, PPOSettings(2, 2), LossSettings(context_mask_scope="tokens"), None),
    "p2o-two-epochs-by-tokens": (True, PPOSettings(2, 2), LossSettings(context_mask_scope="tokens"), 40),
    "grpo-fused-head-by-tokens": (False, PPOSettings(1, None), LossSettings(kl_coef=0.05), 40),
    "p2o-fused-head": (True, PPOSettings(1, None), LossSettings(), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trimmed_update_equals_the_padded_one(tiny_world, case):
    templated, ppo, loss, tokens = CASES[case]
    fused = "fused-head" in case  # the loss's LM-head gradients in the forward, on both sides
    module = small_module(tiny_world)
    module.configure_model()
    batch = _random_batch(module.policy.lm.config.vocab_size, module.tokenizer.pad_token_id, templated)
    assert batch.reprompted == templated
    padded = _update(module.policy, batch, False, ppo, loss, None, fused)
    trimmed = _update(module.policy, batch, True, ppo, loss, tokens, fused)

    # the trimmed forwards are narrower (the test is not vacuous); the padded ones are all P + R (Pg + R) wide
    assert {w for w, _ in padded[3]} == {P + R}
    assert max(w for w, _ in trimmed[3]) < P + R
    if templated:  # the sampled prompts' context, in the forwards that score it
        assert {c for _, c in padded[3] if c} == {PG + R} and max(c for _, c in trimmed[3] if c) < PG + R
    # the packed forwards ran on their tokens: the padded ones are mostly padding (the rows are 2 to 15 tokens)
    assert padded[0].pop("padding_share") > 0.5 and trimmed[0].pop("padding_share") < 0.25
    assert padded[0].keys() == trimmed[0].keys()
    for key, value in padded[0].items():
        assert trimmed[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert padded[0]["loss"] != 0.0
    for name in ("old_logp", "entropy", "context_logp", "ref_logp"):
        a, b = getattr(padded[1], name), getattr(trimmed[1], name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
            assert not b[batch.response_mask == 0].any(), name  # zeros beyond each response, as padded
    assert len(padded[2]) == len(trimmed[2]) == ppo.ppo_epochs * (1 if ppo.mini_batch_groups is None else 2)
    for step_a, step_b in zip(padded[2], trimmed[2]):
        assert any(g.abs().max() > 0 for g in step_a)
        for g_a, g_b in zip(step_a, step_b):
            torch.testing.assert_close(g_b, g_a, rtol=1e-5, atol=1e-7)
