"""Rollout engines: K sampled responses per prompt, behind one small interface.

GRPO needs, for every prompt, K responses as token ids (to score their log-probs later), as text (to grade them)
and, for on-policy hygiene, the log-prob the engine sampled each token with (π_rollout in verl's terms, against
which the trainer's own recomputation π_old is compared and, with truncated importance sampling, reweighted).
``RolloutEngine.generate(prompts, sampling)`` returns all three, grouped: the K rollouts of prompt ``i`` are rows
``i*K .. i*K+K-1``. Prompts come back left-padded to a common length P and responses right-padded to R, so
``cat([prompt_ids, response_ids], 1)`` is a batch whose response tokens all start at column P.

Engines, all :class:`~p2o_lightning.rollout.base.RolloutEngine` s (the prompt encoder and stop tokens they share):
:class:`~p2o_lightning.rollout.loop.LoopRolloutEngine` (our own decode loop over the policy's HF model: one
prefill per prompt, a preallocated KV cache, finished rows dropped) and
:class:`~p2o_lightning.rollout.hf.HFRolloutEngine` (``transformers``' ``generate``), both
:class:`~p2o_lightning.rollout.base.PolicyEngine` s on any device that share the policy's weights, and
:class:`~p2o_lightning.rollout.vllm.VLLMRolloutEngine` (a colocated ``vllm.LLM`` whose weights
are synced from the policy after each PPO update; the optional extra ``vllm``, imported lazily). All sample from a
fresh generation config: only temperature, top-p and the stop tokens shape sampling, never a checkpoint's
``generation_config.json`` defaults (repetition penalty, min-p, top-k ...), which would make rollouts silently
off-policy.
"""

from p2o_lightning.rollout.base import (
    ROLLOUT_ENGINES,
    PolicyEngine,
    PromptEncoder,
    RolloutEngine,
    Rollouts,
    SamplingParams,
    check_rollout_engine,
    eos_token_ids,
    require_extra,
    response_mask_from_eos,
)
from p2o_lightning.rollout.hf import HFRolloutEngine
from p2o_lightning.rollout.loop import LoopRolloutEngine

__all__ = [
    "ROLLOUT_ENGINES",
    "HFRolloutEngine",
    "LoopRolloutEngine",
    "PolicyEngine",
    "PromptEncoder",
    "RolloutEngine",
    "Rollouts",
    "SamplingParams",
    "check_rollout_engine",
    "eos_token_ids",
    "require_extra",
    "response_mask_from_eos",
]
