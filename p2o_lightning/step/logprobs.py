"""Log-prob stage: π_old (with entropy), π_ref and P²O's context log-probs of every rollout token, under no grad.

One pass over the rows in micro-batches. When some row is distilled (trained under x, sampled under template(x)),
each micro-batch runs the decoder on both prompts and scores both contexts with **one** ``linear_logprob_multi``
call, so the LM head weight is streamed once for log π(y|x) and log π(y|t(x)) (both backends; the Triton kernel
multiplies each weight tile with the two contexts' rows in one ``tl.dot``). The reference model (only when
``kl_coef > 0``) is a second pass. Which passes run is the step's :class:`~p2o_lightning.step.update.LogProbPlan`
(``PPOUpdate.plan``): when the PPO update is a single one, π_old is π_θ at that update, detached, the update's
forward gives it and the context, and this stage computes only the reference. The engine's sampling log-probs are
compared with π_old once it is known (:func:`rollout_mismatch`: before the update, where TIS weights the
advantages, :func:`apply_tis`; after it when the update gives π_old).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from p2o_lightning.ops import tis_weights
from p2o_lightning.step.batch import RolloutBatch


@dataclass(frozen=True)
class LogProbSettings:
    temperature: float  # the sampling temperature (1 for greedy): log-probs of the distribution sampled from
    chunk_size: int  # tokens per chunk of the log-prob op
    micro_batch_size: int  # rows per forward


def forward_rows(
    model,
    batch: RolloutBatch,
    rows: Tensor,
    ops,
    settings: LogProbSettings,
    return_entropy: bool,
    with_context: bool,
    context_grad: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One forward of ``model`` over ``rows``: ``(logp, entropy, context_logp)``, each [len(rows), R] or None
    (``context_logp`` with a gradient when ``context_grad``).
    """
    response, response_mask = batch.response_ids[rows], batch.response_mask[rows]  # [m, R]
    context = None, None
    if with_context:
        context = (torch.cat([batch.gen_ids[rows], response], 1), torch.cat([batch.gen_mask[rows], response_mask], 1))
    return model(
        torch.cat([batch.prompt_ids[rows], response], 1),  # [m, P + R]
        torch.cat([batch.prompt_mask[rows], response_mask], 1),
        response.masked_fill(response_mask == 0, -100),  # [m, R] targets
        ops,
        temperature=settings.temperature,
        return_entropy=return_entropy,
        chunk_size=settings.chunk_size,
        context_ids=context[0],  # [m, Pg + R]
        context_mask=context[1],
        context_grad=context_grad,
    )


def token_logprobs(
    model,
    batch: RolloutBatch,
    ops,
    settings: LogProbSettings,
    return_entropy: bool = False,
    with_context: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(logp, entropy, context_logp)`` [M, R] of every row, in micro-batches; with grad iff grad is enabled.

    ``with_context``: also log π(y | sampled prompt), in the same ``linear_logprob_multi`` call as log π(y | trained
    prompt).
    """
    rows = torch.arange(batch.response_ids.shape[0], device=batch.response_ids.device)
    outs = [
        forward_rows(model, batch, micro, ops, settings, return_entropy, with_context)
        for micro in rows.split(settings.micro_batch_size)
    ]
    return tuple(torch.cat([o[i] for o in outs]) if outs[0][i] is not None else None for i in range(3))  # type: ignore[return-value]


@torch.no_grad()
def rollout_logprobs(
    policy,
    reference,
    batch: RolloutBatch,
    ops,
    settings: LogProbSettings,
    need_old: bool = True,
    with_context: bool = False,
) -> RolloutBatch:
    """The batch with ``old_logp`` and ``entropy`` (when ``need_old``), ``context_logp`` (when ``need_old`` and
    ``with_context``) and ``ref_logp`` (when ``reference`` is given). Without ``need_old`` the update's own forward
    gives π_old and the context (:mod:`p2o_lightning.step.update`).
    """
    changes: dict[str, Tensor | None] = {}
    if need_old:
        old, entropy, context = token_logprobs(
            policy, batch, ops, settings, return_entropy=True, with_context=with_context
        )
        changes.update(old_logp=old, entropy=entropy, context_logp=context)
    if reference is not None:
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
