"""The module's own settings checks: every value a config can get wrong fails here, before a model is loaded.

The stages check their own settings where they are built (:class:`~p2o_lightning.loss.LossSettings`,
:class:`~p2o_lightning.step.update.PPOSettings`); these are the rest, with messages that name the key.
"""

from __future__ import annotations

from p2o_lightning.policy import DTYPES
from p2o_lightning.rollout import check_rollout_engine, require_extra
from p2o_lightning.step.dynamic import check_dynamic_sampling
from p2o_lightning.step.score import PLAIN_ADVANTAGES, check_group_size


def check_settings(
    dtype: str,
    lr_schedule: str,
    backend: str,
    num_rollouts: int,
    micro_batch_size: int,
    max_new_tokens: int,
    dynamic_sampling: str,
    max_sampling_rounds: int,
    plain_rollouts: int,
    attn_implementation: str | None,
    rollout_engine: str,
    tis_cap: float | None,
    plain_advantage: str = "group",
) -> None:
    """Raise a ValueError (ImportError for a missing extra) naming the first setting that is wrong."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; choose one of {tuple(DTYPES)}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule={lr_schedule!r} is unknown; choose 'constant' or 'cosine'")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r} is unknown; choose 'auto', 'torch' or 'triton'")
    check_group_size(num_rollouts)
    if micro_batch_size < 1 or max_new_tokens < 1:
        raise ValueError("micro_batch_size and max_new_tokens must be >= 1")
    check_dynamic_sampling(dynamic_sampling, max_sampling_rounds)
    if not 0 <= plain_rollouts <= num_rollouts:
        raise ValueError(f"plain_rollouts={plain_rollouts} must be in [0, num_rollouts={num_rollouts}]")
    if attn_implementation == "flash_attention_2":
        require_extra("flash_attn", "flash", "attn_implementation='flash_attention_2'")
    check_rollout_engine(rollout_engine)
    if tis_cap is not None and tis_cap <= 0:
        raise ValueError(f"tis_cap={tis_cap} must be > 0 (or None to turn truncated importance sampling off)")
    if plain_advantage not in PLAIN_ADVANTAGES:
        raise ValueError(f"plain_advantage={plain_advantage!r} is unknown; choose one of {PLAIN_ADVANTAGES}")
