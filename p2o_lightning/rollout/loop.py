"""Our own decode loop on the policy's HF model: one prefill per prompt, a preallocated KV cache, finished rows dropped.

HF ``generate`` spends a GRPO step's rollouts three ways that RL does not need (issue 18): each prompt is prefilled K
times (``num_return_sequences`` expands the input before the prefill), every decode step pays ``generate``'s Python
machinery (logits processors, stopping criteria, cache bookkeeping), and rows that hit EOS stay in the batch until the
longest row ends — on the embedded world responses average ~5 tokens against a batch maximum of ~26, so most
row-steps decode padding. This loop:

1. prefills the B distinct prompts once (logits of the last position only) and repeats their KV K times, so the
   K rollouts of a prompt share its prefill;
2. keeps K/V in a :class:`PreallocatedLayer` per layer: one [M, H, P + R, D] buffer written in place (no
   ``torch.cat`` per step, as ``DynamicCache`` does), attended over its filled length only (not the full
   ``max_cache_len`` ``StaticCache`` attends over);
3. drops finished rows: when rows emit an EOS the batch, its cache, mask and positions are compacted to the live
   rows, so every decode step computes only rows still generating;
4. samples from the processed distribution (temperature, top-p as HF's ``TopPLogitsWarper``) by inverse transform
   sampling, one uniform per row (:func:`sample_tokens`): a max, e^(s − max) in place and block sums over the
   [n, V] logits, no copy of them and no random draw per vocabulary entry (``torch.multinomial`` draws V
   exponentials a row); the sampled token's log-prob comes from the same sums: ``sampling_logp`` needs no
   [R, M, V] scores. The one host sync a step asks whether a row ended (it decides the next step's batch).

It runs on the policy's own parameters (no weight sync, like :class:`~p2o_lightning.rollout.hf.HFRolloutEngine`) and
returns exactly what that engine returns: same left-padded prompts (``PromptEncoder``), responses cut at the first
EOS, ``temperature == 0`` = greedy; greedy ids equal ``generate``'s.

The cache layer subclasses transformers' ``DynamicLayer``, whose contract with the model (what it calls on a layer,
and how the forward takes the cache: 5.24 renamed ``past_key_values`` to ``cache``) changes between releases without
notice; such a change can make the loop decode wrong tokens without an error. So the engine checks itself on its
first batch (:func:`check_against_uncached`): a few greedy steps of the loop against the argmax of the model's own
forward over prompt + prefix without a cache; where they differ it stops with an error naming the installed
transformers.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from torch import Tensor, nn
from transformers import Cache, DynamicLayer

from p2o_lightning.rollout.base import PolicyEngine, Rollouts, SamplingParams


class PreallocatedLayer(DynamicLayer):
    """One layer's K/V in a buffer of ``max_len`` positions allocated at the first write, filled in place.

    ``keys`` / ``values`` are views of the filled part, [n, H, length, D], so attention and the mask span the
    tokens written so far, as with ``DynamicLayer``; rows are repeated (after the prefill) and compacted (when rows
    finish) in the batch dimension by :meth:`batch_repeat_interleave` / :meth:`batch_select_indices`.
    """

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        b, h, _, dk = key_states.shape
        self._keys = key_states.new_empty(b, h, self.max_len, dk)  # [n, H, P + R, D]
        self._values = value_states.new_empty(b, h, self.max_len, value_states.shape[-1])
        self.length = 0
        self.is_initialized = True

    def _view(self) -> tuple[Tensor, Tensor]:
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        return self.keys, self.values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        return self._view()

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times in a new buffer (the prefill's B rows → the B·K rollout rows)."""
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._view()

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep rows ``indices`` (ascending), moved to the front of the same buffer: no new allocation."""
        if self.is_initialized:
            n, filled = len(indices), slice(0, self.length)
            self._keys[:n, :, filled] = self._keys[indices, :, filled]  # the right side is a copy: no aliasing
            self._values[:n, :, filled] = self._values[indices, :, filled]
            self._keys, self._values = self._keys[:n], self._values[:n]
            self._view()


def preallocated_cache(num_layers: int, max_len: int):
    """A transformers ``Cache`` of :class:`PreallocatedLayer` s, one per decoder layer."""
    return Cache(layers=[PreallocatedLayer(max_len) for _ in range(num_layers)])


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` (transformers ≥ 5.24) or the older
    ``past_key_values``. Under the wrong name the model would swallow it in ``**kwargs`` and run without it.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


BLOCK = 1024  # vocabulary columns per block of the two-level inverse-CDF search


def inverse_cdf(probs: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
    """``(token, total)``: for each row of ``probs`` [n, V] (non-negative, unnormalised) the first token whose
    cumulative mass exceeds ``uniform`` [n] (in [0, 1)) times the row's total, and that total [n] (float64).

    Two levels, one pass over the vocabulary: the sums of its blocks of :data:`BLOCK` tokens (accumulated in float64),
    the block where the cumulative sum passes u·total, then the cumulative sum inside that block alone. The target
    is kept below each level's own total, so rounding between the two sums can never pick a token of mass 0.
    """
    n, vocab = probs.shape
    full, rest = divmod(vocab, BLOCK)
    blocks = probs.new_zeros(n, full + (rest > 0), dtype=torch.float64)  # [n, nb]
    if full:
        blocks[:, :full] = probs[:, : full * BLOCK].view(n, full, BLOCK).sum(-1, dtype=torch.float64)
    if rest:
        blocks[:, full] = probs[:, full * BLOCK :].sum(-1, dtype=torch.float64)
    cdf = blocks.cumsum(-1)  # [n, nb]
    total = cdf[:, -1]
    zero = torch.zeros_like(total)
    target = torch.minimum(uniform.double() * total, torch.nextafter(total, zero))  # [n] in [0, total)
    block = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)  # [n]
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)[:, None]).squeeze(1), zero)
    cols = block[:, None] * BLOCK + torch.arange(BLOCK, device=probs.device)  # [n, BLOCK]
    inside = probs.gather(1, cols.clamp(max=vocab - 1)).double() * (cols < vocab)  # [n, BLOCK]
    cum = inside.cumsum(-1)
    within = torch.minimum(target - before, torch.nextafter(cum[:, -1], zero))
    pos = torch.searchsorted(cum, within[:, None], right=True).squeeze(1).clamp(max=BLOCK - 1)
    return (block * BLOCK + pos).clamp(max=vocab - 1), total


def sample_tokens(
    logits: Tensor, temperature: float, top_p: float, uniform: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Next tokens [n] and their log-probs [n] (float32) under the processed distribution of ``logits`` [n, V]; the
    loop owns its logits, so their memory is reused (overwritten).

    Greedy (``temperature <= 0``): the argmax and its log-softmax, as the HF engine records it. Otherwise the logits
    are divided by T, cut to the top-p nucleus (HF's ``TopPLogitsWarper``: the smallest set of tokens whose mass
    reaches ``top_p``), and a token is drawn from their softmax by inverse transform sampling with one uniform per
    row (``uniform`` [n], else drawn from the global torch RNG; :func:`inverse_cdf`). All in the scores' memory:
    one pass for the max, e^(s − max) in place, one pass for the block sums; the sampled token's log-prob is
    log e^(s_t − max) − log Σ e^(s − max). No full-vocabulary copy (beyond a 16-bit model's fp32 logits) and no
    random draw per vocabulary entry.
    """
    if temperature <= 0:
        token = logits.argmax(dim=-1)
        logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
        return token, logp.gather(1, token[:, None]).squeeze(1)
    scores = logits.float()  # fp32 logits themselves; the one fp32 copy of 16-bit ones
    if temperature != 1.0:
        scores = scores.div_(temperature)
    if top_p < 1.0:
        from transformers import TopPLogitsWarper

        scores = TopPLogitsWarper(top_p)(None, scores)
    if uniform is None:
        uniform = torch.rand(scores.shape[0], dtype=torch.float64, device=scores.device)
    probs = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()  # [n, V] e^(s - max) in place, unnormalised
    token, total = inverse_cdf(probs, uniform)
    logp = probs.gather(1, token[:, None]).squeeze(1).double().log() - total.log()
    return token, logp.float()


