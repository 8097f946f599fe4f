"""Shared test helpers: a small module / data / trainer on the tiny embedded world, reading metrics.csv, and
recomputing response log-probs with a plain HF forward."""

import csv
import json
import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from p2o_lightning.data import PromptDataModule
from p2o_lightning.module import P2OModule
from p2o_lightning.outputs import AtomicCheckpointIO
from p2o_lightning.runs import RunCSVLogger, RunFolder

REPO = Path(__file__).resolve().parents[1]


def small_module(world, **kw):
    args = dict(model=str(world), num_rollouts=4, max_new_tokens=12, micro_batch_size=8, val_num_samples=2)
    args.update(kw)
    return P2OModule(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **args)


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
