"""Rollout engines: K sampled responses per prompt, behind one small interface.

GRPO needs, for every prompt, K responses as token ids (to score their log-probs later) and as text (to grade
them). ``RolloutEngine.generate(prompts, sampling)`` returns both, grouped: the K rollouts of prompt ``i`` are rows
``i*K .. i*K+K-1``. Prompts come back left-padded to a common length P and responses right-padded to R, so
``cat([prompt_ids, response_ids], 1)`` is a batch whose response tokens all start at column P.

``HFRolloutEngine`` uses ``transformers``' ``generate`` and works on any device. vLLM is an optional extra
(``pip install 'p2o-lightning[vllm]'``), imported lazily by :func:`build_rollout_engine`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: ``n`` rollouts per prompt; ``temperature == 0`` means greedy decoding."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass
class Rollouts:
    """K rollouts per prompt, grouped consecutively (M = num_prompts * n rows)."""

    prompt_ids: Tensor  # [M, P] left-padded
    prompt_mask: Tensor  # [M, P] 1 on real tokens
    response_ids: Tensor  # [M, R] right-padded with the pad id, EOS included when generated
    response_mask: Tensor  # [M, R] 1 on response tokens up to and including the first EOS
    texts: list[str]  # [M] decoded responses, special tokens removed

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # [M, P + R]

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)  # [M, P + R]

    @property
    def truncated(self) -> Tensor:
        """[M] bool: the response hit ``max_new_tokens`` without an EOS."""
        return self.response_mask.bool().all(dim=1)

    def select(self, rows: Tensor) -> Rollouts:
        """The rollouts at ``rows`` (a 1-D index tensor)."""
        return Rollouts(
            self.prompt_ids[rows],
            self.prompt_mask[rows],
            self.response_ids[rows],
            self.response_mask[rows],
            [self.texts[i] for i in rows.tolist()],
        )


class RolloutEngine(Protocol):
    """Anything that samples K responses per prompt text."""

    def generate(self, prompts: list[str], sampling: SamplingParams) -> Rollouts: ...


def response_mask_from_eos(response_ids: Tensor, eos_token_ids: list[int]) -> Tensor:
    """[M, R] mask that is 1 up to and including the first EOS of each row (all ones when there is none)."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    # number of EOS strictly before each position: 0 means "still inside the response"
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long()


class HFRolloutEngine:
    """Samples with ``model.generate``; the model is put in eval mode for sampling and its mode restored after."""

    def __init__(self, model: torch.nn.Module, tokenizer, chat_template: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token` before rollouts")
        self.use_chat_template = bool(tokenizer.chat_template) if chat_template is None else chat_template
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else []
        eos = [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        if not eos:
            raise ValueError("neither the tokenizer nor the generation config names an EOS token")
        self.eos_token_ids = eos

    def render(self, prompts: list[str]) -> list[str]:
        """User messages → model input text (the chat template when the tokenizer has one)."""
        if not self.use_chat_template:
            return prompts
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]

    def encode_prompts(self, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask, [len(prompts), P]."""
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(
                self.render(prompts), return_tensors="pt", padding=True, add_special_tokens=not self.use_chat_template
            )
        finally:
            self.tokenizer.padding_side = side
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingParams) -> Rollouts:
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = self.encode_prompts(prompts, device)
        greedy = sampling.temperature <= 0
        kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=sampling.temperature)
        if not greedy:
            kwargs.update(top_p=sampling.top_p, top_k=0)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=sampling.n,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                **kwargs,
            )
        finally:
            self.model.train(was_training)
        prompt_len = prompt_ids.shape[1]
        response_ids = out[:, prompt_len:]
        if response_ids.shape[1] == 0:  # max_new_tokens=0 or an immediate stop: keep one pad column
            response_ids = out.new_full((out.shape[0], 1), self.tokenizer.pad_token_id)
        response_mask = response_mask_from_eos(response_ids, self.eos_token_ids)
        response_ids = response_ids.masked_fill(response_mask == 0, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        return Rollouts(
            prompt_ids.repeat_interleave(sampling.n, dim=0),
            prompt_mask.repeat_interleave(sampling.n, dim=0),
            response_ids,
            response_mask,
            texts,
        )


def require_extra(module: str, extra: str, what: str) -> None:
    """Raise a clear ImportError naming the optional extra when ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"{what} needs the optional package `{module}`, which is not installed. "
            f"Install the extra: pip install -c constraints.txt 'p2o-lightning[{extra}]'"
        )


ROLLOUT_ENGINES = ("hf", "vllm")


def check_rollout_engine(name: str) -> None:
    """Validate the ``rollout_engine`` setting before any model is loaded."""
    if name not in ROLLOUT_ENGINES:
        raise ValueError(f"rollout_engine={name!r} is unknown; choose one of {ROLLOUT_ENGINES}")
    if name == "vllm":
        require_extra("vllm", "vllm", "rollout_engine='vllm'")
        raise NotImplementedError(
            "rollout_engine='vllm' is not implemented yet (weight sync from the policy is still to be built); "
            "use rollout_engine='hf'"
        )
