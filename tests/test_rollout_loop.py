"""Our own decode loop (``rollout_engine: loop``): greedy ids equal HF ``generate``'s, sampled tokens follow the
model's distribution, sampling log-probs are the policy's, and the preallocated cache keeps rows apart when it
repeats and compacts them."""

import re

import pytest
import torch
import transformers
from helpers import response_logprobs, small_data, small_module, trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from p2o_lightning.rollout import HFRolloutEngine, LoopRolloutEngine, SamplingParams
from p2o_lightning.rollout.loop import PreallocatedLayer, inverse_cdf, preallocated_cache, sample_tokens


def load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def greedy_pair(path, prompts, k, max_new_tokens):
    model, tok = load(path)
    ours = LoopRolloutEngine(model, tok).generate(prompts, SamplingParams(k, 0.0, 1.0, max_new_tokens))
    # generate() refuses greedy with num_return_sequences > 1: each prompt repeated K times, n = 1
    repeated = [p for p in prompts for _ in range(k)]
    hf = HFRolloutEngine(model, tok).generate(repeated, SamplingParams(1, 0.0, 1.0, max_new_tokens))
    return ours, hf


def assert_same_rollouts(ours, hf):
    assert torch.equal(ours.prompt_ids, hf.prompt_ids) and torch.equal(ours.prompt_mask, hf.prompt_mask)
    assert torch.equal(ours.response_ids, hf.response_ids) and torch.equal(ours.response_mask, hf.response_mask)
    assert ours.texts == hf.texts
    torch.testing.assert_close(ours.sampling_logp, hf.sampling_logp, atol=1e-5, rtol=0)


def test_greedy_ids_equal_generate_s_on_the_embedded_world(tiny_world):
    prompts = ["12+34=", "5+6=", "123+4567=", "9+0=", "77+7="]  # different lengths: left padding differs per row
    ours, hf = greedy_pair(tiny_world, prompts, k=3, max_new_tokens=20)
    assert_same_rollouts(ours, hf)


def test_greedy_ids_equal_generate_s_on_the_bpe_model(bpe_checkpoint, math_rows):
    prompts = [r["prompt"] for r in math_rows[:4]]  # chat template, BPE, repetition_penalty 1.3 in its defaults
    ours, hf = greedy_pair(bpe_checkpoint, prompts, k=2, max_new_tokens=16)
    assert ours.response_mask.sum(1).unique().numel() > 1 or ours.truncated.all()  # rows of several lengths
    assert_same_rollouts(ours, hf)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_are_the_policy_s(tiny_world, temperature):
    model, tok = load(tiny_world)
    torch.manual_seed(0)
    rollouts = LoopRolloutEngine(model, tok).generate(["12+34=", "5+6="], SamplingParams(4, temperature, 1.0, 10))
    assert rollouts.sampling_logp.shape == rollouts.response_ids.shape
    assert (rollouts.sampling_logp * (1 - rollouts.response_mask)).abs().max() == 0  # 0 on padding
    expected = response_logprobs(model, rollouts, temperature)  # full-logit forward, the oracle
    torch.testing.assert_close(rollouts.sampling_logp, expected, atol=1e-5, rtol=0)


def test_sampling_logprobs_under_top_p_are_renormalised(tiny_world):
    model, tok = load(tiny_world)
    torch.manual_seed(0)
    rollouts = LoopRolloutEngine(model, tok).generate(["12+34="] * 4, SamplingParams(4, 1.0, 0.5, 10))
    gap = (rollouts.sampling_logp - response_logprobs(model, rollouts)) * rollouts.response_mask  # -log(nucleus mass)
    assert gap.min() >= -1e-5 and gap.max() > 1e-3


