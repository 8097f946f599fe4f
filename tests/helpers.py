"""Shared test helpers: a small module / data / trainer on the tiny embedded world, one RL step of a module with
parity rewards (``one_step``), reading metrics.csv, recomputing response log-probs with a plain HF forward, and the
float64 oracle of the log-prob op (its inputs, its forward and gradient check, and a recorder of the largest tensor
an op allocates) that the reference op and the Triton kernel are both held to."""

import csv
import dataclasses
import functools
import json
import math
import os
import signal
import socket
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from p2o_lightning.data import PromptDataModule
from p2o_lightning.loss import LossSettings
from p2o_lightning.module import P2OModule
from p2o_lightning.outputs import AtomicCheckpointIO
from p2o_lightning.runs import RunCSVLogger, RunFolder
from p2o_lightning.settings import GROUPS, MOVED
from p2o_lightning.tasks.addition import world_splits

REPO = Path(__file__).resolve().parents[1]


def with_loss_settings(op):
    """``op`` (a ``policy_loss``) called with the loss's settings as flat keyword arguments, gathered into one
    :class:`~p2o_lightning.loss.LossSettings` (clip_high 0.2, the symmetric PPO clip, unless given): the tests'
    shorthand for the many cases that vary one setting.
    """
    fields = {f.name for f in dataclasses.fields(LossSettings)}

    @functools.wraps(op)
    def call(*args, **kwargs):
        settings = {"clip_high": 0.2, **{k: kwargs.pop(k) for k in list(kwargs) if k in fields}}
        return op(*args, settings=LossSettings(**settings), **kwargs)

    return call


def grouped(**settings):
    """P2OModule's keyword arguments from flat setting names, each put in its group as
    :data:`~p2o_lightning.settings.MOVED` places it (``kl_coef=0.1`` -> ``loss={"kl_coef": 0.1}``): the tests'
    shorthand for cases that vary a few settings of several groups. ``model``, ``task``, ``optimizer`` and ``seed``
    pass as they are; a group given whole merges with the flat settings routed to it.
    """
    args: dict = {}
    for key, value in settings.items():
        if key in MOVED:
            name, field = MOVED[key].split(".")
            args.setdefault(name, {})[field] = value
        elif key in GROUPS and isinstance(value, dict):
            args[key] = {**args.get(key, {}), **value}
        else:
            args[key] = value
    return args


def small_module(world, **kw):
    args = dict(model=str(world), num_rollouts=4, max_new_tokens=12, micro_batch_size=8, val_num_samples=2)
    args.update(kw)
    return P2OModule(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **grouped(**args))


def small_data(**kw):
    args = dict(batch_size=4, val_batch_size=16, max_val_samples=8)
    args.update(kw)
    return PromptDataModule(**args)


