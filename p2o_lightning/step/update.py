"""PPO update stage: ``ppo_epochs`` passes × mini-batches of whole groups × micro-batches, one optimizer step each.

Each pass shuffles the G groups (the K rollouts of a prompt stay together) and splits them into mini-batches of
``mini_batch_groups``; each mini-batch is one optimizer step, its loss accumulated over micro-batches of
``micro_batch_size`` rows (or by a token budget: :func:`~p2o_lightning.step.logprobs.micro_batches`), each
normalised by the whole mini-batch (``num_tokens`` / ``num_seqs`` of :func:`p2o_lightning.ops.policy_loss`) so that
the micro-batch gradients add up to the mini-batch's.

**One update, no old pass.** With one PPO epoch and one mini-batch (:func:`single_update`, the default configs)
π_old is π_θ before its only update, so the update's own forward gives it: ``old_logp = logp.detach()`` (ratio 1,
as TRL and verl do), the entropy and, for distilled rows, log π(y|t(x)) come from the same forward and the same
``linear_logprob_multi`` call. The one exception is the ``tokens`` scope of the context ratio mask, whose token-mean
divides by the tokens the mask keeps: those are known only from π_old, so the old pass runs first.

**The fused head** (``LogProbSettings.fused_head``). At ratio 1 the loss's gradient w.r.t. each token's log-prob is
known as soon as the log-prob is, so the LM head's backward can run inside the forward
(:mod:`p2o_lightning.fused_head`): the update hands the forward the loss's per-token weights
(:class:`~p2o_lightning.fused_head.RatioOneLoss`) and gets the loss back with its gradients; the statistics still
come from ``policy_loss`` (no grad) on the same log-probs. :meth:`PPOUpdate.passes` decides, per step, where it runs:
by default (``fused_head=None``) wherever it applies and the vocabulary has at least :data:`FUSED_HEAD_MIN_VOCAB`
tokens, where the head's logits are most of the update (CPU, one thread, ``bench_step.py --compare-head``: 25% off
the update at V = 151,936; none at the embedded world's V = 100, 231 against 222 ms, within the noise).

**The skill anchor's backward** is its own: the distillation loss's backward runs first, then w × the anchor's
(the two graphs share only the parameters, so the gradients add up to one backward of their sum, up to float
rounding), measured on the step's :class:`~p2o_lightning.stopwatch.Stopwatch` as ``anchor_backward``: with the
context forward (``context_forward``), what the anchor costs over the paper's loss.

Gradient clipping and the non-finite checks live with the optimizer step (the ``optimizer_step`` callable the
module passes, :class:`p2o_lightning.optim.OptimizerStep`); a step that the fp16 GradScaler skipped is counted, not
fatal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from p2o_lightning.fused_head import RatioOneLoss
from p2o_lightning.loss import LossSettings
from p2o_lightning.packing import PositionTally
from p2o_lightning.step.batch import RolloutBatch
from p2o_lightning.step.distill import (
    anchor_mask,
    context_mask,
    needs_context_logp,
    opening_gate,
    opening_open_rows,
    plain_failed_groups,
)
from p2o_lightning.step.logprobs import LogProbSettings, forward_rows, micro_batches
from p2o_lightning.step.stats import UpdateStats
from p2o_lightning.stopwatch import Stopwatch, measured

FUSED_HEAD_MIN_VOCAB = 32_768  # the fused head by default from this vocabulary up (LogProbSettings.fused_head=None)
KL_ROWS = ("all", "plain", "untemplated")


@dataclass(frozen=True)
class PPOSettings:
    """The update's own settings, from the module's checked groups (:mod:`p2o_lightning.settings`)."""

    ppo_epochs: int  # passes over one rollout batch
    mini_batch_groups: int | None  # groups (prompts) per optimizer step; None: the whole batch
    opening_tokens: int = 0  # P²O's opening gate (step/distill.py): distilled rows' first n tokens wait for ...
    opening_gate: float = 0.5  # ... a geometric-mean context ratio of their continuation of at least this
    kl_rows: str = "all"  # the KL term's rows: all | plain (not distilled) | untemplated (groups without templates)

    def check_batch_size(self, batch_size: int | None) -> None:
        """Every PPO update must see the same number of prompts: the mini-batch divides the data's batch."""
        mini = self.mini_batch_groups
        if batch_size and mini and batch_size % mini:
            raise ValueError(
                f"model.ppo_mini_batch_size={mini} does not divide data.batch_size={batch_size}: every PPO update"
                f" must see the same number of prompts (choose a divisor of {batch_size})"
            )