def test_first_tokens_follow_the_model_s_distribution(tiny_world):
    """Chi-square of 4,000 first tokens against the softmax of the prompt's next-token logits (100-token vocab)."""
    model, tok = load(tiny_world)
    engine = LoopRolloutEngine(model, tok)
    prompt, n = "3+4=", 4000
    ids, mask = engine.encode_prompts([prompt], torch.device("cpu"))
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids, attention_mask=mask).logits[0, -1].double() / 1.5, -1)  # [V]
    torch.manual_seed(0)
    rollouts = engine.generate([prompt], SamplingParams(n, 1.5, 1.0, 1))
    counts = torch.bincount(rollouts.response_ids[:, 0], minlength=probs.numel()).double()
    expected = probs * n
    big = expected >= 5  # the chi-square approximation wants >= 5 expected per cell; the rest are pooled
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    observed, expected = observed[expected > 0], expected[expected > 0]  # no pooled cell when every cell is big
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    dof = observed.numel() - 1
    assert dof >= 3  # T = 1.5 spreads the mass over several tokens
    assert chi2 < dof + 4 * (2 * dof) ** 0.5  # ~ the 99.9th percentile; a wrong distribution lands far above
    torch.testing.assert_close(rollouts.sampling_logp[:, 0].double(), probs.log()[rollouts.response_ids[:, 0]])


def test_preallocated_cache_repeats_and_compacts_rows():
    cache = preallocated_cache(num_layers=1, max_len=5)
    k = torch.arange(2 * 3, dtype=torch.float32).view(2, 1, 3, 1)  # [B=2, H=1, 3, D=1]: row 0 = 0,1,2; row 1 = 3,4,5
    cache.update(k, -k, 0)
    cache.batch_repeat_interleave(2)  # rows: 0, 0, 1, 1
    keys, values = cache.update(torch.full((4, 1, 1, 1), 9.0), torch.zeros(4, 1, 1, 1), 0)
    assert keys.shape == (4, 1, 4, 1) and cache.get_seq_length() == 4
    cache.batch_select_indices(torch.tensor([1, 2]))  # keep a copy of row 0 and one of row 1
    keys, values = cache.update(torch.full((2, 1, 1, 1), 7.0), torch.ones(2, 1, 1, 1), 0)
    assert keys[:, 0, :, 0].tolist() == [[0, 1, 2, 9, 7], [3, 4, 5, 9, 7]]
    assert values[:, 0, :, 0].tolist() == [[0, -1, -2, 0, 1], [-3, -4, -5, 0, 1]]


def test_max_new_tokens_zero_and_eos_cut(tiny_world):
    model, tok = load(tiny_world)
    engine = LoopRolloutEngine(model, tok)
    empty = engine.generate(["1+1="], SamplingParams(2, 1.0, 1.0, 0))
    assert empty.response_ids.shape == (2, 1) and empty.texts == ["", ""]
    torch.manual_seed(0)
    rollouts = engine.generate(["12+34=", "5+6="], SamplingParams(4, 1.0, 1.0, 30))
    ends = rollouts.response_mask.sum(1) - 1
    last = rollouts.response_ids.gather(1, ends[:, None])[:, 0]
    finished = ~rollouts.truncated
    assert torch.isin(last[finished], torch.tensor(engine.eos_token_ids)).all()
    assert (rollouts.response_ids[rollouts.response_mask == 0] == tok.pad_token_id).all()


def test_trainer_runs_on_the_loop_engine(tiny_world, tmp_path):
    module = small_module(tiny_world, rollout_engine="loop", val_num_samples=2)
    trainer(tmp_path, max_steps=2).fit(module, datamodule=small_data())
    assert isinstance(module.engine, LoopRolloutEngine) and module.rollout_steps == 2


def test_first_batch_checks_the_loop_against_the_uncached_forward(default_world, bpe_checkpoint, math_rows):
    for path, prompts in [(default_world, ["12+34=", "5+6=", "123+4567="]), (bpe_checkpoint, [math_rows[0]["prompt"]])]:
        engine = LoopRolloutEngine(*load(path))
        assert not engine.checked
        engine.generate(prompts, SamplingParams(2, 1.0, 1.0, 6))
        assert engine.checked  # the check ran on the first batch and passed: no error