class LoopRolloutEngine(PolicyEngine):
    """Samples with our own decode loop over the policy's HF model (see the module docstring); eval mode while
    sampling. The first :meth:`generate` checks the loop against the model's uncached forward
    (:func:`check_against_uncached`) before it samples; ``checked`` is then True.
    """

    def __init__(self, model: nn.Module, tokenizer, chat_template: bool | None = None) -> None:
        super().__init__(model, tokenizer, chat_template)
        self.cache_argument = cache_argument(model)
        self.checked = False

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingParams) -> Rollouts:
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = self.encode_prompts(prompts, device)  # [B, P]
        with self.eval_mode():
            if not self.checked:
                check_against_uncached(self, prompt_ids, prompt_mask)
                self.checked = True
            response_ids, sampling_logp = self._decode(prompt_ids, prompt_mask, sampling)
        return self.rollouts(prompt_ids, prompt_mask, response_ids, sampling_logp, sampling.n)

    def _decode(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams) -> tuple[Tensor, Tensor]:
        """Raw responses [M, steps] (pad after a row's EOS) and their sampling log-probs [M, steps]."""
        k, r = sampling.n, sampling.max_new_tokens
        p, m = prompt_ids.shape[1], prompt_ids.shape[0] * sampling.n
        pad = self.tokenizer.pad_token_id
        responses = prompt_ids.new_full((m, r), pad)  # [M, R]
        logps = torch.zeros(m, r, dtype=torch.float32, device=prompt_ids.device)  # [M, R]
        if r == 0 or m == 0:
            return responses[:, :0], logps[:, :0]
        eos = torch.tensor(self.eos_token_ids, device=prompt_ids.device)
        cache = preallocated_cache(self.model.config.get_text_config().num_hidden_layers, p + r)
        position_ids = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)  # as generate() sets them
        out = self.model(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids, use_cache=True,
            logits_to_keep=1, **{self.cache_argument: cache},
        )  # fmt: skip
        if cache.get_seq_length() != p:  # the model ran on a cache of its own: every decode step would lose the prompt
            raise RuntimeError(
                f"rollout engine 'loop': the model did not fill the loop's KV cache under transformers "
                f"{transformers.__version__} (its forward takes the cache as {self.cache_argument!r}?); use "
                "`--model.rollout.engine hf` or the transformers version of constraints.txt"
            )
        cache.batch_repeat_interleave(k)  # the K rollouts of a prompt share its prefill
        logits = out.logits[:, -1].repeat_interleave(k, dim=0)  # [M, V]
        mask = torch.cat([prompt_mask.repeat_interleave(k, dim=0), prompt_mask.new_ones(m, r)], dim=1)  # [M, P + R]
        next_position = position_ids[:, -1:].repeat_interleave(k, dim=0) + 1  # [n, 1]
        rows = torch.arange(m, device=prompt_ids.device)  # live row -> its row in the output
        steps = 0
        for t in range(r):
            uniform = None  # greedy draws nothing; sampling draws one uniform per output row and step, so that a
            if sampling.temperature > 0:  # row's draw does not depend on which other rows are still live
                uniform = torch.rand(m, dtype=torch.float64, device=prompt_ids.device)[rows]  # [n]
            token, logp = sample_tokens(logits, sampling.temperature, sampling.top_p, uniform)  # [n], [n]
            responses[rows, t], logps[rows, t] = token, logp
            steps = t + 1
            live = ~torch.isin(token, eos)
            if t == r - 1:
                break
            if not bool(live.all()):
                keep = live.nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                rows, token, mask, next_position = rows[keep], token[keep], mask[keep], next_position[keep]
                cache.batch_select_indices(keep)
            out = self.model(
                input_ids=token[:, None], attention_mask=mask[:, : p + t + 1], position_ids=next_position,
                use_cache=True, **{self.cache_argument: cache},
            )  # fmt: skip
            logits = out.logits[:, -1]
            next_position = next_position + 1
        responses, logps = responses[:, :steps], logps[:, :steps]
        if not bool(torch.isfinite(logps).all()):  # a NaN / inf logit makes its row's log-probs NaN (one sync a batch)
            raise RuntimeError(
                "rollout engine 'loop': the model's logits hold NaN or inf (non-finite sampling log-probs in "
                f"{int((~torch.isfinite(logps)).any(1).sum())} of {m} rows): the policy's weights or its forward "
                "went non-finite"
            )
        return responses, logps


