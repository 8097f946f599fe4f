"""Helpers shared by test modules: recomputing response log-probs with a plain HF forward."""

import torch


def response_logprobs(model, rollouts, temperature: float = 1.0) -> torch.Tensor:
    """[M, R] log-probs of the response tokens under ``model``, from full logits (the test oracle); 0 on padding."""
    ids, mask = rollouts.input_ids, rollouts.attention_mask
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    width = rollouts.response_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -width - 1 : -1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(2, rollouts.response_ids[..., None]).squeeze(-1) * rollouts.response_mask
