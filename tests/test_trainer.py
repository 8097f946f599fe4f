"""End-to-end: the real trainer on the embedded world — fit, resume equality, DDP on gloo, the CLI, bad input."""

import dataclasses
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from helpers import REPO, KillAt, grouped, read_csv, small_data, small_module, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from p2o_lightning.cli import cli_main, main
from p2o_lightning.module import P2OModule

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_fit_updates_policy_and_logs(tiny_world, tmp_path):
    L.seed_everything(0)
    module, data = small_module(tiny_world, kl_coef=0.05, ppo_mini_batch_size=2, ppo_epochs=2), small_data()
    t = trainer(tmp_path, max_steps=4, limit_val_batches=1, val_check_interval=1)
    t.fit(module, datamodule=data)
    # the reference model still holds the initial weights
    changed = [not torch.equal(p, r) for p, r in zip(module.policy.parameters(), module.reference.parameters())]
    assert any(changed), "no parameter changed in 4 PPO updates"
    # the reference model is frozen, in eval mode, outside the optimizer, and shares no storage with the policy
    ref_params = list(module.reference.parameters())
    assert not module.reference.training and all(not p.requires_grad for p in ref_params)
    opt_ids = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert not opt_ids & {id(p) for p in ref_params}
    policy_ptrs = {p.untyped_storage().data_ptr() for p in module.policy.parameters()}
    assert not policy_ptrs & {p.untyped_storage().data_ptr() for p in ref_params}
    assert "reference" not in "".join(module.state_dict())  # never checkpointed
    # 2 updates per RL step (mini-batch 2 of 4 prompts) x 2 PPO epochs, 1 RL step counted per batch
    assert t.global_step == 4 and module.rollout_steps == 1
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    train = [r for r in rows.values() if "train/loss" in r]
    assert train and all(math.isfinite(float(r["train/loss"])) for r in train)
    assert all(float(r["train/kl"]) >= 0 for r in train)
    assert any("val/in_dist/greedy_acc" in r for r in rows.values()), rows


