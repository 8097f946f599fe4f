"""Log-prob stage: π_old (with entropy), π_ref and P²O's context log-probs of every rollout token, under no grad.

One pass over the rows in micro-batches. When some row is distilled (trained under x, sampled under template(x)),
each micro-batch runs the decoder on both prompts and scores both contexts with **one** ``linear_logprob_multi``
call, so the LM head weight is streamed once for log π(y|x) and log π(y|t(x)) (both backends; the Triton kernel
multiplies each weight tile with the two contexts' rows in one ``tl.dot``). The reference model (only when
``kl_coef > 0``) is a second pass. Which passes run is the step's :class:`~p2o_lightning.step.update.LogProbPasses`
(``PPOUpdate.passes``): when the PPO update is a single one, π_old is π_θ at that update, detached, the update's
forward gives it and the context, and this stage computes only the reference. The engine's sampling log-probs are
compared with π_old once it is known (:func:`rollout_mismatch`: before the update, where TIS weights the
advantages, :func:`apply_tis`; after it when the update gives π_old).

**Trimmed micro-batches.** Each forward (:func:`forward_rows`, this stage's and the update's) runs on its rows'
own widths, not the batch's: the prompt columns that are left padding in every row of the micro-batch and the
response columns past its longest response are dropped (:func:`trimmed_widths`), and the [m, R'] outputs are padded
back to [m, R] with zeros, which is what the padded forward gives there (masked targets score 0 log-prob and 0
entropy). Positions are numbered from the attention mask (``PolicyLogProb``: cumsum − 1), so dropping columns that
are padding everywhere changes no position and no attention; the results equal the padded forward's up to float
rounding (``LogProbSettings.trim=False`` runs it at full width). With ``micro_batch_tokens`` the rows are sorted by
length before they are cut into micro-batches (:func:`micro_batches`), so that each one's widths are close to its
rows' lengths; the loss is normalised by the whole mini-batch, so only the order of gradient accumulation changes.

**Packed forwards** (``LogProbSettings.pack``, on by default). Inside each forward the decoder runs on the rows'
real tokens packed end to end, position ids restarting with every sequence (:mod:`p2o_lightning.packing`), and its
hidden states go back to the trimmed layout before the LM head: the padding that trimming leaves (short rows beside
long ones) costs no decoder compute. Equal to the padded forward up to float rounding (``tests/test_trim.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from p2o_lightning.fused_head import HEAD_DTYPES, RatioOneLoss
from p2o_lightning.ops import tis_weights
from p2o_lightning.packing import PositionTally
from p2o_lightning.step.batch import RolloutBatch
from p2o_lightning.stopwatch import Stopwatch, measured


@dataclass(frozen=True)
class LogProbSettings:
    temperature: float  # the sampling temperature (1 for greedy): log-probs of the distribution sampled from
    chunk_size: int  # tokens per chunk of the log-prob op
    micro_batch_size: int  # rows per forward
    trim: bool = True  # each forward on its micro-batch's own widths (:func:`trimmed_widths`); False: the batch's
    micro_batch_tokens: int | None = None  # micro-batches by a token budget (:func:`micro_batches`); None: by rows
    pack: bool = True  # the decoder on each micro-batch's real tokens packed end to end (p2o_lightning.packing)
    # the update's loss and LM-head gradients in the log-prob pass when its passes say the ratio is 1
    # (:mod:`p2o_lightning.fused_head`, ``LogProbPasses.fused_head``); False: log-probs, then the loss through autograd;
    # None: the step's passes decide (on from FUSED_HEAD_MIN_VOCAB tokens of vocabulary, where it wins)
    fused_head: bool | None = None
    # the fused head's matmul operands: None (float32 on the torch backend, the weight's dtype on Triton) or
    # "bfloat16" (fp32 softmax and accumulation; for CPUs with AMX / AVX512-BF16 units and GPUs; not timed on one)
    head_dtype: str | None = None

    @property
    def head_torch_dtype(self):
        return None if self.head_dtype is None else HEAD_DTYPES[self.head_dtype]


def micro_batches(batch: RolloutBatch, rows: Tensor, settings: LogProbSettings) -> list[Tensor]:
    """``rows`` in micro-batches: ``micro_batch_size`` rows each, in order; with ``micro_batch_tokens``, the rows
    sorted by length (trained prompt + response tokens, longest first) and cut where a micro-batch's trimmed forward
    (its rows × (longest prompt + longest response)) would pass the budget, at most ``micro_batch_size`` rows each
    (a row over the budget alone). The sampled prompt's context forward, when there is one, is not counted.

    Under ``torch.distributed`` every rank must run as many forwards and backwards (DDP's gradient all-reduce and
    FSDP2's all-gathers are collectives): the ranks agree on the largest count (an all-reduce) and a rank with fewer
    micro-batches halves its largest ones until it has as many (each rank holds as many rows, so it can).
    """
    if settings.micro_batch_tokens is None:
        return list(rows.split(settings.micro_batch_size))
    prompt_len = batch.prompt_mask[rows].sum(1)
    response_len = batch.response_mask[rows].sum(1)
    lengths = torch.stack([prompt_len, response_len], 1).cpu()  # [n, 2]: one device-to-host copy
    order = torch.sort(lengths.sum(1), descending=True, stable=True).indices
    cuts, start, widest = [], 0, (0, 0)
    for i, row in enumerate(order.tolist()):
        p, r = lengths[row].tolist()
        widest_next = (max(widest[0], p), max(widest[1], r))
        count = i - start + 1
        if count > 1 and (count > settings.micro_batch_size or count * sum(widest_next) > settings.micro_batch_tokens):
            cuts.append(i - start)
            start, widest_next = i, (p, r)
        widest = widest_next
    cuts.append(len(order) - start)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        count = torch.tensor([len(cuts)], device=rows.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        while len(cuts) < int(count):
            i = max(range(len(cuts)), key=cuts.__getitem__)  # the largest micro-batch: ≥ 2 rows, as count ≤ rows
            cuts[i : i + 1] = [cuts[i] - cuts[i] // 2, cuts[i] // 2]
    return list(rows[order.to(rows.device)].split(cuts))


def trimmed_widths(response_mask: Tensor, *prompt_masks: Tensor) -> tuple[int, list[int]]:
    """A micro-batch's own widths, from its [m, R] response mask and its [m, P] left-padded prompt masks: the number
    of response columns up to the last one unmasked in some row (at least 1), and for each prompt mask its first
    column that is not padding in every row (at most P − 1, so that some position predicts the first response
    token). One device-to-host copy.
    """
    used = torch.cat([response_mask.any(0), *(m.any(0) for m in prompt_masks)]).cpu()  # [R + P + ...] bool
    response_cols = used[: response_mask.shape[1]].nonzero()  # [n, 1]
    width = int(response_cols[-1, 0]) + 1 if len(response_cols) else 1
    starts, offset = [], response_mask.shape[1]
    for mask in prompt_masks:
        cols = used[offset : offset + mask.shape[1]].nonzero()
        starts.append(min(int(cols[0, 0]), mask.shape[1] - 1) if len(cols) else mask.shape[1] - 1)
        offset += mask.shape[1]
    return width, starts


def forward_rows(
    model,
    batch: RolloutBatch,
    rows: Tensor,
    ops,
    settings: LogProbSettings,
    return_entropy: bool,
    with_context: bool,
    context_grad: bool = False,
    head_loss: RatioOneLoss | None = None,
    stopwatch: Stopwatch | None = None,
    tally: PositionTally | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One forward of ``model`` over ``rows``: ``(logp, entropy, context_logp, loss)``, the first three each
    [len(rows), R] or None (``context_logp`` with a gradient when ``context_grad``); ``loss`` is the fused head's
    (with ``head_loss``, its weights [len(rows), R]: log-probs and entropy then carry no gradient), else None.

    With ``settings.trim`` the forward runs on the rows' own widths (:func:`trimmed_widths`, for the sampled
    prompt's context too) and its outputs are padded back to R with zeros (what a masked target scores). The forward
    on the sampled prompt is measured as ``context_forward`` on ``stopwatch`` (:class:`~.policy.PolicyLogProb`).
    """
    response, response_mask = batch.response_ids[rows], batch.response_mask[rows]  # [m, R]
    prompt, prompt_mask = batch.prompt_ids[rows], batch.prompt_mask[rows]  # [m, P]
    sampled, sampled_mask = None, None  # [m, Pg] the prompt each row was sampled under, when scored
    if with_context:
        sampled, sampled_mask = batch.sampled_prompt_ids[rows], batch.sampled_prompt_mask[rows]
    full_width = response.shape[1]
    if settings.trim:
        width, starts = trimmed_widths(response_mask, prompt_mask, *([sampled_mask] if with_context else []))
        response, response_mask = response[:, :width], response_mask[:, :width]  # [m, R']
        prompt, prompt_mask = prompt[:, starts[0] :], prompt_mask[:, starts[0] :]  # [m, P']
        if with_context:
            sampled, sampled_mask = sampled[:, starts[1] :], sampled_mask[:, starts[1] :]  # [m, Pg']
    context = None, None
    if with_context:
        context = (torch.cat([sampled, response], 1), torch.cat([sampled_mask, response_mask], 1))
    outs = model(
        torch.cat([prompt, response], 1),  # [m, P' + R']
        torch.cat([prompt_mask, response_mask], 1),
        response.masked_fill(response_mask == 0, -100),  # [m, R'] targets
        ops,
        temperature=settings.temperature,
        return_entropy=return_entropy,
        chunk_size=settings.chunk_size,
        context_ids=context[0],  # [m, Pg' + R']
        context_mask=context[1],
        context_rows=batch.distilled[rows] if with_context else None,  # plain rows: their context is their prompt
        context_grad=context_grad,
        head_loss=None if head_loss is None else head_loss.narrow(response.shape[1]),
        head_dtype=settings.head_torch_dtype,
        stopwatch=stopwatch,
        pack=settings.pack,
        tally=tally,
    )
    pad = full_width - response.shape[1]
    if pad:  # zeros beyond the longest response: what the padded forward gives for masked targets
        outs = (*(None if x is None else F.pad(x, (0, pad)) for x in outs[:3]), *outs[3:])
    return (*outs, None) if len(outs) == 3 else outs  # [m, R] or None each, and the loss


def token_logprobs(
    model,
    batch: RolloutBatch,
    ops,
    settings: LogProbSettings,
    return_entropy: bool = False,
    with_context: bool = False,
    stopwatch: Stopwatch | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(logp, entropy, context_logp)`` [M, R] of every row, in micro-batches; with grad iff grad is enabled.

    ``with_context``: also log π(y | sampled prompt), in the same ``linear_logprob_multi`` call as log π(y | trained
    prompt), its forward measured on ``stopwatch`` as ``context_forward``.
    """
    rows = torch.arange(batch.response_ids.shape[0], device=batch.response_ids.device)
    micros = micro_batches(batch, rows, settings)
    outs = [
        forward_rows(model, batch, micro, ops, settings, return_entropy, with_context, stopwatch=stopwatch)
        for micro in micros
    ]
    order = torch.cat(micros).argsort()  # back to the batch's row order (micro-batches by tokens are sorted)
    return tuple(torch.cat([o[i] for o in outs])[order] if outs[0][i] is not None else None for i in range(3))  # type: ignore[return-value]


@torch.no_grad()
def rollout_logprobs(
    policy,
    reference,
    batch: RolloutBatch,
    ops,
    settings: LogProbSettings,
    need_old: bool = True,
    with_context: bool = False,
    stopwatch: Stopwatch | None = None,
) -> RolloutBatch:
    """The batch with ``old_logp`` and ``entropy`` (when ``need_old``), ``context_logp`` (when ``need_old`` and
    ``with_context``) and ``ref_logp`` (when ``reference`` is given). Without ``need_old`` the update's own forward
    gives π_old and the context (:mod:`p2o_lightning.step.update`). The context's forward is measured on
    ``stopwatch`` as ``context_forward``.
    """
    changes: dict[str, Tensor | None] = {}
    if need_old:
        old, entropy, context = token_logprobs(
            policy, batch, ops, settings, return_entropy=True, with_context=with_context, stopwatch=stopwatch
        )
        changes.update(old_logp=old, entropy=entropy, context_logp=context)
    if reference is not None:  # the KL term's reference, measured as ``reference_forward``
        with measured(stopwatch, "reference_forward"):
            changes["ref_logp"] = token_logprobs(reference, batch, ops, settings)[0]
    return batch.with_(**changes)


def rollout_mismatch(batch: RolloutBatch, tis_cap: float | None) -> tuple[dict[str, float], Tensor | None]:
    """On-policy hygiene: π_old against π_rollout over the response tokens, and TIS weights [M, R] with ``tis_cap``.

    π_old of a token is the trainer's under the prompt the row was *sampled* under: ``old_logp`` for a row trained
    where it was sampled, ``context_logp`` (log π(y|t(x))) for a distilled row. Returns ``rollout_logprob_diff``
    (mean |Δ|), and with ``tis_cap`` the weights min(π_old / π_rollout, cap) with their mean and capped share.
    """
    if batch.sampling_logp is None:
        if tis_cap is not None:
            raise ValueError("tis_cap is set but the rollout engine returned no sampling log-probs")
        return {}, None
    behaviour = batch.old_logp  # [M, R]
    if batch.reprompted:
        behaviour = torch.where(batch.distilled[:, None], batch.context_logp, behaviour)  # [M, R]
    mask = batch.response_mask.float()
    n = mask.sum().clamp(min=1)
    stats = {"rollout_logprob_diff": float(((behaviour - batch.sampling_logp).abs() * mask).sum() / n)}
    if tis_cap is None:
        return stats, None
    tis = tis_weights(behaviour, batch.sampling_logp, tis_cap)  # [M, R]
    stats["tis_weight_mean"] = float((tis * mask).sum() / n)
    stats["tis_capped_frac"] = float(((behaviour - batch.sampling_logp > math.log(tis_cap)) * mask).sum() / n)
    return stats, tis


def apply_tis(batch: RolloutBatch, tis: Tensor | None) -> RolloutBatch:
    """Per-token advantages [M, R] weighted by the TIS weights ``tis`` of :func:`rollout_mismatch` (None: unchanged):
    w·pg equals pg with w·A, as w > 0.
    """
    if tis is None:
        return batch
    return batch.with_(advantages=batch.advantages[:, None] * tis)