@dataclass(frozen=True)
class LogProbPasses:
    """The log-prob passes of one step, decided once (:meth:`PPOUpdate.passes`): the log-prob stage and the update
    both read it.
    """

    old_pass: bool  # the log-prob stage computes π_old (+ entropy) of every row; else the update's forward gives it
    context: bool  # some row is distilled and log π(y|t(x)) is needed (ratio mask, rollout mismatch, anchor)
    anchored: bool  # the skill anchor: the update needs log π(y|t(x)) of the distilled rows with a gradient
    fused_head: bool = False  # ratio 1 and a loss known from logp alone: the head's backward runs in the log-prob pass

    @property
    def update_context(self) -> bool:
        """The update's forward also scores the sampled prompts: π_old's context when it gives π_old, or the anchor."""
        return (not self.old_pass and self.context) or self.anchored


def single_update(settings: PPOSettings, num_groups: int) -> bool:
    """One PPO epoch and one mini-batch: π_old = π_θ at the only update (no separate old log-prob pass needed)."""
    return settings.ppo_epochs == 1 and (settings.mini_batch_groups is None or settings.mini_batch_groups >= num_groups)


class PPOUpdate:
    """The update stage; ``__call__`` runs it on one batch and returns the step's loss statistics and the batch
    (with π_old, entropy and context log-probs filled in when the update computed them).
    """

    def __init__(self, settings: PPOSettings, loss: LossSettings, logprob: LogProbSettings) -> None:
        self.settings = settings
        self.loss = loss
        self.logprob = logprob

    @property
    def masks_tokens(self) -> bool:
        """The context ratio mask is on in its ``tokens`` scope: its token-mean denominators need π_old first."""
        return self.loss.context_mask_scope == "tokens" and self.loss.context_ratio_bounds is not None

    def fuses_old_logprobs(self, batch: RolloutBatch) -> bool:
        """π_old comes from the update's own forward: a single update, and no ``tokens``-scope context mask (whose
        token-mean denominators need π_old before the update).
        """
        return single_update(self.settings, batch.num_groups) and not (batch.reprompted and self.masks_tokens)

    def passes(
        self,
        batch: RolloutBatch,
        tis_cap: float | None,
        any_rank: Callable[[bool], bool] = bool,
        vocab_size: int | None = None,
    ) -> LogProbPasses:
        """The step's log-prob passes: a separate π_old pass unless the update fuses it (TIS needs π_old before the
        update), the context log-probs when a row is distilled and something reads them, the anchor's; and whether
        the update runs the fused head (:meth:`wants_fused_head`, of the model's ``vocab_size``): only where the ratio
        is 1 (no π_old pass) and the loss's gradient is known from each token's log-prob before the forward (no
        skill anchor, whose second loss needs log π(y|t(x)) with a gradient; no opening gate or ``kl_rows``, whose
        advantages and references wait for the forward's log-probs). The ``tokens`` scope with distilled rows already
        takes the π_old pass.

        Every rank takes the same passes: a pass that one rank's rows need (``any_rank``, an all-reduce under
        ``torch.distributed``) all run, since FSDP2's all-gathers in each forward are collectives. A rank without
        distilled rows scores its sampled prompts, which are its trained ones: the same numbers, one more forward.
        """
        s = self.settings
        old_pass = any_rank(tis_cap is not None or not self.fuses_old_logprobs(batch))
        anchored = any_rank(self.loss.anchor_weight > 0 and batch.reprompted)
        gated = any_rank((s.opening_tokens > 0 or s.kl_rows != "all") and batch.reprompted)  # wait for the logp
        context = needs_context_logp(batch, self.loss.context_ratio_bounds, self.loss.anchor_weight, s.opening_tokens)
        return LogProbPasses(
            old_pass=old_pass,
            context=any_rank(context),
            anchored=anchored,
            fused_head=self.wants_fused_head(vocab_size) and not old_pass and not anchored and not gated,
        )

    def wants_fused_head(self, vocab_size: int | None) -> bool:
        """The fused head where it applies: ``LogProbSettings.fused_head`` when set; by default (None) with a
        ``head_dtype`` (which only the fused head reads) or a vocabulary of at least :data:`FUSED_HEAD_MIN_VOCAB`.
        """
        if self.logprob.fused_head is not None:
            return self.logprob.fused_head
        return self.logprob.head_dtype is not None or (vocab_size or 0) >= FUSED_HEAD_MIN_VOCAB

    def check_head_dtype(self, tis_cap: float | None, batch_size: int | None, device: torch.device) -> None:
        """A ``head_dtype`` applies to the fused head only: refuse settings under which a step could take the
        unfused path (where it would silently not apply), and a bf16 head on a GPU without bf16.
        """
        if self.logprob.head_dtype is None:
            return
        if self.logprob.head_dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"head_dtype='bfloat16': {torch.cuda.get_device_name(device)} has no bf16 support")
        s = self.settings
        reasons = {
            f"ppo_epochs={s.ppo_epochs}": s.ppo_epochs != 1,
            f"ppo_mini_batch_size={s.mini_batch_groups}": s.mini_batch_groups is not None
            and (batch_size is None or s.mini_batch_groups < batch_size),
            f"tis_cap={tis_cap}": tis_cap is not None,
            f"anchor_weight={self.loss.anchor_weight}": self.loss.anchor_weight > 0,
            "context_mask_scope='tokens'": self.masks_tokens,
        }
        blockers = [name for name, blocks in reasons.items() if blocks]
        if blockers:
            raise ValueError(
                f"head_dtype={self.logprob.head_dtype!r} applies to the fused head, which runs only with one PPO "
                f"update per step at ratio 1; {', '.join(blockers)} would take the unfused path"
            )

    def __call__(
        self,
        batch: RolloutBatch,
        passes: LogProbPasses,
        policy,
        ops,
        backward: Callable[[Tensor], None],
        zero_grad: Callable[[], None],
        optimizer_step: Callable[[], tuple[float, bool]],  # -> (grad norm before clipping, skipped by the scaler)
        where: Callable[[], str],  # "at global step ... (rollout step ...)", for error messages
        stopwatch: Stopwatch | None = None,  # measures the context forward and the anchor's backward
    ) -> tuple[dict[str, float], RolloutBatch]:
        s, lp, bounds = self.settings, self.logprob, self.loss.context_ratio_bounds
        loss_fn = partial(ops.policy_loss, settings=self.loss)
        G, K = batch.num_groups, batch.group_size
        device = batch.response_ids.device
        mask = batch.loss_mask  # [M, R]
        fused_old = not passes.old_pass  # single update: π_old comes from this forward
        anchored = passes.anchored  # the skill anchor needs log π(y|t(x)) with grad
        with_context = passes.update_context
        anchor_tokens = anchor_mask(batch) if anchored else None  # [M, R]
        nothing_to_lose = plain_failed_groups(batch) if s.opening_tokens > 0 else None  # [G]
        distilled_rows = batch.distilled  # [M] bool
        templated_groups = distilled_rows.view(G, K).any(1)  # [G] bool: some row sampled under a template
        if fused_old:
            old_all = torch.zeros_like(mask)  # [M, R]
            entropy_all = torch.zeros_like(mask)
            context_all = torch.zeros_like(mask) if with_context else None
        stats = UpdateStats()
        tally = PositionTally()  # the update's forward positions against its real tokens: train/padding_share
        for _ in range(s.ppo_epochs):
            groups = torch.randperm(G)  # shuffle whole groups; the K rollouts of a prompt stay together
            for group_ids in groups.split(s.mini_batch_groups or G):
                rows = (group_ids[:, None] * K + torch.arange(K)).flatten().to(device)  # [mini·K]
                kept = mask[rows]  # [mini·K, R] the tokens a token-mean divides by
                keep = context_mask(batch, bounds, rows) if self.loss.context_mask_scope == "tokens" else None
                if keep is not None:  # the tokens scope: a token the context ratio mask drops leaves the mean
                    kept = kept * keep
                num_tokens = kept.sum().clamp(min=1)
                zero_grad()
                for micro in micro_batches(batch, rows, lp):  # by rows, or by tokens
                    ref = None if batch.ref_logp is None else batch.ref_logp[micro]
                    kl_free = None  # [m] bool: rows the KL term leaves alone (their reference becomes π_old)
                    if ref is not None and s.kl_rows != "all" and batch.reprompted:
                        kl_free = distilled_rows[micro]
                        if s.kl_rows == "untemplated":  # every row of a group sampled with templates
                            kl_free = templated_groups[micro // K]
                    head_loss = None
                    if passes.fused_head:  # the loss's weights at ratio 1: its gradients come out of the forward
                        head_loss = RatioOneLoss.of(  # the context ratio mask applies once the forward gives π(y|t(x))
                            batch.advantages[micro], mask[micro], self.loss, ref_logp=ref, num_tokens=num_tokens,
                            num_seqs=len(rows),
                        )  # fmt: skip
                    logp, entropy, live_context, head_value = forward_rows(
                        policy, batch, micro, ops, lp, fused_old, with_context, anchored, head_loss, stopwatch, tally
                    )
                    if fused_old:
                        old = logp.detach()
                        old_all[micro], entropy_all[micro] = old, entropy.detach()
                        context = None if live_context is None else live_context.detach()  # π_old(y | t(x))
                        if context is not None and context_all is not None:
                            context_all[micro] = context
                    else:
                        old = batch.old_logp[micro]
                        context = None if batch.context_logp is None else batch.context_logp[micro]
                    if kl_free is not None:  # reference π_old: no KL value, and no KL gradient at ratio 1
                        ref = torch.where(kl_free[:, None], old, ref)
                    advantages = batch.advantages[micro]  # [m]
                    gate = None
                    if s.opening_tokens > 0 and context is not None:  # [m, R]: distilled openings not yet earned
                        distilled = distilled_rows[micro]
                        gate = opening_gate(
                            old, context, mask[micro], distilled, s.opening_tokens, s.opening_gate,
                            nothing_to_lose=nothing_to_lose[micro // K],
                        )  # fmt: skip
                        advantages = advantages[:, None] * gate  # [m, R]
                    with torch.no_grad() if head_value is not None else contextlib.nullcontext():
                        loss, loss_stats = loss_fn(
                            logp,
                            old,
                            advantages,
                            mask[micro],
                            ref_logp=ref,
                            num_tokens=num_tokens,
                            num_seqs=len(rows),
                            context_logp=context if bounds is not None else None,  # the mask's input
                        )
                    if head_value is not None:  # the same loss, with the gradients the fused head computed
                        loss = head_value
                    if anchored:  # w · L_PPO(y | t(x)): on-policy, no ratio mask
                        anchor, _ = loss_fn(  # kl_coef=0: π_ref is scored on x
                            live_context, context, batch.advantages[micro], anchor_tokens[micro],
                            num_tokens=num_tokens, num_seqs=len(rows), settings=self.loss.anchor,
                        )  # fmt: skip
                        loss_stats["anchor_loss"] = anchor.detach()
                    if gate is not None:
                        loss_stats["opening_open_rows"] = opening_open_rows(gate, distilled, s.opening_tokens)
                    total = loss.detach() + self.loss.anchor_weight * anchor.detach() if anchored else loss.detach()
                    if not torch.isfinite(total):
                        raise FloatingPointError(
                            f"non-finite loss ({total.item()}) {where()}; stopping before the optimizer step, "
                            "no checkpoint is written"
                        )
                    backward(loss)
                    if anchored:  # its own backward, through the context forward only
                        with measured(stopwatch, "anchor_backward"):
                            backward(self.loss.anchor_weight * anchor)
                    share = float(mask[micro].sum() / mask[rows].sum().clamp(min=1))
                    stats.add_micro({"loss": total, **loss_stats}, token_share=share)
                grad_norm, skipped = optimizer_step()
                stats.end_update(grad_norm=0.0 if skipped else grad_norm, skipped_steps=float(skipped))
        zero_grad()  # the gradients are spent: freed now, not held through the next rollout (a copy of the weights)
        if fused_old:
            batch = batch.with_(old_logp=old_all, entropy=entropy_all, context_logp=context_all)
        return {**stats.result(), "padding_share": tally.padding_share}, batch
