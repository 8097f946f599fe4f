"""HF ``generate`` as a rollout engine: works on any device and samples with the policy's own weights.

Two things ``generate`` does not do by itself, and RL needs:

- **A fresh generation config.** ``generate`` fills every setting a call leaves unset from the checkpoint's
  ``generation_config.json`` (transformers 5: user > model > global defaults), so a checkpoint that ships
  ``repetition_penalty: 1.3`` or ``min_p`` would silently reshape every rollout. The model's config is swapped for
  one that holds only the stop / pad / BOS ids while sampling, and restored after.
- **The sampling log-probs.** The log-prob of each sampled token under the distribution it was drawn from
  (temperature and top-p applied, the "processed" log-probs) is recorded step by step by the last logits processor,
  keeping one [M, V] row of log-probs alive instead of ``output_scores``' [R, M, V].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from p2o_lightning.rollout.base import PolicyEngine, Rollouts, SamplingParams


class SamplingLogprobRecorder:
    """A logits processor, last in the chain: remembers log-softmax of the final scores, gathers the sampled token.

    At decoding step t it sees ``input_ids`` ending with the token sampled at step t − 1 and the processed scores of
    step t. It gathers the log-prob of that previous token from the log-softmax it kept, then keeps step t's. The
    last step's token is gathered by :meth:`finish` from the returned sequences.
    """

    def __init__(self) -> None:
        self.logps: list[Tensor] = []  # R x [M]
        self._last: Tensor | None = None  # [M, V] log-softmax of the previous step's processed scores

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._last is not None:
            self.logps.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        self._last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, response_ids: Tensor) -> Tensor:
        """[M, R] log-probs of ``response_ids`` (the generated columns of the sequences)."""
        if self._last is not None and response_ids.shape[1] > len(self.logps):
            self.logps.append(self._last.gather(1, response_ids[:, len(self.logps) : len(self.logps) + 1]).squeeze(1))
        self._last = None
        if not self.logps:
            return response_ids.new_zeros(response_ids.shape, dtype=torch.float32)
        return torch.stack(self.logps, dim=1)


@contextlib.contextmanager
def fresh_generation_config(model: nn.Module, eos: list[int], pad_token_id: int) -> Iterator[None]:
    """Within the block, ``model.generation_config`` holds nothing but the stop, pad and BOS ids."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=pad_token_id, bos_token_id=getattr(saved, "bos_token_id", None)
    )
    try:
        yield
    finally:
        model.generation_config = saved


class HFRolloutEngine(PolicyEngine):
    """Samples with ``model.generate`` on the policy's own parameters (eval mode while sampling)."""

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingParams) -> Rollouts:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = self.encode_prompts(prompts, device)
        greedy = sampling.temperature <= 0
        # Temperature and top-p are our own processors (generate adds none at T=1, top-p=1), so the recorder runs
        # after them and sees the distribution each token is actually drawn from.
        recorder = SamplingLogprobRecorder()
        processors = []
        if not greedy and sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if not greedy and sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
        processors.append(recorder)
        with self.eval_mode(), fresh_generation_config(self.model, self.eos_token_ids, self.tokenizer.pad_token_id):
            out = self.model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=sampling.n,
                do_sample=not greedy,
                **({} if greedy else {"top_k": 0}),  # the global default is 50
                logits_processor=LogitsProcessorList(processors),
            )
        response_ids = out[:, prompt_ids.shape[1] :]
        return self.rollouts(prompt_ids, prompt_mask, response_ids, recorder.finish(response_ids), sampling.n)
