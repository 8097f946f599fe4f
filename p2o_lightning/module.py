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
from p2o_lightning.settings import (
    GROUPS,
    ComputeSettings,
    P2OSettings,
    RolloutSettings,
    UpdateSettings,
    ValidationSettings,
    check_groups,
    group,
    plain,
)
from p2o_lightning.step.distill import reprompt
from p2o_lightning.step.dynamic import dynamic_sample
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

    The settings come in groups, each a dataclass checked where it is defined (:mod:`p2o_lightning.settings`,
    :mod:`p2o_lightning.loss`); in a config they are nested keys (``model.loss.clip_high``). A group may also be
    given as a mapping of its fields (a checkpoint's hyperparameters).

    Args:
        model: local path of a HF causal LM (``save_pretrained`` layout), or ``embedded`` (the shipped embedded world).
        task: the verifiable task's name (must match the data's).
        optimizer: the optimizer, called with the policy's parameters (LightningCLI ``class_path`` / ``init_args``).
        seed: seed of validation sampling (kept apart from the training RNG stream) and of the vLLM engine.
        rollout: sampling and grading the K rollouts of each prompt
            (:class:`~p2o_lightning.settings.RolloutSettings`).
        update: the PPO update's passes, batches, advantages and learning-rate schedule
            (:class:`~p2o_lightning.settings.UpdateSettings`).
        loss: the PPO-clip loss: clip bounds, aggregation, KL term, P²O's context ratio mask and skill anchor
            (:class:`~p2o_lightning.loss.LossSettings`).
        compute: precision, attention, the ops' backend and the log-prob pass
            (:class:`~p2o_lightning.settings.ComputeSettings`).
        p2o: P²O's mixed groups, distillation, plain advantages, opening gate and KL rows
            (:class:`~p2o_lightning.settings.P2OSettings`); the prompt search is ``P2OCallback``'s.
        validation: greedy accuracy and mean@k (:class:`~p2o_lightning.settings.ValidationSettings`).
    """

    def __init__(
        self,
        model: str = "embedded",
        task: str = "addition",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        seed: int = 0,
        rollout: RolloutSettings = RolloutSettings(),
        update: UpdateSettings = UpdateSettings(),
        loss: LossSettings = LossSettings(),
        compute: ComputeSettings = ComputeSettings(),
        p2o: P2OSettings = P2OSettings(),
        validation: ValidationSettings = ValidationSettings(),
    ) -> None:
        super().__init__()  # every setting is checked here, before a model is loaded or a rollout sampled
        self.rollout = group(RolloutSettings, rollout, "rollout")
        self.update = group(UpdateSettings, update, "update")
        self.loss = group(LossSettings, loss, "loss")
        self.compute = group(ComputeSettings, compute, "compute")
        self.p2o = group(P2OSettings, p2o, "p2o")
        self.validation = group(ValidationSettings, validation, "validation")
        check_groups(self.rollout, self.loss, self.p2o)
        self.task = get_task(task)
        # a missing folder / config / weights / tokenizer, or a shipped world that fails its checks, named before
        # anything loads
        resolve_model_path(model)
        self.model_path, self.seed = model, seed
        groups = {name: plain(getattr(self, name)) for name in GROUPS}
        self.save_hyperparameters({"model": model, "task": task, "seed": seed, **groups})  # plain data: checkpoints
        u, c, p = self.update, self.compute, self.p2o
        logprob = LogProbSettings(
            self.rollout.temperature if self.rollout.temperature > 0 else 1.0,
            c.logprob_chunk_size,
            u.micro_batch_size,
            micro_batch_tokens=u.micro_batch_tokens,
            fused_head=c.fused_head,
            head_dtype=c.head_dtype,
        )
        ppo = PPOSettings(u.ppo_epochs, u.ppo_mini_batch_size, p.opening_tokens, p.opening_gate, p.kl_rows)
        self.ppo = PPOUpdate(ppo, self.loss, logprob)
        self.optimizer_factory = optimizer
        self.automatic_optimization = False
        self.grader = SafeGrader(self.task, timeout=self.rollout.reward_timeout)
        self.policy, self.tokenizer, self.engine, self.sampler = None, None, None, None  # in configure_model
        self._reference: list[PolicyLogProb] = []  # held outside the module tree: frozen, never checkpointed
        self.collapse = CollapseRate()
        self.rollout_steps = 0  # RL iterations done (checkpointed)
        # P²O: prompt text -> the K templates its rollouts are sampled with (set by P2OCallback, keyed by content)
        self.template_assignments: dict[str, list[str]] = {}
        self.val_metrics = nn.ModuleDict()
        self._optimizer_step = OptimizerStep(u.max_grad_norm)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        c, r = self.compute, self.rollout
        self.policy, self.tokenizer = load_policy(
            self.model_path, c.dtype, c.attn_implementation, c.gradient_checkpointing, self.device_mesh
        )
        vllm = dict(dtype=c.dtype, seed=self.seed, **(r.vllm_options or {}))
        strategy = getattr(self._trainer, "strategy", None)
        self.engine = make_engine(r.engine, self.policy.lm, self.tokenizer, self.model_path, strategy, **vllm)
        self.sampler = Sampler(self.engine, self.grader, self.policy)

    @property
    def reference(self) -> PolicyLogProb:
        """The frozen reference model (initial weights): eval mode, no grad, outside the optimizer.

        Loaded from the model path on first use (the KL term, self-reflection): a run without them never holds a
        second copy. Loading draws no random numbers from the run's streams (exact resume holds).
        """
        if not self._reference:
            c = self.compute
            state = capture_rng_state()
            try:
                self._reference = [load_reference(self.model_path, c.dtype, c.attn_implementation)]
            finally:
                restore_rng_state(state)
        ref = self._reference[0]
        if next(ref.parameters()).device != self.device:
            ref.to(self.device)
        return ref

    @property
    def ops(self):
        return get_ops(self.compute.backend, self.device)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        task = self.hparams.task
        if dm is not None and getattr(dm, "task", task) != task:
            raise ValueError(f"model.task={task!r} but data.task={dm.task!r}: they must match")
        if stage == "fit":
            self.ppo.settings.check_batch_size(getattr(dm, "batch_size", None))
            self.ppo.check_head_dtype(self.rollout.tis_cap, getattr(dm, "batch_size", None), self.device)
            if self.rollout.dynamic_sampling == "filter" and not hasattr(dm, "extra_batch"):
                raise ValueError(
                    f"rollout.dynamic_sampling='filter' draws more prompts: {type(dm).__name__} has no extra_batch()"
                )
        if hasattr(dm, "fit_to_positions"):  # prompts against the model's positions, before any weights load
            self._fit_prompts_to_positions(dm, train=stage == "fit")
        add_val_metrics(self, getattr(dm, "val_split_names", None) or [])

    def _fit_prompts_to_positions(self, dm, train: bool) -> None:
        """The data's prompts against the model's positions: ``max_position_embeddings`` (vLLM's ``max_model_len`` when
        smaller) minus the response budget, counted by the tokenizer as the rollout engine encodes prompts.
        """
        r = self.rollout
        positions = max_positions(self.model_path)
        engine_len = (r.vllm_options or {}).get("max_model_len") if r.engine == "vllm" else None
        if engine_len:
            positions = min(positions, engine_len) if positions else engine_len
        prompts = PromptEncoder(load_tokenizer(self.model_path), eos_token_ids=[])
        val_budget = self.validation.max_new_tokens or r.max_new_tokens
        dm.fit_to_positions(prompts.prompt_lengths, positions, r.max_new_tokens, val_budget, train=train)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        u = self.update
        total = total_updates(self.trainer, u.ppo_epochs, u.ppo_mini_batch_size)
        scheduler = lr_schedule(optimizer, u.warmup_steps, total, u.lr_schedule == "cosine")
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
        r, p = self.rollout, self.p2o
        self._check_finite_weights()
        watch = Stopwatch(self.device)  # the stages, and P²O's extra costs inside them
        ops = self.ops

        with watch.measure("rollout"):
            sampling = SamplingParams(r.num_rollouts, r.temperature, r.top_p, r.max_new_tokens)
            assignments = self.template_assignments  # P²O's, set by its callback
            sample_groups = GroupSampler(self.sample, sampling, assignments, p.plain_rollouts, p.distill)
            draw = getattr(self.trainer.datamodule, "extra_batch", None)  # DAPO's further rounds draw more prompts
            rounds = r.max_sampling_rounds if r.dynamic_sampling == "filter" else 1
            any_rank = partial(self.trainer.strategy.reduce_boolean_decision, all=False)  # ranks take equal rounds
            pad = self.tokenizer.pad_token_id
            rollouts, seen, rounds = dynamic_sample(sample_groups, batch, draw, rounds, pad, any_rank)

        rollouts = score_groups(rollouts, ops, self.update.norm_adv_by_std, p.drop_failed_templated, p.plain_advantage)
        with watch.measure("logprob"):
            rollouts = reprompt(rollouts, self.engine.encode_prompts)
            reference = self.reference if self.loss.kl_coef > 0 else None
            vocab = self.policy.lm.get_output_embeddings().weight.shape[0]  # the fused head's default reads it
            # π_old from the update when it can; every rank alike
            passes = self.ppo.passes(rollouts, r.tis_cap, any_rank, vocab)
            lp = self.ppo.logprob
            rollouts = rollout_logprobs(
                self.policy, reference, rollouts, ops, lp, passes.old_pass, passes.context, stopwatch=watch
            )
            mismatch = None
            if passes.old_pass:  # π_old vs π_rollout, and truncated importance sampling (with tis_cap)
                mismatch, tis = rollout_mismatch(rollouts, r.tis_cap)
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
        metrics.update(p2o_metrics(rollouts, self.loss.context_ratio_bounds))
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