def trainer(tmp_path, max_steps, callbacks=(), plugins=(), **kw):
    """A quiet CPU trainer whose run folder is ``tmp_path/run`` (metrics.csv kept across resumes by RunFolder)."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=RunCSVLogger(tmp_path, name="run"),
        callbacks=[RunFolder(), *callbacks],
        plugins=[AtomicCheckpointIO(), *plugins],
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        **kw,
    )


class ParityReward(P2OModule):
    """The real module, rewarded 1 for an odd-length response: spread within groups whatever the tiny model says."""

    def sample(self, prompts, answers, sampling):
        rollouts, grade = super().sample(prompts, answers, sampling)
        return rollouts, dataclasses.replace(grade, rewards=[float(len(t) % 2) for t in rollouts.texts])


def one_step(world, root, fuse: bool, templates=("Add.", "", "Carry.", "Add."), callbacks=(), **kw):
    """One RL step from seed 1 with SGD (the update is −lr·grad: equal parameters mean equal gradients); under seed 1
    the parity rewards spread within groups in every case the tests run (a step of collapsed groups has loss 0)."""
    L.seed_everything(1)
    module = ParityReward(
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        **grouped(model=str(world), num_rollouts=4, max_new_tokens=12, micro_batch_size=3, max_grad_norm=None, **kw),
    )
    if not fuse:  # force the separate no-grad π_old pass that a single update otherwise skips
        module.ppo.fuses_old_logprobs = lambda batch: False
    # every training prompt holds templates: distilled rows, the context ratio mask, and plain rows ("")
    module.template_assignments = {p.prompt: list(templates) for p in world_splits()["train"]}
    seen = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k})

    t = trainer(root, max_steps=1, callbacks=[*callbacks, Record()], limit_val_batches=0)
    t.fit(module, datamodule=small_data(batch_size=2))
    return module, seen


def read_csv(path):
    """metrics.csv as {step: {key: value}}, the rows of a step merged."""
    rows = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            rows.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v not in ("", None)})
    return rows


def csv_rows(path):
    """metrics.csv as its list of rows, each without empty cells."""
    with open(path) as f:
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def free_port() -> int:
    """A TCP port free on localhost now (for a test's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class KillAt(Callback):
    """Simulate a crash just before RL step ``n`` starts."""

    def __init__(self, n):
        self.n = n

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.rollout_steps == self.n:
            raise RuntimeError("simulated kill")


class SigkillAt(Callback):
    """``kill -9`` this process just before RL step ``$P2O_SIGKILL_AT`` starts: a crash no handler sees."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.rollout_steps == int(os.environ.get("P2O_SIGKILL_AT", "-1")):
            os.kill(os.getpid(), signal.SIGKILL)


def response_logprobs(model, rollouts, temperature: float = 1.0) -> torch.Tensor:
    """[M, R] log-probs of the response tokens under ``model``, from full logits (the test oracle); 0 on padding."""
    ids, mask = rollouts.input_ids, rollouts.attention_mask
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    width = rollouts.response_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -width - 1 : -1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(2, rollouts.response_ids[..., None]).squeeze(-1) * rollouts.response_mask


# ----------------------------------------------------------------------------------------------------------------
# The log-prob oracle (tests/test_ops.py holds the reference op to it, tests/test_kernels.py the Triton kernel)
# ----------------------------------------------------------------------------------------------------------------


def naive_logprob(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """Float64 reference: the whole (N, V) logits, log_softmax, gather; autograd does the backward."""
    logits = (hidden.double() @ weight.double().T) / temperature  # (N, V)
    logprobs = logits.log_softmax(dim=-1)  # (N, V)
    valid = targets != ignore_index  # (N,)
    logp = logprobs.gather(-1, targets.masked_fill(~valid, 0)[:, None]).squeeze(-1) * valid
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1) * valid
    return logp, entropy


def make_logprob_inputs(n, h, v, dtype, seed=0, ignore_index=-100, device="cpu"):
    """(hidden (N, H), weight (V, H), targets (N,)): logits of std ~3 (a peaked softmax), every 5th row ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / math.sqrt(h) * 3
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = ignore_index  # rows 0, 5, 10, … are ignored (padding / prompt tokens)
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def assert_close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def check_logprob_against_float64(fn, n, h, v, dtype, temperature, return_entropy, tolerances, device="cpu"):
    """``fn(hidden, weight, targets, temperature=, return_entropy=)`` against :func:`naive_logprob` in float64:
    forward, and the gradients w.r.t. hidden and weight under random upstream gradients (≠ 1), within
    ``tolerances`` = (forward atol, grad rtol, grad atol as a share of the largest |grad|); ignored rows are 0.
    """
    fwd_atol, grad_rtol, grad_atol = tolerances
    hidden, weight, targets = make_logprob_inputs(n, h, v, dtype, device=device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logp, entropy = fn(hidden, weight, targets, temperature=temperature, return_entropy=return_entropy)
    assert logp.dtype == torch.float32 and logp.shape == (n,)

    hidden64 = hidden.detach().double().requires_grad_(True)
    weight64 = weight.detach().double().requires_grad_(True)
    ref_logp, ref_entropy = naive_logprob(hidden64, weight64, targets, temperature)
    assert_close(logp, ref_logp, rtol=1e-5, atol=fwd_atol)
    gen = torch.Generator().manual_seed(1)
    grad_logp, grad_entropy = (torch.randn(n, generator=gen).to(device) for _ in range(2))  # upstream grads ≠ 1
    outputs, ref_outputs, grads = [logp], [ref_logp], [grad_logp]
    if return_entropy:
        assert entropy.dtype == torch.float32 and entropy.shape == (n,)
        assert_close(entropy, ref_entropy, rtol=1e-5, atol=fwd_atol)
        outputs, ref_outputs, grads = [logp, entropy], [ref_logp, ref_entropy], [grad_logp, grad_entropy]
    else:
        assert entropy is None

    grad_hidden, grad_weight = torch.autograd.grad(outputs, [hidden, weight], grads)
    ref_hidden, ref_weight = torch.autograd.grad(ref_outputs, [hidden64, weight64], [g.double() for g in grads])
    assert grad_hidden.dtype == grad_weight.dtype == dtype
    assert_close(grad_hidden, ref_hidden, rtol=grad_rtol, atol=grad_atol * ref_hidden.abs().max().item())
    assert_close(grad_weight, ref_weight, rtol=grad_rtol, atol=grad_atol * ref_weight.abs().max().item())

    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (grad_hidden[ignored] == 0).all()
    if return_entropy:
        assert (entropy[ignored] == 0).all()


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward run in this thread on CPU)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out