def test_resume_reproduces_uninterrupted_run(tiny_world, tmp_path):
    """Steps 3-5 of a run killed after step 2 and resumed from last.ckpt equal those of the uninterrupted run."""

    def run(root, ckpt_path=None, kill_at=None):
        L.seed_everything(0)
        module, data = small_module(tiny_world, warmup_steps=2), small_data(batch_size=2)
        callbacks = [ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=0)]
        if kill_at is not None:
            callbacks.append(KillAt(kill_at))
        t = trainer(root, max_steps=5, callbacks=callbacks, val_check_interval=2, limit_val_batches=1)
        t.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module

    full = run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path / "resumed", kill_at=3)
    assert (tmp_path / "resumed" / "ckpt" / "last.ckpt").is_file()
    resumed = run(tmp_path / "resumed", ckpt_path="last")

    a = read_csv(tmp_path / "full" / "run" / "metrics.csv")
    b = read_csv(tmp_path / "resumed" / "run" / "metrics.csv")
    keys = ["train/reward", "train/loss", "train/entropy", "train/response_length", "train/grad_norm"]
    for step in (2, 3, 4):  # 0-based steps: the three RL steps after the kill
        for key in keys:
            assert float(a[step][key]) == pytest.approx(float(b[step][key]), rel=1e-5, abs=1e-7), (step, key)
    for p, q in zip(full.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(p, q)


class NaNAfter(P2OModule):
    """The real module whose loss turns NaN from optimizer step ``n`` on (as an fp16 overflow would)."""

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n = n

    @property
    def ops(self):
        real = super().ops
        if self.global_step < self.n:
            return real

        def nan_loss(*args, **kwargs):
            loss, stats = real.policy_loss(*args, **kwargs)
            return loss * float("nan"), stats

        return dataclasses.replace(real, policy_loss=nan_loss)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_world, tmp_path):
    module = NaNAfter(
        2, model=str(tiny_world), rollout={"num_rollouts": 4, "max_new_tokens": 12}, update={"micro_batch_size": 8}
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    t = trainer(tmp_path, max_steps=5, callbacks=[ckpt], limit_val_batches=0)
    with pytest.raises(FloatingPointError, match="non-finite loss .* at global step 2"):
        t.fit(module, datamodule=small_data())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model:" in capsys.readouterr().out


def test_unknown_config_key_is_named(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs" / "toy.yaml"), "--model.num_rolouts=4"])
    assert "num_rolouts" in capsys.readouterr().err


def test_a_callback_key_that_moved_into_a_settings_group_names_its_new_place(tmp_path, capsys):
    """A P²O config of before the callback's settings groups: each flat key is named with where it lives now."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "p2o-toy.yaml").read_text())
    p2o = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("P2OCallback"))["init_args"]
    p2o["tau"] = p2o["schedule"].pop("tau")
    p2o["dev_size"] = p2o["search"].pop("dev_size")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(tmp_path / "old.yaml"), "--print_config"])
    assert "'tau', 'dev_size' moved into settings groups; write init_args.schedule.tau, init_args.search.dev_size" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("args", "unrecognized"),
    [
        # --model.loss.anchor is a prefix of --model.loss.anchor_weight only: argparse's default would set the weight
        (
            ["fit", "--config", str(REPO / "configs" / "toy.yaml"), "--model.loss.anchor", "0.5", "--print_config"],
            "--model.loss.anchor",
        ),
        (["world", "--rep"], "--rep"),  # argparse's default would take it for --report
    ],
    ids=["fit", "world"],
)
def test_an_abbreviated_option_is_an_error_not_a_guess(args, unrecognized, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    assert f"unrecognized arguments: {unrecognized}" in out.err
    assert "anchor_weight: 0.5" not in out.out


def test_help_names_every_command_the_readme_uses(capsys):
    import re

    used = set(re.findall(r"python -m p2o_lightning (\w+)", (REPO / "README.md").read_text()))
    assert {"fit", "world", "report"} <= used
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: python -m p2o_lightning ")
    assert not [command for command in used if not re.search(rf"\b{command}\b", help_text)]
    with pytest.raises(SystemExit):  # a class's own help, a parser jsonargparse makes itself
        main(["fit", "--trainer.callbacks.help", "p2o_lightning.callbacks.P2OCallback"])
    assert capsys.readouterr().out.startswith("usage: python -m p2o_lightning ")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_agg": "mean"}, "loss_agg='mean' is unknown"),
        ({"kl_estimator": "k4"}, "kl_estimator='k4' is unknown"),
        ({"task": "chess"}, "task='chess' is unknown"),
        ({"backend": "cuda"}, "backend='cuda' is unknown"),
        ({"rollout_engine": "vllm"}, r"p2o-lightning\[vllm\]"),
        ({"attn_implementation": "flash_attention_2"}, r"p2o-lightning\[flash\]"),
        ({"num_rollouts": 1}, r"num_rollouts=1: GRPO needs at least 2 rollouts per prompt"),
        ({"ppo_mini_batch_size": 0}, r"ppo_mini_batch_size=0 must be >= 1"),
    ],
)
def test_bad_module_arguments_fail_before_loading(kwargs, message):
    with pytest.raises((ValueError, ImportError), match=message):
        P2OModule(model="/does/not/exist", **grouped(**kwargs))


def test_data_row_without_answer_fails_before_training(tiny_world, tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "4+4="}\n')
    module = small_module(tiny_world)
    data = small_data(train_file=str(bad), val_files={"dev": str(bad)})
    with pytest.raises(ValueError, match=r"train.jsonl: 1 of 2 rows are unusable:\n  line 2: no .answer."):
        trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    assert module.policy is None  # failed before the model was loaded


def test_mini_batch_not_dividing_the_batch_fails_before_loading(tiny_world, tmp_path):
    module = small_module(tiny_world, ppo_mini_batch_size=3)
    with pytest.raises(ValueError, match=r"ppo_mini_batch_size=3 does not divide data.batch_size=4"):
        trainer(tmp_path, max_steps=1).fit(module, datamodule=small_data(batch_size=4))
    assert module.policy is None


FSDP2 = '{"class_path": "p2o_lightning.sharded.FSDP2Strategy"}'


@pytest.mark.parametrize("strategy", ["ddp", FSDP2], ids=["ddp", "fsdp2"])
def test_two_cpu_processes_via_cli(tiny_world, tmp_path, strategy):
    """The user's command with DDP or FSDP2 (fully_shard via FSDP2Strategy), devices=2 on gloo."""
    cmd = [
        sys.executable, "-m", "p2o_lightning", "fit", "--config", str(REPO / "configs" / "toy.yaml"),
        f"--model.model={tiny_world}", f"--trainer.strategy={strategy}", "--trainer.devices=2", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.num_sanity_val_steps=0", "--data.batch_size=2",
        "--data.max_val_samples=4", "--model.rollout.num_rollouts=4", "--model.rollout.max_new_tokens=8",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # this checkout's package
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "toy"
    rows = read_csv(run / "metrics.csv")
    assert sum("train/loss" in r for r in rows.values()) == 2
    assert (run / "metrics.png").is_file() and "distributed_backend=gloo" in proc.stderr
    # the exported policy is a plain checkpoint, also when the training copy was sharded
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run / "policy")
    initial = AutoModelForCausalLM.from_pretrained(tiny_world)
    assert all(torch.isfinite(p).all() for p in exported.parameters())
    assert exported.lm_head.weight.shape == initial.lm_head.weight.shape
