"""The module's settings in groups: each a typed, frozen dataclass, checked once, in its own ``__post_init__``.

:class:`~p2o_lightning.module.P2OModule` takes one of each, and the config nests them under ``model``::

    model:
      model: embedded
      rollout:  {num_rollouts: 8, temperature: 1.0, max_new_tokens: 40}    # RolloutSettings
      update:   {micro_batch_size: 64, warmup_steps: 5}                      # UpdateSettings
      loss:     {clip_low: 0.2, clip_high: 0.28}                             # p2o_lightning.loss.LossSettings
      compute:  {dtype: bfloat16, backend: auto}                             # ComputeSettings
      p2o:      {plain_rollouts: 2}                                          # P2OSettings
      validation: {num_samples: 8}                                           # ValidationSettings

or on the command line ``--model.loss.clip_high 0.28``. A check that needs two groups (``plain_rollouts`` against
``num_rollouts``, ``kl_rows`` against the KL estimator) is :func:`check_groups`; one that needs the data (the
mini-batch against the batch size, dynamic sampling's extra prompts) runs in the module's ``setup``. A key of the
flat settings before the groups is named with its new place (:data:`MOVED`, :func:`moved_key_error`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from p2o_lightning.fused_head import HEAD_DTYPES
from p2o_lightning.loss import LossSettings
from p2o_lightning.policy import DTYPES
from p2o_lightning.rollout import check_rollout_engine, require_extra
from p2o_lightning.step.dynamic import check_dynamic_sampling
from p2o_lightning.step.score import PLAIN_ADVANTAGES, check_group_size
from p2o_lightning.step.update import KL_ROWS

__all__ = [
    "GROUPS",
    "MOVED",
    "ComputeSettings",
    "P2OSettings",
    "RolloutSettings",
    "UpdateSettings",
    "ValidationSettings",
    "check_groups",
    "group",
    "moved_key_error",
    "plain",
]

BACKENDS = ("auto", "torch", "triton")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class RolloutSettings:
    """Sampling the K rollouts of each prompt, and grading them.

    Args:
        num_rollouts: K, rollouts per prompt (a group; at least 2).
        temperature: sampling temperature of rollouts; log-probs are computed at the same temperature.
        top_p: nucleus sampling of rollouts.
        max_new_tokens: response length limit of rollouts.
        engine: ``loop`` (our own decode loop on the policy, the default) | ``hf`` (transformers generate) |
            ``vllm`` (a colocated ``vllm.LLM``, the optional extra).
        vllm_options: keyword arguments of the vLLM engine (``gpu_memory_utilization``, ``max_model_len``,
            ``kv_cache_memory_bytes``, ``sleep``; see :class:`~p2o_lightning.rollout.vllm.VLLMRolloutEngine`).
        tis_cap: truncated importance sampling: weight each token's policy-gradient term by
            min(π_old / π_rollout, tis_cap), the trainer's over the engine's probability of the sampled token
            (verl / TRL; 2.0 is common with vLLM). None: off; the mismatch is still logged.
        reward_timeout: seconds a reward call may take before it scores 0 and is counted as a timeout.
        dynamic_sampling: ``off`` | ``filter`` (DAPO, verl's ``filter_groups``: groups whose K rewards are all equal
            are dropped and more prompts sampled until the batch is full; :mod:`p2o_lightning.step.dynamic`).
        max_sampling_rounds: sampling rounds per step under ``filter``, the first included; then the batch is
            filled with dropped groups (zero advantage).
    """

    num_rollouts: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    engine: str = "loop"
    vllm_options: dict[str, Any] | None = None
    tis_cap: float | None = None
    reward_timeout: float = 10.0
    dynamic_sampling: str = "off"
    max_sampling_rounds: int = 3

    def __post_init__(self) -> None:
        check_group_size(self.num_rollouts)
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        check_rollout_engine(self.engine)
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap={self.tis_cap} must be > 0 (or None to turn truncated importance sampling off)")
        if self.reward_timeout <= 0:
            raise ValueError(f"reward_timeout={self.reward_timeout} must be > 0 (seconds)")
        check_dynamic_sampling(self.dynamic_sampling, self.max_sampling_rounds)


@dataclass(frozen=True)
class UpdateSettings:
    """The PPO update: passes, mini- and micro-batches, advantages, and the learning rate's schedule.

    Args:
        ppo_epochs: passes over one rollout batch.
        ppo_mini_batch_size: prompts per PPO update (None: the whole batch, one update per pass).
        micro_batch_size: sequences per forward / backward (gradient accumulation inside a mini-batch).
        micro_batch_tokens: with a value, micro-batches by a token budget: rows sorted by length and cut where
            rows × (longest prompt + longest response) would pass it, at most ``micro_batch_size`` rows each
            (None: ``micro_batch_size`` rows in order). Either way each forward runs on its rows' own widths.
        norm_adv_by_std: GRPO's std normalisation of advantages (False: Dr. GRPO's ``r - mean``).
        warmup_steps: linear warm-up, in PPO updates; a value in (0, 1) is a share of all updates.
        lr_schedule: after warm-up: ``constant`` (the paper) or ``cosine`` decay to 0.
        max_grad_norm: clip the global gradient norm to this (0 or None: no clipping).
    """

    ppo_epochs: int = 1
    ppo_mini_batch_size: int | None = None
    micro_batch_size: int = 32
    micro_batch_tokens: int | None = None
    norm_adv_by_std: bool = True
    warmup_steps: float = 0.0
    lr_schedule: str = "constant"
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs={self.ppo_epochs} must be >= 1")
        if self.ppo_mini_batch_size is not None and self.ppo_mini_batch_size < 1:
            raise ValueError(f"ppo_mini_batch_size={self.ppo_mini_batch_size} must be >= 1 (or None: the whole batch)")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens={self.micro_batch_tokens} must be >= 1 (or None: by rows)")
        if not (math.isfinite(self.warmup_steps) and self.warmup_steps >= 0):
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0 (updates, or a share of them below 1)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is unknown; choose one of {LR_SCHEDULES}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 or None: no clipping)")


@dataclass(frozen=True)
class ComputeSettings:
    """How the policy computes: its precision and attention, the ops' implementation and the log-prob pass.

    Args:
        dtype: parameter dtype of policy and reference: ``float32`` | ``bfloat16`` | ``float16``.
        attn_implementation: HF attention kernel (``sdpa``, ``eager``, ``flash_attention_2`` needs the flash extra).
        gradient_checkpointing: recompute activations in backward to save memory.
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
    """

    dtype: str = "float32"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    backend: str = "auto"
    logprob_chunk_size: int = 1024
    fused_head: bool | None = None
    head_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is unknown; choose one of {tuple(DTYPES)}")
        if self.attn_implementation == "flash_attention_2":
            require_extra("flash_attn", "flash", "attn_implementation='flash_attention_2'")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is unknown; choose one of {BACKENDS}")
        if self.logprob_chunk_size < 1:
            raise ValueError(f"logprob_chunk_size={self.logprob_chunk_size} must be >= 1 (tokens)")
        if self.head_dtype not in (None, *HEAD_DTYPES):
            raise ValueError(f"head_dtype={self.head_dtype!r} is unknown; choose None or one of {tuple(HEAD_DTYPES)}")
        if self.head_dtype is not None and self.fused_head is False:
            raise ValueError(
                f"head_dtype={self.head_dtype!r} sets the fused head's matmuls: it needs fused_head True or None (the "
                "log-prob passes of the unfused path compute in float32 on CPU, in the model's dtype on GPU)"
            )


@dataclass(frozen=True)
class P2OSettings:
    """P²O's rollouts and distillation (the prompt search is :class:`~p2o_lightning.callbacks.P2OCallback`'s).

    Args:
        distill: P²O context distillation: rollouts sampled from a templated prompt are trained as responses to
            the original prompt (False: the paper's "no distillation" ablation, trained on the templated prompt).
        plain_rollouts: P²O mixed groups: this many of the K rollouts of a templated prompt are sampled from the
            plain prompt (the reference's ``left_1_no_template_rollout`` is 1), so the group holds the contrast
            that teaches the plain prompt the templated behaviour (see :mod:`p2o_lightning.step.plan`).
        drop_failed_templated: the failed (reward 0) templated rollouts leave the loss (the reference's
            ``drop_failed_template_rollout``); they still count in their group's advantage.
        plain_advantage: the plain rows of a templated group: ``group`` (their group advantage, as the paper) |
            ``nonnegative`` (ours: a failed plain row gets 0 instead of a negative advantage;
            :mod:`p2o_lightning.step.score`).
        opening_tokens: the opening gate (not in the paper; 0: off): the first n response tokens of a distilled row
            stay out of its policy-gradient term until the plain prompt continues the row about as well as its
            template (:mod:`p2o_lightning.step.distill`): it learns the templated skill before it switches to it.
        opening_gate: the gate's threshold γ in (0, 1]: the geometric-mean context ratio π(y|x) / π(y|t(x)) over
            the row's tokens after its opening that opens it.
        kl_rows: which rows the KL term holds: ``all`` | ``plain`` (ours: not the distilled rows, whose templated
            responses the reference would hold back) | ``untemplated`` (ours: only the groups sampled without
            templates). Other than ``all`` it needs ``loss.kl_estimator`` k2 or k3, whose gradient vanishes where
            π = π_old.
    """

    distill: bool = True
    plain_rollouts: int = 0
    drop_failed_templated: bool = False
    plain_advantage: str = "group"
    opening_tokens: int = 0
    opening_gate: float = 0.5
    kl_rows: str = "all"

    def __post_init__(self) -> None:
        if self.plain_rollouts < 0:
            raise ValueError(f"plain_rollouts={self.plain_rollouts} must be >= 0")
        if self.plain_advantage not in PLAIN_ADVANTAGES:
            raise ValueError(f"plain_advantage={self.plain_advantage!r} is unknown; choose one of {PLAIN_ADVANTAGES}")
        if self.opening_tokens < 0:
            raise ValueError(f"opening_tokens={self.opening_tokens} must be >= 0 (0: no opening gate)")
        if not 0 < self.opening_gate <= 1:
            raise ValueError(f"opening_gate={self.opening_gate} must be in (0, 1] (a context ratio)")
        if self.kl_rows not in KL_ROWS:
            raise ValueError(f"kl_rows={self.kl_rows!r} is unknown; choose one of {KL_ROWS}")


@dataclass(frozen=True)
class ValidationSettings:
    """Validation: greedy accuracy on every split, and mean@k of sampled responses.

    Args:
        num_samples: k of the validation mean@k (sampled at ``temperature``; 0 disables it).
        temperature: sampling temperature of mean@k validation.
        max_new_tokens: response length limit in validation (None: ``rollout.max_new_tokens``).
    """

    num_samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ValueError(f"num_samples={self.num_samples} must be >= 0 (0: no mean@k)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1 (or None: the rollouts')")


def check_groups(rollout: RolloutSettings, loss: LossSettings, p2o: P2OSettings) -> None:
    """The checks that read two groups."""
    if p2o.plain_rollouts > rollout.num_rollouts:
        raise ValueError(
            f"p2o.plain_rollouts={p2o.plain_rollouts} must be in [0, rollout.num_rollouts={rollout.num_rollouts}]"
        )
    if p2o.kl_rows != "all" and loss.kl_estimator == "k1":
        raise ValueError(f"kl_rows={p2o.kl_rows!r} needs kl_estimator k2 or k3: k1's gradient is 1 on every token")


GroupT = TypeVar("GroupT")


def plain(settings) -> dict[str, Any]:
    """A group's fields as plain data (a tuple as a list): what ``hparams.yaml`` and a checkpoint keep."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


def group(cls: type[GroupT], value: GroupT | Mapping[str, Any] | None, name: str) -> GroupT:
    """``value`` as a ``cls``: itself, its defaults (None), or built from a mapping of its fields (a checkpoint's
    hyperparameters, a test's shorthand), whose unknown keys are an error naming the group.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(
                f"model.{name} has no setting {', '.join(unknown)}; its settings: {', '.join(sorted(fields))}"
            )
        return cls(**value)
    raise TypeError(f"model.{name} must be a {cls.__name__} or a mapping of its fields, got {type(value).__name__}")


GROUPS = {
    "rollout": RolloutSettings,
    "update": UpdateSettings,
    "loss": LossSettings,
    "compute": ComputeSettings,
    "p2o": P2OSettings,
    "validation": ValidationSettings,
}
# the flat settings of P2OModule before the groups (issue 28) -> their place now, under model.
MOVED = {
    **{key: f"rollout.{key}" for key in ("num_rollouts", "temperature", "top_p", "max_new_tokens", "vllm_options")},
    **{key: f"rollout.{key}" for key in ("tis_cap", "reward_timeout", "dynamic_sampling", "max_sampling_rounds")},
    "rollout_engine": "rollout.engine",
    **{key: f"update.{key}" for key in ("ppo_epochs", "ppo_mini_batch_size", "micro_batch_size", "micro_batch_tokens")},
    **{key: f"update.{key}" for key in ("norm_adv_by_std", "warmup_steps", "lr_schedule", "max_grad_norm")},
    **{key: f"loss.{key}" for key in ("clip_low", "clip_high", "clip_ratio_c", "loss_agg", "kl_coef", "kl_estimator")},
    **{key: f"loss.{key}" for key in ("context_ratio_bounds", "context_mask_scope", "anchor_weight")},
    **{key: f"compute.{key}" for key in ("dtype", "attn_implementation", "gradient_checkpointing", "backend")},
    **{key: f"compute.{key}" for key in ("logprob_chunk_size", "fused_head", "head_dtype")},
    **{key: f"p2o.{key}" for key in ("distill", "plain_rollouts", "drop_failed_templated", "plain_advantage")},
    **{key: f"p2o.{key}" for key in ("opening_tokens", "opening_gate", "kl_rows")},
    **{f"val_{key}": f"validation.{key}" for key in ("num_samples", "temperature", "max_new_tokens")},
}


def moved_key_error(key: str) -> str | None:
    """The error for ``model.<key>`` when it is a flat setting of before the groups, naming its new place."""
    new = MOVED.get(key)
    return None if new is None else f"model.{key} moved to model.{new}"
