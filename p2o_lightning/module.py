"""``P2OModule``: GRPO with PPO-clip on verifiable rewards, as a LightningModule that wires the RL step's stages.

One ``training_step`` is one RL iteration, read top to bottom as the stages of :mod:`p2o_lightning.step`, one
:class:`~p2o_lightning.step.batch.RolloutBatch` flowing through them: plan → sample → dynamic sampling → score →
distill → logprobs → update → stats, timed as ``time/rollout_s``, ``time/logprob_s``, ``time/update_s`` (wall) and
``time/<stage>_cpu_s`` (process CPU), with P²O's extra costs inside them on their own: ``time/context_forward_s``
(the forward on the prompt a distilled row was sampled under) and ``time/anchor_backward_s`` (the skill anchor's
backward), each with its ``_cpu_s``; 0 in a step without them (:mod:`p2o_lightning.stopwatch`). Manual
optimisation: ``global_step`` counts PPO updates, ``train/rollout_step`` RL iterations. The module never imports
triton. P²O hooks in through ``template_assignments`` (read by the plan) and the per-step ``outputs``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from p2o_lightning.backend import get_ops
from p2o_lightning.evaluation import add_val_metrics, evaluate, log_sanity_check
from p2o_lightning.loss import LossSettings
from p2o_lightning.metrics import CollapseRate
from p2o_lightning.optim import OptimizerStep, lr_schedule, total_updates
from p2o_lightning.policy import (
    PolicyLogProb,
    load_policy,
    load_reference,
    load_tokenizer,
    max_positions,
    resolve_model_path,
)
from p2o_lightning.rewards import SafeGrader
from p2o_lightning.rng import capture_rank_rng_states, capture_rng_state, rank_rng_state, restore_rng_state
from p2o_lightning.rollout import PromptEncoder, SamplingParams
from p2o_lightning.settings import check_settings
from p2o_lightning.step.distill import reprompt
from p2o_lightning.step.dynamic import check_dynamic_sampling, dynamic_sample
from p2o_lightning.step.logprobs import LogProbSettings, apply_tis, rollout_logprobs, rollout_mismatch
from p2o_lightning.step.sample import GroupSampler, Sampler, make_engine
from p2o_lightning.step.score import score_groups
from p2o_lightning.step.stats import log_step, p2o_metrics, sampling_metrics, train_metrics
from p2o_lightning.step.update import PPOSettings, PPOUpdate
from p2o_lightning.stopwatch import Stopwatch
from p2o_lightning.tasks import get_task

__all__ = ["P2OModule"]


class P2OModule(L.LightningModule):
    """GRPO policy optimisation on verifiable rewards, with seams for P²O's prompt evolution and distillation.

    Args:
        model: local path of a HF causal LM (``save_pretrained`` layout), or ``embedded`` (the shipped embedded world).
        task: the verifiable task's name (must match the data's).
        optimizer: the optimizer, called with the policy's parameters (LightningCLI ``class_path`` / ``init_args``).
        warmup_steps: linear warm-up, in PPO updates; a value in (0, 1) is a share of all updates.
        lr_schedule: after warm-up: ``constant`` (the paper) or ``cosine`` decay to 0.
        max_grad_norm: clip the global gradient norm to this (0 or None: no clipping).
        num_rollouts: K, rollouts per prompt.
        temperature: sampling temperature of rollouts; log-probs are computed at the same temperature.
        top_p: nucleus sampling of rollouts.
        max_new_tokens: response length limit of rollouts.
        ppo_epochs: passes over one rollout batch.
        ppo_mini_batch_size: prompts per PPO update (None: the whole batch, one update per pass).
        micro_batch_size: sequences per forward / backward (gradient accumulation inside a mini-batch).
        micro_batch_tokens: with a value, micro-batches by a token budget: rows sorted by length and cut where
            rows × (longest prompt + longest response) would pass it, at most ``micro_batch_size`` rows each
            (None: ``micro_batch_size`` rows in order). Either way each forward runs on its rows' own widths.
        clip_low: PPO ratio clip below (1 - clip_low).
        clip_high: PPO ratio clip above (1 + clip_high); > clip_low is DAPO's clip-higher.
        clip_ratio_c: dual-clip bound for negative advantages (None: off).
        loss_agg: ``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum``.
        norm_adv_by_std: GRPO's std normalisation of advantages (False: Dr. GRPO's ``r - mean``).
        kl_coef: weight of the KL-to-reference term in the loss (0, the paper's setting, skips the reference).
        kl_estimator: ``k1`` | ``k2`` | ``k3``.
        kl_rows: which rows the KL term holds: ``all`` | ``plain`` (P²O, ours: not the distilled rows, whose
            templated responses the reference would hold back) | ``untemplated`` (ours: only the groups sampled
            without templates: it holds the answers of the prompts the plain prompt solves while others are
            distilled, and leaves a templated prompt's plain rows free to switch). Other than ``all`` it needs
            ``k2`` or ``k3``, whose gradient vanishes where π = π_old.
        backend: op implementation: ``auto`` (Triton on CUDA when available, else torch) | ``torch`` | ``triton``.
        logprob_chunk_size: tokens per chunk of the log-prob op (bounds the live logits to chunk × vocab).
        fused_head: with one PPO update per step (ratio 1), compute the loss's LM-head gradients inside the log-prob
            pass (:mod:`p2o_lightning.fused_head`: each chunk's logits once, not again in backward); other steps take
            the unfused path (``PPOUpdate.passes`` decides). None (the default): on where it applies and the
            vocabulary has at least ``FUSED_HEAD_MIN_VOCAB`` (32,768) tokens, where it wins (step/update.py).
        head_dtype: the fused head's matmul operands: None (float32 on CPU, the model's dtype with Triton) or
            ``bfloat16`` (float32 softmax and accumulation), meant for CPUs with AMX / AVX512-BF16 units and GPUs and
            not timed on one (its error: ``benchmarks/bench_head_dtype.py``); needs ``fused_head`` and settings that
            always fuse, and a GPU with bf16.
        reward_timeout: seconds a reward call may take before it scores 0 and is counted as a timeout.
        val_num_samples: k of the validation mean@k (sampled at ``val_temperature``; 0 disables it).
        val_temperature: sampling temperature of mean@k validation.
        val_max_new_tokens: response length limit in validation (None: ``max_new_tokens``).
        dtype: parameter dtype of policy and reference: ``float32`` | ``bfloat16`` | ``float16``.
        attn_implementation: HF attention kernel (``sdpa``, ``eager``, ``flash_attention_2`` needs the flash extra).
        gradient_checkpointing: recompute activations in backward to save memory.
        rollout_engine: ``loop`` (our own decode loop on the policy, the default) | ``hf`` (transformers generate) |
            ``vllm`` (a colocated ``vllm.LLM``, the optional extra).
        vllm_options: keyword arguments of the vLLM engine (``gpu_memory_utilization``, ``max_model_len``,
            ``kv_cache_memory_bytes``, ``sleep``; see :class:`~p2o_lightning.rollout.vllm.VLLMRolloutEngine`).
        tis_cap: truncated importance sampling: weight each token's policy-gradient term by
            min(π_old / π_rollout, tis_cap), the trainer's over the engine's probability of the sampled token
            (verl / TRL; 2.0 is common with vLLM). None: off; the mismatch is still logged.
        seed: seed of validation sampling (kept apart from the training RNG stream).
        distill: P²O context distillation: rollouts sampled from a templated prompt are trained as responses to
            the original prompt (False: the paper's "no distillation" ablation, trained on the templated prompt).
        context_ratio_bounds: P²O's context ratio mask: distilled tokens with ρ = π(y|x) / π(y|template(x))
            outside [low, high] are cut (None: no mask).
        context_mask_scope: what the context ratio mask cuts: ``policy_gradient`` (the reference: the token's PPO
            term only; it stays in the token-mean denominator and keeps its KL term) | ``tokens`` (the whole token).
        plain_rollouts: P²O mixed groups: this many of the K rollouts of a templated prompt are sampled from the
            plain prompt (the reference's ``left_1_no_template_rollout`` is 1), so the group holds the contrast
            that teaches the plain prompt the templated behaviour (see :mod:`p2o_lightning.step.plan`).
        drop_failed_templated: the failed (reward 0) templated rollouts leave the loss (the reference's
            ``drop_failed_template_rollout``); they still count in their group's advantage.
        plain_advantage: P²O, the plain rows of a templated group: ``group`` (their group advantage, as the paper) |
            ``nonnegative`` (ours: a failed plain row gets 0 instead of a negative advantage;
            :mod:`p2o_lightning.step.score`).
        anchor_weight: P²O's skill anchor (not in the paper; 0: off): a distilled row is also trained under the
            prompt it was sampled from, with this weight (:mod:`p2o_lightning.step.distill`).
        opening_tokens: P²O's opening gate (not in the paper; 0: off): the first n response tokens of a distilled row
            stay out of its policy-gradient term until the plain prompt continues the row about as well as its
            template (:mod:`p2o_lightning.step.distill`): it learns the templated skill before it switches to it.
        opening_gate: the gate's threshold γ in (0, 1]: the geometric-mean context ratio π(y|x) / π(y|t(x)) over
            the row's tokens after its opening that opens it.
        dynamic_sampling: ``off`` | ``filter`` (DAPO, verl's ``filter_groups``: groups whose K rewards are all equal
            are dropped and more prompts sampled until the batch is full; :mod:`p2o_lightning.step.dynamic`).
        max_sampling_rounds: sampling rounds per step under ``filter``, the first included; then the batch is
            filled with dropped groups (zero advantage).
    """

    def __init__(
        self,
        model: str = "embedded",
        task: str = "addition",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: float = 0.0,
        lr_schedule: str = "constant",
        max_grad_norm: float | None = 1.0,
        num_rollouts: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        ppo_epochs: int = 1,
        ppo_mini_batch_size: int | None = None,
        micro_batch_size: int = 32,
        micro_batch_tokens: int | None = None,
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        clip_ratio_c: float | None = None,
        loss_agg: str = "token-mean",
        norm_adv_by_std: bool = True,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        kl_rows: str = "all",
        backend: str = "auto",
        logprob_chunk_size: int = 1024,
        fused_head: bool | None = None,
        head_dtype: str | None = None,
        reward_timeout: float = 10.0,
        val_num_samples: int = 4,
        val_temperature: float = 1.0,
        val_max_new_tokens: int | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        rollout_engine: str = "loop",
        vllm_options: dict[str, Any] | None = None,
        tis_cap: float | None = None,
        seed: int = 0,
        distill: bool = True,
        context_ratio_bounds: tuple[float, float] | None = (0.01, 10.0),
        context_mask_scope: str = "policy_gradient",
        plain_rollouts: int = 0,
        drop_failed_templated: bool = False,
        anchor_weight: float = 0.0,
        opening_tokens: int = 0,
        opening_gate: float = 0.5,
        plain_advantage: str = "group",
        dynamic_sampling: str = "off",
        max_sampling_rounds: int = 3,
    ) -> None:
        super().__init__()  # every setting is checked here, before a model is loaded or a rollout sampled
        check_settings(
            dtype=dtype, lr_schedule=lr_schedule, backend=backend, num_rollouts=num_rollouts,
            micro_batch_size=micro_batch_size, max_new_tokens=max_new_tokens, dynamic_sampling=dynamic_sampling,
            max_sampling_rounds=max_sampling_rounds, plain_rollouts=plain_rollouts,
            attn_implementation=attn_implementation, rollout_engine=rollout_engine, tis_cap=tis_cap,
            plain_advantage=plain_advantage,
        )  # fmt: skip
        loss = LossSettings(
            clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, loss_agg=loss_agg, kl_coef=kl_coef,
            kl_estimator=kl_estimator, context_ratio_bounds=context_ratio_bounds,
            context_mask_scope=context_mask_scope, anchor_weight=anchor_weight,
        )  # fmt: skip
        logprob = LogProbSettings(
            temperature if temperature > 0 else 1.0,
            logprob_chunk_size,
            micro_batch_size,
            micro_batch_tokens=micro_batch_tokens,
            fused_head=fused_head,
            head_dtype=head_dtype,
        )
        if kl_rows != "all" and kl_estimator == "k1":
            raise ValueError(f"kl_rows={kl_rows!r} needs kl_estimator k2 or k3: k1's gradient is 1 on every token")
        ppo = PPOSettings(ppo_epochs, ppo_mini_batch_size, opening_tokens, opening_gate, kl_rows)
        self.ppo = PPOUpdate(ppo, loss, logprob)
        self.task = get_task(task)
        # a missing folder / config / weights / tokenizer, or a shipped world that fails its checks, named before
        # anything loads
        resolve_model_path(model)
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.automatic_optimization = False
        self.grader = SafeGrader(self.task, timeout=reward_timeout)
        self.policy, self.tokenizer, self.engine, self.sampler = None, None, None, None  # in configure_model
        self._reference: list[PolicyLogProb] = []  # held outside the module tree: frozen, never checkpointed
        self.collapse = CollapseRate()
        self.rollout_steps = 0  # RL iterations done (checkpointed)
        # P²O: prompt text -> the K templates its rollouts are sampled with (set by P2OCallback, keyed by content)
        self.template_assignments: dict[str, list[str]] = {}
        self.val_metrics = nn.ModuleDict()
        self._optimizer_step = OptimizerStep(max_grad_norm)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy, self.tokenizer = load_policy(
            hp.model, hp.dtype, hp.attn_implementation, hp.gradient_checkpointing, self.device_mesh
        )
        vllm = dict(dtype=hp.dtype, seed=hp.seed, **(hp.vllm_options or {}))
        strategy = getattr(self._trainer, "strategy", None)
        self.engine = make_engine(hp.rollout_engine, self.policy.lm, self.tokenizer, hp.model, strategy, **vllm)
        self.sampler = Sampler(self.engine, self.grader, self.policy)

    @property
    def reference(self) -> PolicyLogProb:
        """The frozen reference model (initial weights): eval mode, no grad, outside the optimizer.

        Loaded from the model path on first use (the KL term, self-reflection): a run without them never holds a
        second copy. Loading draws no random numbers from the run's streams (exact resume holds).
        """
        if not self._reference:
            hp = self.hparams
            state = capture_rng_state()
            try:
                self._reference = [load_reference(hp.model, hp.dtype, hp.attn_implementation)]
            finally:
                restore_rng_state(state)
        ref = self._reference[0]
        if next(ref.parameters()).device != self.device:
            ref.to(self.device)
        return ref

    @property
    def ops(self):
        return get_ops(self.hparams.backend, self.device)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "task", self.hparams.task) != self.hparams.task:
            raise ValueError(f"model.task={self.hparams.task!r} but data.task={dm.task!r}: they must match")
        if stage == "fit":
            self.ppo.settings.check_batch_size(getattr(dm, "batch_size", None))
            self.ppo.check_head_dtype(self.hparams.tis_cap, getattr(dm, "batch_size", None), self.device)
            check_dynamic_sampling(self.hparams.dynamic_sampling, self.hparams.max_sampling_rounds, dm)
            if self.hparams.dynamic_sampling == "filter" and not hasattr(dm, "extra_batch"):
                raise ValueError(
                    "dynamic_sampling='filter' draws more prompts: it needs PromptDataModule (extra_batch)"
                )
        if hasattr(dm, "fit_to_positions"):  # prompts against the model's positions, before any weights load
            self._fit_prompts_to_positions(dm, train=stage == "fit")
        add_val_metrics(self, getattr(dm, "val_split_names", None) or [])

    def _fit_prompts_to_positions(self, dm, train: bool) -> None:
        """The data's prompts against the model's positions: ``max_position_embeddings`` (vLLM's ``max_model_len`` when
        smaller) minus the response budget, counted by the tokenizer as the rollout engine encodes prompts.
        """
        hp = self.hparams
        positions = max_positions(hp.model)
        engine_len = (hp.vllm_options or {}).get("max_model_len") if hp.rollout_engine == "vllm" else None
        if engine_len:
            positions = min(positions, engine_len) if positions else engine_len
        prompts = PromptEncoder(load_tokenizer(hp.model), eos_token_ids=[])
        val_budget = hp.val_max_new_tokens or hp.max_new_tokens
        dm.fit_to_positions(prompts.prompt_lengths, positions, hp.max_new_tokens, val_budget, train=train)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        hp = self.hparams
        total = total_updates(self.trainer, hp.ppo_epochs, hp.ppo_mini_batch_size)
        scheduler = lr_schedule(optimizer, hp.warmup_steps, total, hp.lr_schedule == "cosine")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        # inside opt.step(), after the fp16 GradScaler unscaled the gradients
        self._optimizer_step.clip(self.policy.parameters(), self.trainer, self._where())

    def _where(self) -> str:
        return f"at global step {self.global_step} (rollout step {self.rollout_steps})"

    def sample(self, prompts: list[str], answers: list[str], sampling: SamplingParams):
        """Rollouts of ``prompts`` and their rewards, [len(prompts) * n] (:class:`~.step.sample.Sampler`): what the
        step, validation and the P²O search sample through (a subclass may reshape the rewards here).
        """
        return self.sampler(prompts, answers, sampling)

    def _check_finite_weights(self) -> None:
        """NaN / inf in the policy's weights (a bad kernel, a bit flip) stops the run before the step's rollouts and
        optimizer step, naming the step; one reduction over all parameters (local shards under FSDP2) per step.
        """
        params = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in self.policy.named_parameters()]
        ok = bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all())
        if self.trainer.world_size > 1:
            ok = self.trainer.strategy.reduce_boolean_decision(ok, all=True)
        if not ok:
            bad = [n for n, p in params if not torch.isfinite(p).all()][:3]
            raise FloatingPointError(
                f"non-finite policy weights at global step {self.global_step} (rollout step {self.rollout_steps})"
                f"{': ' + ', '.join(bad) if bad else ' on another rank'}; stopping before the rollout and the optimizer"
                " step, so no checkpoint holds them"
            )

    def training_step(self, batch: list[dict], batch_idx: int) -> dict[str, Any]:
        hp = self.hparams
        self._check_finite_weights()
        watch = Stopwatch(self.device)  # the stages, and P²O's extra costs inside them
        ops = self.ops

        with watch.measure("rollout"):
            sampling = SamplingParams(hp.num_rollouts, hp.temperature, hp.top_p, hp.max_new_tokens)
            assignments = self.template_assignments  # P²O's, set by its callback
            sample_groups = GroupSampler(self.sample, sampling, assignments, hp.plain_rollouts, hp.distill)
            draw = getattr(self.trainer.datamodule, "extra_batch", None)  # DAPO's further rounds draw more prompts
            rounds = hp.max_sampling_rounds if hp.dynamic_sampling == "filter" else 1
            any_rank = partial(self.trainer.strategy.reduce_boolean_decision, all=False)  # ranks take equal rounds
            pad = self.tokenizer.pad_token_id
            rollouts, seen, rounds = dynamic_sample(sample_groups, batch, draw, rounds, pad, any_rank)

        rollouts = score_groups(rollouts, ops, hp.norm_adv_by_std, hp.drop_failed_templated, hp.plain_advantage)
        with watch.measure("logprob"):
            rollouts = reprompt(rollouts, self.engine.encode_prompts)
            reference = self.reference if hp.kl_coef > 0 else None
            vocab = self.policy.lm.get_output_embeddings().weight.shape[0]  # the fused head's default reads it
            # π_old from the update when it can; every rank alike
            passes = self.ppo.passes(rollouts, hp.tis_cap, any_rank, vocab)
            lp = self.ppo.logprob
            rollouts = rollout_logprobs(
                self.policy, reference, rollouts, ops, lp, passes.old_pass, passes.context, stopwatch=watch
            )
            mismatch = None
            if passes.old_pass:  # π_old vs π_rollout, and truncated importance sampling (with tis_cap)
                mismatch, tis = rollout_mismatch(rollouts, hp.tis_cap)
                rollouts = apply_tis(rollouts, tis)

        with watch.measure("update"):
            opt = self.optimizers()
            optimizer_step = partial(self._optimizer_step, opt, self.lr_schedulers())  # -> (grad norm, skipped)
            stats, rollouts = self.ppo(
                rollouts, passes, self.policy, ops, self.manual_backward, opt.zero_grad, optimizer_step, self._where,
                stopwatch=watch,
            )  # fmt: skip
            self.engine.sync_weights(self.policy.lm)  # the next rollouts sample from the updated policy
        self.rollout_steps += 1

        metrics = train_metrics(rollouts, watch, lr=opt.param_groups[0]["lr"], rollout_step=self.rollout_steps)
        stats.update(mismatch if mismatch is not None else rollout_mismatch(rollouts, None)[0])  # the update's π_old
        metrics.update({f"train/{k}": v for k, v in stats.items()})
        metrics.update(p2o_metrics(rollouts, hp.context_ratio_bounds))
        metrics.update(sampling_metrics(seen, rounds))
        # the collapse rate over every sampled group, the dropped ones too
        collapse = log_step(self.log, self.collapse, metrics, seen.rewards)
        # every group sampled, dropped ones included: the P²O callback's hard samples and its collapse trigger
        return {**seen.outputs(), "all_wrong": collapse["collapse_all_wrong"]}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            log_sanity_check(self)

    def validation_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        evaluate(self, batch, "val")

    def test_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        evaluate(self, batch, "test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["p2o_rng"] = capture_rank_rng_states()  # every rank's: rank 0 writes the checkpoint's metadata
        checkpoint["p2o_rollout_steps"] = self.rollout_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollout_steps = checkpoint.get("p2o_rollout_steps", 0)
        if checkpoint.get("p2o_rng") is not None:
            restore_rng_state(rank_rng_state(checkpoint["p2o_rng"], self.global_rank))

    def on_train_start(self) -> None:
        self.engine.sync_weights(self.policy.lm)  # a resumed policy is not the checkpoint the engine was built from

    def on_fit_end(self) -> None:
        self.grader.close()
