"""Context distillation stage: rows sampled under template(x) are re-prompted with x before their log-probs.

P²O trains a response sampled from template(x) as a response to x (paper Eq. 4): the batch keeps both prompts,
``gen_ids`` (what the row was sampled under: the context of log π(y|t(x)), which feeds the context ratio mask) and
``prompt_ids`` (what it is trained under), re-encoded here from the plan's trained prompts. A batch without
distilled rows comes back unchanged. The ratio mask itself is applied inside the loss
(:func:`p2o_lightning.ops.policy_loss`, ``context_logp``), from the log-probs of :mod:`.logprobs`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from p2o_lightning.step.batch import RolloutBatch

EncodeFn = Callable[[list[str], torch.device], tuple[Tensor, Tensor]]  # prompts -> left-padded ids, mask


def reprompt(batch: RolloutBatch, encode: EncodeFn) -> RolloutBatch:
    """The batch with ``prompt_ids`` / ``prompt_mask`` encoded from each row's trained prompt."""
    if not batch.reprompted:
        return batch
    prompt_ids, prompt_mask = encode(batch.trained_prompts, batch.response_ids.device)
    return batch.with_(prompt_ids=prompt_ids, prompt_mask=prompt_mask)


def needs_context_logp(batch: RolloutBatch, context_ratio_bounds: tuple[float, float] | None) -> bool:
    """Some row is distilled, and log π(y|t(x)) is needed: for the context ratio mask, or as the π_old that the
    engine's sampling log-probs are compared with (the row was sampled under t(x)).
    """
    return batch.reprompted and (context_ratio_bounds is not None or batch.sampling_logp is not None)
