"""``P2OModule``: GRPO with PPO-clip on verifiable rewards, as a LightningModule.

One ``training_step`` is one RL iteration, the shape TRL's ``GRPOTrainer`` and verl's ``ray_trainer`` share:

1. **Rollouts.** K responses per prompt from the rollout engine (HF ``generate`` or a colocated vLLM synced after
   each PPO update; a fresh generation config: temperature, top-p, EOS), with each token's sampling log-prob.
2. **Rewards.** ``task.score`` per response, in worker threads with a timeout (:mod:`p2o_lightning.rewards`).
3. **Advantages.** Group-normalised rewards, GRPO ``(r - mean) / (std + eps)`` or Dr. GRPO's ``r - mean``.
4. **Old / reference log-probs** once, under no grad (the reference only when ``kl_coef > 0``).
5. **PPO updates.** ``ppo_epochs`` passes over the rollouts in mini-batches of prompts, each split into
   micro-batches for gradient accumulation; PPO-clip with separate low / high clip, KL to the reference with the
   k1 / k2 / k3 estimators, gradient clipping, warm-up. Manual optimisation: one optimizer step per mini-batch,
   so Lightning's ``global_step`` counts PPO updates (``train/rollout_step`` counts RL iterations).

Log-probs come from hidden states and the LM head through :func:`p2o_lightning.ops.get_ops`, chunked over tokens,
never as a tokens × vocab tensor. The module never imports triton: ``backend`` chooses.

P²O hooks in through two seams, both inert without the P²O callback: ``rollout_prompts`` (the K generation
prompts of each prompt, templated for hard samples) and the per-step ``outputs`` (prompts, answers and rewards
that the callback collects hard samples from).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from p2o_lightning.metrics import CollapseRate
from p2o_lightning.ops import CONTEXT_MASK_SCOPES, context_ratio_mask, get_ops, tis_weights
from p2o_lightning.rewards import SafeGrader
from p2o_lightning.rollout import (
    HFRolloutEngine,
    RolloutEngine,
    Rollouts,
    SamplingParams,
    check_rollout_engine,
    require_extra,
)
from p2o_lightning.step.plan import RolloutPlan, plan_rollouts, rows_in_loss
from p2o_lightning.tasks import get_task

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """The checkpoint folder of ``model``, or an error naming it.

    ``"embedded"`` builds (or reuses) the embedded world; any other value must be a local HF model folder.
    """
    if path == "embedded":
        from p2o_lightning.tasks.world import build_world

        return str(build_world())
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model={path!r}: no such file or folder (models load from local paths only)")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ValueError(f"model={path!r} is not a HF model folder: it has no config.json (save_pretrained layout)")
    return str(folder)


def load_causal_lm(path: str, dtype: str = "float32", attn_implementation: str | None = None):
    """Load (model, tokenizer) from a local path; ``"embedded"`` builds (or reuses) the embedded world first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(path)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class PolicyLogProb(nn.Module):
    """Per-token log-prob (and entropy) of response tokens, from the decoder's hidden states and the LM head.

    One module whose ``forward`` does the whole computation, so that DDP and FSDP2 (which gather parameters in a
    module's forward hooks) see the LM head used inside a forward.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        head = lm.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("the LM head has a bias; the fused log-prob assumes logits = hidden @ weight.T")

    def forward(
        self,
        input_ids: Tensor,  # [M, P + R] prompt (left-padded) then response (right-padded)
        attention_mask: Tensor,  # [M, P + R]
        targets: Tensor,  # [M, R] response ids, ignore_index where masked
        ops: Any,
        temperature: float = 1.0,
        return_entropy: bool = False,
        chunk_size: int = 1024,
    ) -> tuple[Tensor, Tensor | None]:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        hidden = self.lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # [M, P + R, H]
        response_len = targets.shape[1]
        hidden = hidden[:, -response_len - 1 : -1]  # [M, R, H]: the positions that predict the response tokens
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        return ops.linear_logprob(
            hidden, weight, targets, temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size
        )


class P2OModule(L.LightningModule):
    """GRPO policy optimisation on verifiable rewards, with seams for P²O's prompt evolution and distillation.

    Args:
        model: local path of a HF causal LM (``save_pretrained`` layout), or ``embedded`` for the embedded world.
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
        clip_low: PPO ratio clip below (1 - clip_low).
        clip_high: PPO ratio clip above (1 + clip_high); > clip_low is DAPO's clip-higher.
        clip_ratio_c: dual-clip bound for negative advantages (None: off).
        loss_agg: ``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum``.
        norm_adv_by_std: GRPO's std normalisation of advantages (False: Dr. GRPO's ``r - mean``).
        kl_coef: weight of the KL-to-reference term in the loss (0, the paper's setting, skips the reference).
        kl_estimator: ``k1`` | ``k2`` | ``k3``.
        backend: op implementation: ``auto`` (Triton on CUDA when available, else torch) | ``torch`` | ``triton``.
        logprob_chunk_size: tokens per chunk of the log-prob op (bounds the live logits to chunk × vocab).
        reward_timeout: seconds a reward call may take before it scores 0 and is counted as a timeout.
        val_num_samples: k of the validation mean@k (sampled at ``val_temperature``; 0 disables it).
        val_temperature: sampling temperature of mean@k validation.
        val_max_new_tokens: response length limit in validation (None: ``max_new_tokens``).
        dtype: parameter dtype of policy and reference: ``float32`` | ``bfloat16`` | ``float16``.
        attn_implementation: HF attention kernel (``sdpa``, ``eager``, ``flash_attention_2`` needs the flash extra).
        gradient_checkpointing: recompute activations in backward to save memory.
        rollout_engine: ``hf`` (transformers generate) | ``vllm`` (a colocated ``vllm.LLM``, the optional extra).
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
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        clip_ratio_c: float | None = None,
        loss_agg: str = "token-mean",
        norm_adv_by_std: bool = True,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        backend: str = "auto",
        logprob_chunk_size: int = 1024,
        reward_timeout: float = 10.0,
        val_num_samples: int = 4,
        val_temperature: float = 1.0,
        val_max_new_tokens: int | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        rollout_engine: str = "hf",
        vllm_options: dict[str, Any] | None = None,
        tis_cap: float | None = None,
        seed: int = 0,
        distill: bool = True,
        context_ratio_bounds: tuple[float, float] | None = (0.01, 10.0),
        context_mask_scope: str = "policy_gradient",
        plain_rollouts: int = 0,
        drop_failed_templated: bool = False,
    ) -> None:
        super().__init__()
        # Everything a config can get wrong is checked here, before a model is loaded or a rollout sampled.
        if loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg={loss_agg!r} is unknown; choose one of {LOSS_AGGS}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={kl_estimator!r} is unknown; choose one of {KL_ESTIMATORS}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is unknown; choose one of {tuple(DTYPES)}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule={lr_schedule!r} is unknown; choose 'constant' or 'cosine'")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend={backend!r} is unknown; choose 'auto', 'torch' or 'triton'")
        if num_rollouts < 2:
            raise ValueError(
                f"num_rollouts={num_rollouts}: GRPO needs at least 2 rollouts per prompt (a group's advantage is each"
                " reward minus the group's mean, always 0 for a group of one)"
            )
        if ppo_epochs < 1 or micro_batch_size < 1 or max_new_tokens < 1:
            raise ValueError("ppo_epochs, micro_batch_size and max_new_tokens must all be >= 1")
        if ppo_mini_batch_size is not None and ppo_mini_batch_size < 1:
            raise ValueError(f"ppo_mini_batch_size={ppo_mini_batch_size} must be >= 1 (or None: the whole batch)")
        if context_ratio_bounds is not None and not 0 < context_ratio_bounds[0] <= 1 <= context_ratio_bounds[1]:
            raise ValueError(f"context_ratio_bounds={context_ratio_bounds} must satisfy 0 < low <= 1 <= high")
        if context_mask_scope not in CONTEXT_MASK_SCOPES:
            raise ValueError(
                f"context_mask_scope={context_mask_scope!r} is unknown; choose one of {CONTEXT_MASK_SCOPES}"
            )
        if not 0 <= plain_rollouts <= num_rollouts:
            raise ValueError(f"plain_rollouts={plain_rollouts} must be in [0, num_rollouts={num_rollouts}]")
        if attn_implementation == "flash_attention_2":
            require_extra("flash_attn", "flash", "attn_implementation='flash_attention_2'")
        check_rollout_engine(rollout_engine)
        if tis_cap is not None and tis_cap <= 0:
            raise ValueError(f"tis_cap={tis_cap} must be > 0 (or None to turn truncated importance sampling off)")
        get_task(task)
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.automatic_optimization = False

        self.task = get_task(task)
        self.grader = SafeGrader(self.task, timeout=reward_timeout)
        self.policy: PolicyLogProb | None = None  # loaded in configure_model, after the data is checked
        self._reference: list[PolicyLogProb] = []  # held outside the module tree: frozen, never checkpointed
        self.tokenizer = None
        self.engine: RolloutEngine | None = None
        self.collapse = CollapseRate()
        self.rollout_steps = 0  # RL iterations done (checkpointed)
        # P²O: prompt text -> the K templates its rollouts are sampled with (set by P2OCallback, keyed by content)
        self.template_assignments: dict[str, list[str]] = {}
        self.val_metrics = nn.ModuleDict()

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        lm, self.tokenizer = load_causal_lm(hp.model, hp.dtype, hp.attn_implementation)
        if hp.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.config.use_cache = False
        self.policy = PolicyLogProb(lm.train())  # from_pretrained returns eval mode
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2, one unit per decoder layer + the rest
            self._fully_shard(self.policy)
        ref_lm, _ = load_causal_lm(hp.model, hp.dtype, hp.attn_implementation)
        self._reference = [PolicyLogProb(ref_lm).eval().requires_grad_(False).to(self.device)]
        if hp.rollout_engine == "vllm":
            from p2o_lightning.rollout.vllm import VLLMRolloutEngine

            if type(getattr(self._trainer, "strategy", None)).__name__ == "FSDPStrategy":
                raise ValueError(
                    "rollout_engine='vllm' syncs full tensors from FSDP2 (ModelParallelStrategy) or unsharded "
                    "policies; FSDPStrategy (FSDP1) shards flat parameters it cannot hand over: use "
                    "lightning.pytorch.strategies.ModelParallelStrategy"
                )

            options = dict(dtype=hp.dtype, seed=hp.seed, **(hp.vllm_options or {}))
            self.engine = VLLMRolloutEngine(resolve_model_path(hp.model), self.tokenizer, **options)
        else:
            self.engine = HFRolloutEngine(lm, self.tokenizer)

    def _fully_shard(self, policy: PolicyLogProb) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"] if "data_parallel" in self.device_mesh.mesh_dim_names else None
        layers = getattr(policy.lm.get_decoder(), "layers", None)
        if layers is None:
            raise ValueError("FSDP2 sharding expects the decoder's blocks at `.layers` (Llama / Qwen layout)")
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(policy, mesh=mesh)

    @property
    def _sharded(self) -> bool:
        return hasattr(self.policy, "unshard")

    @property
    def reference(self) -> PolicyLogProb:
        """The frozen reference model (initial weights): eval mode, no grad, outside the optimizer."""
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
        batch, mini = getattr(dm, "batch_size", None), self.hparams.ppo_mini_batch_size
        if stage == "fit" and batch and mini and batch % mini:
            raise ValueError(
                f"model.ppo_mini_batch_size={mini} does not divide data.batch_size={batch}: every PPO update must"
                f" see the same number of prompts (choose a divisor of {batch})"
            )
        names = getattr(dm, "val_split_names", None) or []
        for name in names:
            for kind in ("greedy", "mean_at_k"):
                key = f"{name}_{kind}"
                if key not in self.val_metrics:
                    self.val_metrics[key] = MeanMetric()

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        total = self._total_updates()
        warmup = self.hparams.warmup_steps
        warmup = int(warmup * total) if 0 < warmup < 1 else int(warmup)
        cosine = self.hparams.lr_schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine or total <= warmup:
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _updates_per_batch(self) -> int:
        dm = getattr(self.trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", None) or 1
        mini = self.hparams.ppo_mini_batch_size or batch
        return self.hparams.ppo_epochs * math.ceil(batch / mini)

    def _total_updates(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps  # manual optimisation: max_steps counts optimizer steps
        return max(1, int(self.trainer.estimated_stepping_batches) * self._updates_per_batch())

    # ------------------------------------------------------------------ rollouts
    def plan(self, prompts: list[str]) -> RolloutPlan:
        """The step's rollout plan: which prompt each of the B·K rows is sampled under and trained under."""
        hp = self.hparams
        return plan_rollouts(prompts, self.template_assignments, hp.num_rollouts, hp.plain_rollouts, hp.distill)

    def sample(self, prompts: list[str], answers: list[str], sampling: SamplingParams):
        """Rollouts of ``prompts`` and their rewards, [len(prompts) * n]."""
        gather = self._sharded and isinstance(self.engine, HFRolloutEngine)
        if gather:  # FSDP2: generate() runs outside the wrapper's forward, so gather its parameters first
            # the root must initialise before any layer runs, or that layer takes itself for the root
            self.policy._get_fsdp_state()._lazy_init()
            self.policy.unshard()
        try:
            rollouts = self.engine.generate(prompts, sampling)
        finally:
            if gather:
                self.policy.reshard()
        grade = self.grader.grade(rollouts.texts, [a for a in answers for _ in range(sampling.n)])
        return rollouts, grade

    def sequence_logprobs(
        self, model: PolicyLogProb, rollouts: Rollouts, return_entropy: bool = False, grad: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probs [M, R] (and entropy) of all rollouts' response tokens, in micro-batches."""
        hp = self.hparams
        ops = self.ops
        targets = rollouts.response_ids.masked_fill(rollouts.response_mask == 0, -100)
        logps, ents = [], []
        with torch.set_grad_enabled(grad):
            for rows in torch.arange(len(rollouts.texts)).split(hp.micro_batch_size):
                logp, ent = model(
                    rollouts.input_ids[rows],
                    rollouts.attention_mask[rows],
                    targets[rows],
                    ops,
                    temperature=self._logprob_temperature,
                    return_entropy=return_entropy,
                    chunk_size=hp.logprob_chunk_size,
                )
                logps.append(logp)
                ents.append(ent)
        return torch.cat(logps), (torch.cat(ents) if return_entropy else None)

    @property
    def _logprob_temperature(self) -> float:
        return self.hparams.temperature if self.hparams.temperature > 0 else 1.0

    # ------------------------------------------------------------------ training
    def training_step(self, batch: list[dict], batch_idx: int) -> dict[str, Any]:
        hp = self.hparams
        prompts = [row["prompt"] for row in batch]
        answers = [row["answer"] for row in batch]
        B, K = len(prompts), hp.num_rollouts

        t0 = time.perf_counter()
        sampling = SamplingParams(K, hp.temperature, hp.top_p, hp.max_new_tokens)
        plan = self.plan(prompts)
        if not plan.any_templated:
            rollouts, grade = self.sample(prompts, answers, sampling)
        else:
            rollouts, grade = self.sample(plan.sample_prompts, [a for a in answers for _ in range(K)], _one(sampling))
        t_rollout = time.perf_counter() - t0

        rewards = torch.tensor(grade.rewards, dtype=torch.float32, device=self.device).view(B, K)
        ops = self.ops
        advantages = ops.group_advantage(rewards, norm_by_std=hp.norm_adv_by_std).view(B * K)  # [B*K]
        mask = rollouts.response_mask.float()  # [B*K, R]
        in_loss = torch.tensor(rows_in_loss(plan, grade.rewards, hp.drop_failed_templated), device=self.device)
        loss_mask = mask * in_loss.float()[:, None]  # [B*K, R]: the tokens the loss is taken over

        t0 = time.perf_counter()
        context_logp = None
        if any(plan.distilled_rows):
            # Context distillation: score the responses as answers to the original prompt x; keep log π(y|t(x))
            # of the prompts they were sampled from for the context ratio mask (rows sampled from x get ρ = 1).
            if hp.context_ratio_bounds is not None:
                context_logp = self.sequence_logprobs(self.policy, rollouts)[0]  # [B*K, R] on the sampled prompts
            sampled, rollouts = rollouts, self.with_prompts(rollouts, plan.train_prompts)
        old_logp, entropy = self.sequence_logprobs(self.policy, rollouts, return_entropy=True)
        ref_logp = self.sequence_logprobs(self.reference, rollouts)[0] if hp.kl_coef > 0 else None
        # On-policy hygiene: the trainer's π_old of each token under the prompt it was sampled from, against the
        # engine's π_rollout; logged, and with tis_cap the PPO term of each token is weighted by their capped ratio.
        behaviour_logp = old_logp
        if any(plan.distilled_rows):
            behaviour_logp = context_logp
            if behaviour_logp is None:
                behaviour_logp = self.sequence_logprobs(self.policy, sampled)[0]  # [B*K, R] on the sampled prompts
        onpolicy, tis = _rollout_mismatch(behaviour_logp, rollouts.sampling_logp, mask, hp.tis_cap)
        if tis is not None:
            advantages = advantages[:, None] * tis  # [B*K, R]: w·pg equals pg with w·A, as w > 0
        t_logprob = time.perf_counter() - t0

        t0 = time.perf_counter()
        stats = self._ppo_update(rollouts, old_logp, ref_logp, context_logp, advantages, loss_mask, B, K)
        self.engine.sync_weights(self.policy.lm)  # the next rollouts sample from the updated policy
        t_update = time.perf_counter() - t0
        self.rollout_steps += 1
        stats.update(onpolicy)

        self._log_train(rewards, rollouts, mask, entropy, grade, stats, t_rollout, t_logprob, t_update)
        self._log_p2o(plan, rewards, rollouts, mask, old_logp, context_logp)
        return {
            "prompts": prompts,
            "answers": answers,
            "rewards": rewards.detach().cpu(),  # [B, K]
            "templated": list(plan.templated_groups),  # [B]
            "plain_rows": ~torch.tensor(plan.templated_rows).view(B, K),  # [B, K] sampled from the plain prompt
        }

    def with_prompts(self, rollouts: Rollouts, prompts: list[str]) -> Rollouts:
        """The same responses behind other prompts (one per row), left-padded anew."""
        return rollouts.with_prompt_ids(*self.engine.encode_prompts(prompts, self.device))

    def _ppo_update(
        self, rollouts, old_logp, ref_logp, context_logp, advantages, mask, B: int, K: int
    ) -> dict[str, float]:
        hp = self.hparams
        opt = self.optimizers()
        sched = self.lr_schedulers()
        ops = self.ops
        mini = hp.ppo_mini_batch_size or B
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(hp.ppo_epochs):
            groups = torch.randperm(B)  # shuffle whole groups; the K rollouts of a prompt stay together
            for group_ids in groups.split(mini):
                rows = (group_ids[:, None] * K + torch.arange(K)).flatten().to(self.device)  # [mini*K]
                kept = mask[rows]  # [mini*K, R] the tokens a token-mean divides by
                if context_logp is not None and hp.context_mask_scope == "tokens":  # cut tokens leave the mean
                    kept = kept * ops.context_ratio_mask(old_logp[rows], context_logp[rows], *hp.context_ratio_bounds)
                num_tokens = kept.sum().clamp(min=1)
                opt.zero_grad()
                for micro in rows.split(hp.micro_batch_size):
                    sub = rollouts.select(micro)
                    targets = sub.response_ids.masked_fill(sub.response_mask == 0, -100)
                    logp, _ = self.policy(
                        sub.input_ids,
                        sub.attention_mask,
                        targets,
                        ops,
                        temperature=self._logprob_temperature,
                        chunk_size=hp.logprob_chunk_size,
                    )
                    loss, stats = ops.policy_loss(
                        logp,
                        old_logp[micro],
                        advantages[micro],
                        mask[micro],
                        ref_logp=None if ref_logp is None else ref_logp[micro],
                        clip_low=hp.clip_low,
                        clip_high=hp.clip_high,
                        clip_ratio_c=hp.clip_ratio_c,
                        kl_coef=hp.kl_coef,
                        kl_estimator=hp.kl_estimator,
                        loss_agg=hp.loss_agg,
                        num_tokens=num_tokens,
                        num_seqs=len(rows),
                        context_logp=None if context_logp is None else context_logp[micro],
                        context_ratio_bounds=hp.context_ratio_bounds or (0.01, 10.0),
                        context_mask_scope=hp.context_mask_scope,
                    )
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite loss ({loss.item()}) at global step {self.global_step} (rollout step "
                            f"{self.rollout_steps}); stopping before the optimizer step, no checkpoint is written"
                        )
                    self.manual_backward(loss)
                    _accumulate_stats(sums, stats, loss, share=float(mask[micro].sum() / mask[rows].sum().clamp(min=1)))
                grad_norm = self._clip_grad_norm()
                if not math.isfinite(grad_norm):
                    raise FloatingPointError(
                        f"non-finite gradient norm ({grad_norm}) at global step {self.global_step} (rollout step "
                        f"{self.rollout_steps}); stopping before the optimizer step, no checkpoint is written"
                    )
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
                opt.step()
                sched.step()
                n_updates += 1
        return {k: v if k in ("ratio_min", "ratio_max") else v / n_updates for k, v in sums.items()}

    def _clip_grad_norm(self) -> float:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.hparams.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _log_train(self, rewards, rollouts, mask, entropy, grade, stats, t_rollout, t_logprob, t_update) -> None:
        self.collapse.update(rewards)
        collapse = {k: v.item() for k, v in self.collapse.compute().items()}
        self.collapse.reset()
        lengths = mask.sum(dim=1)
        n_tokens = mask.sum().clamp(min=1)
        metrics = {
            "train/reward": rewards.mean(),
            "train/accuracy": (rewards >= 1.0).float().mean(),
            "train/entropy": (entropy * mask).sum() / n_tokens,
            "train/response_length": lengths.mean(),
            "train/response_length_max": lengths.max(),
            "train/truncated": rollouts.truncated.float().mean(),
            "train/reward_errors": float(grade.errors),
            "train/reward_timeouts": float(grade.timeouts),
            "train/lr": self.optimizers().param_groups[0]["lr"],
            "train/rollout_step": float(self.rollout_steps),
            "time/rollout_s": t_rollout,
            "time/logprob_s": t_logprob,
            "time/update_s": t_update,
            "time/rollout_tokens_per_s": float(mask.sum()) / max(t_rollout, 1e-9),
        }
        metrics.update({f"train/{k}": v for k, v in stats.items()})
        reduce_max = {"train/response_length_max", "train/ratio_max"}
        for key, value in metrics.items():
            self.log(key, value, on_step=True, sync_dist=True, reduce_fx="max" if key in reduce_max else "mean")
        for key, value in collapse.items():  # already reduced over ranks by the metric
            self.log(f"train/{key}", value, on_step=True, prog_bar=key == "collapse_rate")
        self.log("reward", rewards.mean(), on_step=True, prog_bar=True, logger=False, sync_dist=True)

    def _log_p2o(self, plan: RolloutPlan, rewards, rollouts, mask, old_logp, context_logp) -> None:
        """P²O's diagnostics, every step under ``p2o/``; all zero while no prompt holds templates.

        - ``templated_share``: share of the batch's prompts that hold templates; ``rescued_groups``: how many of
          them have a non-zero advantage (a gradient GRPO would not have had);
        - ``templated_success`` / ``plain_in_templated_success``: reward of the templated rows, and of the rows of
          templated groups sampled from the plain prompt (mixed groups: a direct view of the transfer);
        - ``ctx_masked_first4`` / ``ctx_masked_rest``: share of distilled rows' response tokens the context ratio
          mask cuts among the first 4 response tokens, and among the rest (the opening is where a template bites);
        - ``shared_first_token``: share of templated rows whose first response token is the first token of every
          rollout of their group (such an opening gets no net gradient: the group's advantages sum to zero).
        """
        K = self.hparams.num_rollouts
        zero = torch.zeros((), device=self.device)
        groups = torch.tensor(plan.templated_groups, device=self.device)  # [B]
        rows = torch.tensor(plan.templated_rows, device=self.device)  # [B*K]
        in_group = groups.repeat_interleave(K)  # [B*K]
        flat = rewards.view(-1)
        plain_in_group = in_group & ~rows
        rescued = groups & (rewards != rewards[:, :1]).any(dim=1)
        metrics = {
            "p2o/templated_share": groups.float().mean(),
            "p2o/templated_success": flat[rows].mean() if rows.any() else zero,
            "p2o/plain_in_templated_success": flat[plain_in_group].mean() if plain_in_group.any() else zero,
            "p2o/rescued_groups": rescued.float().sum(),
            "train/reward_plain": rewards[~groups].mean() if (~groups).any() else zero,
        }
        first4, rest = zero, zero
        distilled = torch.tensor(plan.distilled_rows, device=self.device)  # [B*K]
        if context_logp is not None and distilled.any():
            bounds = self.hparams.context_ratio_bounds
            cut = (~context_ratio_mask(old_logp, context_logp, *bounds)).float() * mask  # [B*K, R]
            cut, resp = cut[distilled], mask[distilled]
            first4 = cut[:, :4].sum() / resp[:, :4].sum().clamp(min=1)
            rest = cut[:, 4:].sum() / resp[:, 4:].sum().clamp(min=1)
        metrics["p2o/ctx_masked_first4"] = first4
        metrics["p2o/ctx_masked_rest"] = rest
        first = rollouts.response_ids[:, 0].view(-1, K)  # [B, K]
        same = (first == first[:, :1]).all(dim=1).repeat_interleave(K)  # [B*K]: the group opens with one token
        metrics["p2o/shared_first_token"] = (same & rows).float().sum() / rows.sum() if rows.any() else zero
        for key, value in metrics.items():
            self.log(
                key, value, on_step=True, sync_dist=True, reduce_fx="sum" if key == "p2o/rescued_groups" else "mean"
            )

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: list[dict], prefix: str) -> None:
        hp = self.hparams
        prompts = [row["prompt"] for row in batch]
        answers = [row["answer"] for row in batch]
        max_new = hp.val_max_new_tokens or hp.max_new_tokens
        # Validation sampling draws from its own seeded stream, so evaluating never shifts the training RNG.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(hp.seed * 7919 + self.global_step * 31 + batch[0]["index"])
            _, grade = self.sample(prompts, answers, SamplingParams(1, 0.0, 1.0, max_new))
            self._update_val_metrics(prefix, batch, "greedy", torch.tensor(grade.rewards, device=self.device))
            if hp.val_num_samples > 0:
                n = hp.val_num_samples
                _, grade = self.sample(prompts, answers, SamplingParams(n, hp.val_temperature, hp.top_p, max_new))
                rewards = torch.tensor(grade.rewards, device=self.device).view(len(prompts), n).mean(dim=1)
                self._update_val_metrics(prefix, batch, "mean_at_k", rewards)

    def _update_val_metrics(self, prefix: str, batch: list[dict], kind: str, values: Tensor) -> None:
        """Update the split's metric with ``values`` [len(batch)], and each subset's with its rows."""
        self._update_val_metric(prefix, batch[0]["split"], kind, values)
        for subset in sorted({row["subset"] for row in batch if row.get("subset")}):
            rows = torch.tensor([row.get("subset") == subset for row in batch], device=self.device)
            self._update_val_metric(prefix, subset, kind, values[rows])

    def _val_name(self, prefix: str, key: str) -> str:
        if key.endswith("_greedy"):
            return f"{prefix}/{key[: -len('_greedy')]}/greedy_acc"
        return f"{prefix}/{key[: -len('_mean_at_k')]}/mean@{self.hparams.val_num_samples}"

    def _update_val_metric(self, prefix: str, split: str, kind: str, values: Tensor) -> None:
        key = f"{split}_{kind}"
        metric = self.val_metrics[key]
        metric.update(values)
        self.log(self._val_name(prefix, key), metric, on_epoch=True, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        # Lightning keeps no logs of the sanity check; log it as the step-0 point of the learning curves.
        if not self.trainer.sanity_checking:
            return
        values = {self._val_name("val", k): m.compute() for k, m in self.val_metrics.items() if m.update_called}
        for logger in self.loggers:
            logger.log_metrics({k: float(v) for k, v in values.items()}, step=self.global_step)

    def validation_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["p2o_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": _numpy_state_to_torch(np.random.get_state()),
        }
        checkpoint["p2o_rollout_steps"] = self.rollout_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollout_steps = checkpoint.get("p2o_rollout_steps", 0)
        rng = checkpoint.get("p2o_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            random.setstate(rng["python"])
            name, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))

    def on_train_start(self) -> None:
        self.engine.sync_weights(self.policy.lm)  # a resumed policy is not the checkpoint the engine was built from

    def on_fit_end(self) -> None:
        self.grader.close()


def _accumulate_stats(sums: dict[str, float], stats: dict[str, Tensor], loss: Tensor, share: float) -> None:
    """Fold one micro-batch's loss stats into the mini-batch's running sums.

    ``loss`` and ``pg_loss`` are already normalised by the whole mini-batch (``num_tokens`` / ``num_seqs``), so
    they add up; the per-token means (kl, clip fraction, ratio mean, ...) are weighted by the micro-batch's share
    of the mini-batch's tokens; the ratio's extremes take min / max.
    """
    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
    for key, value in stats.items():
        value = float(value)
        if key == "pg_loss":
            sums[key] = sums.get(key, 0.0) + value
        elif key == "ratio_min":
            sums[key] = min(sums.get(key, value), value)
        elif key == "ratio_max":
            sums[key] = max(sums.get(key, value), value)
        else:
            sums[key] = sums.get(key, 0.0) + value * share


def _rollout_mismatch(
    trainer_logp: Tensor, sampling_logp: Tensor | None, mask: Tensor, tis_cap: float | None
) -> tuple[dict[str, float], Tensor | None]:
    """Stats of π_old vs π_rollout over the response tokens, and the TIS weights [M, R] when ``tis_cap`` is set."""
    if sampling_logp is None:
        if tis_cap is not None:
            raise ValueError("tis_cap is set but the rollout engine returned no sampling log-probs")
        return {}, None
    n = mask.sum().clamp(min=1)
    stats = {"rollout_logprob_diff": float(((trainer_logp - sampling_logp).abs() * mask).sum() / n)}
    if tis_cap is None:
        return stats, None
    tis = tis_weights(trainer_logp, sampling_logp, tis_cap)  # [M, R]
    stats["tis_weight_mean"] = float((tis * mask).sum() / n)
    stats["tis_capped_frac"] = float(((trainer_logp - sampling_logp > math.log(tis_cap)) * mask).sum() / n)
    return stats, tis


def _numpy_state_to_torch(state: tuple) -> tuple:
    """Numpy's RNG state with its key array as a tensor, so checkpoints load with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def _one(sampling: SamplingParams) -> SamplingParams:
    return SamplingParams(1, sampling.temperature, sampling.top_p, sampling.max_new_tokens)
