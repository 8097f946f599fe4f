"""P²O on two processes with FSDP2 (FSDP2Strategy, gloo): a search runs, every rank scores its share of
each evaluation, and both ranks hold the same assignments. Before the collective scorer this deadlocked: rank 0's
FSDP2 all-gather waited for a rank that sat in a broadcast."""

import json
import os
import subprocess
import sys

from helpers import REPO

SCRIPT = """
import dataclasses, json, sys
from pathlib import Path

import lightning as L
import torch

from p2o_lightning.callbacks import P2OCallback
from p2o_lightning.prompt.schedule import ScheduleSettings
from p2o_lightning.prompt.search import SearchSettings
from p2o_lightning.data import PromptDataModule
from p2o_lightning.module import P2OModule
from p2o_lightning.sharded import FSDP2Strategy

world, out = sys.argv[1], Path(sys.argv[2])


class ParityReward(P2OModule):  # rewarded 1 for an odd-length prompt: templates of odd length solve the others
    def sample(self, prompts, answers, sampling):
        rollouts, grade = super().sample(prompts, answers, sampling)
        rewards = [float(len(p) % 2) for p in prompts for _ in range(sampling.n)]
        return rollouts, dataclasses.replace(grade, rewards=rewards)


class Record(L.Callback):
    templated = 0  # training groups sampled under templates, after the search

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.templated += sum(outputs["templated"])

    def on_fit_end(self, trainer, pl_module):
        p2o = next(c for c in trainer.callbacks if isinstance(c, P2OCallback))
        record = {"assignments": pl_module.template_assignments, "searches": len(p2o.schedule.searches),
                  "templated": self.templated, "examples_scored": p2o.examples_scored,
                  "metric_calls": [s.metric_calls for s in p2o.schedule.searches]}
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


L.seed_everything(0)
module = ParityReward(model=world, rollout={"num_rollouts": 4, "max_new_tokens": 8}, update={"micro_batch_size": 8},
                   validation={"num_samples": 0}, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
p2o = P2OCallback(schedule=ScheduleSettings(trigger="steps", every_n_steps=2, min_hard_samples=4,
                                            template_lifetime="forever", clear_pool_after_search=False),
                  search=SearchSettings(dev_size=4, max_metric_calls=40, parents_per_iteration=2))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(), max_steps=4, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
                    default_root_dir=str(out), callbacks=[p2o, Record()])
# 8 problems = 2 steps of 2 prompts on each of 2 ranks: the search at step 2 assigns templates to the hard ones,
# which come round again in steps 3-4 (distilled rows, the context ratio mask, under FSDP2)
train = out / "train.jsonl"
train.write_text("".join(json.dumps({"prompt": f"{i}+{i + 3}=", "answer": str(2 * i + 3)}) + "\\n" for i in range(8)))
trainer.fit(module, datamodule=PromptDataModule(batch_size=2, train_file=str(train), val_files={"dev": str(train)}))
"""


def test_p2o_search_under_fsdp2_on_two_ranks(tiny_world, tmp_path):
    script = tmp_path / "run_p2o.py"
    script.write_text(SCRIPT)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # this checkout's package
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_world), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["searches"] == ranks[1]["searches"] == 2  # at RL steps 2 and 4
    assert ranks[0]["assignments"] == ranks[1]["assignments"]  # the same templates on both ranks
    assert ranks[0]["assignments"]  # the search did assign templates (a template beat the plain prompt)
    assert ranks[0]["templated"] + ranks[1]["templated"] > 0  # and steps 3-4 trained on templated groups
    calls = sum(ranks[0]["metric_calls"])
    assert calls > 0
    # every evaluation was shared: examples i, i + 2, ... on rank 0, the others on rank 1
    assert ranks[0]["examples_scored"] > 0 and ranks[1]["examples_scored"] > 0
    assert ranks[0]["examples_scored"] + ranks[1]["examples_scored"] == calls