CHECK_PROMPTS, CHECK_ROLLOUTS, CHECK_STEPS = 8, 2, 4  # the first batch's first 8 prompts, K = 2, 4 greedy tokens


def logit_tolerance(dtype: torch.dtype) -> float:
    """How far (relative to max(1, |best logit|)) a chosen token's logit may fall below the best one: a near tie can
    fall either way between the cached and the uncached path, a broken cache falls much further.
    """
    return {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 5e-2)  # 16-bit: ~13 of bf16's relative 2^-8 steps


def check_against_uncached(engine: LoopRolloutEngine, prompt_ids: Tensor, prompt_mask: Tensor) -> None:
    """Raise if the loop's greedy tokens are not the model's own: its cached decode against one uncached forward.

    The loop decodes ``CHECK_STEPS`` greedy tokens for the first ``CHECK_PROMPTS`` prompts [B, P], each repeated
    ``CHECK_ROLLOUTS`` times (so the prefill's repeat, and the compaction when a row ends, are in the path); one
    forward without a cache over prompt + those tokens gives the logits each token was chosen from. A token whose
    logit there falls more than :func:`logit_tolerance` below its position's best is a disagreement; tokens after a
    row's first EOS are not counted. It costs one short greedy decode and one forward, on the first batch only.
    """
    prompt_ids, prompt_mask = prompt_ids[:CHECK_PROMPTS], prompt_mask[:CHECK_PROMPTS]
    k = CHECK_ROLLOUTS
    tokens, _ = engine._decode(prompt_ids, prompt_mask, SamplingParams(k, 0.0, 1.0, CHECK_STEPS))  # [M, s]
    s = tokens.shape[1]
    if s == 0:
        return
    ids = torch.cat([prompt_ids.repeat_interleave(k, dim=0), tokens], dim=1)  # [M, P + s]
    mask = torch.cat([prompt_mask.repeat_interleave(k, dim=0), torch.ones_like(tokens)], dim=1)  # [M, P + s]
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = engine.model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, logits_to_keep=s + 1
    )
    logits = out.logits[:, :-1].float()  # [M, s, V]: position P - 1 + t predicts response token t
    best, chosen = logits.max(dim=-1).values, logits.gather(2, tokens[..., None]).squeeze(2)  # [M, s]
    eos = torch.isin(tokens, torch.tensor(engine.eos_token_ids, device=tokens.device))  # [M, s]
    counted = (eos.long().cumsum(1) - eos.long()) == 0  # up to and including a row's first EOS
    device = tokens.device.type  # under autocast the model computes in its dtype, not the parameters'
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else engine.model.dtype
    tolerance = logit_tolerance(dtype) * best.abs().clamp(min=1.0)
    wrong = counted & (best - chosen > tolerance)  # [M, s]
    if not bool(wrong.any()):
        return
    row, t = (int(i) for i in wrong.nonzero()[0])
    ours, theirs = int(tokens[row, t]), int(logits[row, t].argmax())
    name = engine.tokenizer.convert_ids_to_tokens
    raise RuntimeError(
        f"rollout engine 'loop' decodes tokens the model does not choose, under transformers "
        f"{transformers.__version__}: {int(wrong.sum())} of {int(counted.sum())} greedy tokens of its first batch are "
        f"not the argmax of the model's forward without a cache (first: row {row}, token {t}: the loop chose {ours} "
        f"{name(ours)!r}, the forward {theirs} {name(theirs)!r}, {float(best[row, t] - chosen[row, t]):.3g} logits "
        "higher). The loop's KV cache subclasses transformers' DynamicLayer, whose contract this version may have "
        "changed: use `--model.rollout.engine hf` (transformers generate), or the transformers version of "
        "constraints.txt"
    )