def test_a_cache_that_corrupts_decode_steps_is_caught_on_the_first_batch(default_world, monkeypatch):
    update = PreallocatedLayer.update

    def corrupted(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[-2] == 1:  # decode steps only: the prefill, hence the first token, stays right
            key_states = 2 * key_states  # the new token's keys written wrong: its attention weights shift
        return update(self, key_states, value_states, *args, **kwargs)

    monkeypatch.setattr(PreallocatedLayer, "update", corrupted)
    engine = LoopRolloutEngine(*load(default_world))  # trained: the tiny world answers "=" whatever it sees
    with pytest.raises(RuntimeError, match=rf"transformers {re.escape(transformers.__version__)}.*rollout\.engine hf"):
        engine.generate(["12+34=", "5+6=", "123+4567=", "9+0="], SamplingParams(2, 1.0, 1.0, 6))
    assert not engine.checked


def test_a_cache_the_model_does_not_take_is_caught(tiny_world, monkeypatch):
    """transformers 5.19's forward took ``past_key_values``, 5.25's ``cache``: under the wrong name the model swallowed
    the loop's cache in ``**kwargs`` and every decode step lost the prompt (every reward 0, no error)."""
    engine = LoopRolloutEngine(*load(tiny_world))
    assert engine.cache_argument in ("cache", "past_key_values")
    monkeypatch.setattr(engine, "cache_argument", "kv_cache_of_another_version")
    with pytest.raises(RuntimeError, match=r"did not fill the loop's KV cache under transformers"):
        engine.generate(["12+34="], SamplingParams(2, 1.0, 1.0, 6))


def test_inverse_cdf_picks_the_first_token_past_u_and_never_one_of_mass_zero():
    """The two-level search against a full float64 cumulative sum, on vocabularies of one block, several and
    Qwen's 151,936, with half the tokens masked (mass 0) and u at 0 and just below 1."""
    for seed, (n, vocab) in enumerate([(3, 7), (5, 1024), (4, 5000), (2, 151936)]):
        gen = torch.Generator().manual_seed(seed)
        scores = torch.randn(n, vocab, generator=gen) * 3
        scores[torch.rand(n, vocab, generator=gen) < 0.5] = float("-inf")  # what top-p leaves out
        scores[:, vocab // 2] = 0.0
        probs = (scores - scores.amax(-1, keepdim=True)).exp()
        for u in (torch.rand(n, dtype=torch.float64, generator=gen), torch.zeros(n), torch.full((n,), 1 - 1e-16)):
            token, total = inverse_cdf(probs.clone(), u)
            cum = probs.double().cumsum(-1)
            target = torch.minimum(u.double() * cum[:, -1], torch.nextafter(cum[:, -1], torch.zeros(n).double()))
            expected = torch.searchsorted(cum, target[:, None], right=True).squeeze(1)  # u -> 1: the last token of mass
            assert torch.equal(token, expected) and (probs.gather(1, token[:, None]) > 0).all()
            torch.testing.assert_close(total, cum[:, -1])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_log_probs_are_the_log_softmax_s(temperature):
    """The sampled token's log-prob from the sampler's own sums equals the float64 log-softmax at V = 151,936 (as
    close as a float32 log-softmax of the tempered logits is)."""
    logits = torch.randn(8, 151936, generator=torch.Generator().manual_seed(0)) * 4
    torch.manual_seed(0)
    token, logp = sample_tokens(logits.clone(), temperature, 1.0)
    expected = torch.log_softmax(logits.double() / temperature, -1).gather(1, token[:, None]).squeeze(1)
    torch.testing.assert_close(logp.double(), expected, atol=1e-5, rtol=0)


def test_non_finite_logits_stop_the_loop_with_an_error(tiny_world):
    model, tok = load(tiny_world)
    engine = LoopRolloutEngine(model, tok)
    engine.generate(["1+1="], SamplingParams(2, 1.0, 1.0, 4))  # the first-batch check passes on good weights
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf"):
        engine.generate(["12+34=", "5+6="], SamplingParams(2, 1.0, 1.0, 4))


def test_greedy_decoding_draws_no_random_numbers(tiny_world):
    """Greedy rollouts (validation, the first-batch check, the search's scoring) leave the RNG where it was: a run
    resumed from a checkpoint, whose new engine checks itself again, samples what the uninterrupted run sampled."""
    model, tok = load(tiny_world)
    state = torch.get_rng_state()
    LoopRolloutEngine(model, tok).generate(["12+34=", "5+6="], SamplingParams(2, 0.0, 1.0, 8))
    assert torch.equal(torch.get_rng_state(), state)
