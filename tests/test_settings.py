"""The module's settings in groups (``p2o_lightning/settings.py``, ``p2o_lightning/loss.py``): each group checks its
own fields, the config nests them under ``model``, an old flat key is named with its new place, and the
hyperparameters a checkpoint keeps are plain data that build the module again.
"""

import dataclasses

import pytest
import yaml
from helpers import REPO

from p2o_lightning.cli import cli_main, moved_options
from p2o_lightning.loss import LossSettings
from p2o_lightning.module import P2OModule
from p2o_lightning.settings import (
    GROUPS,
    MOVED,
    ComputeSettings,
    P2OSettings,
    RolloutSettings,
    UpdateSettings,
    ValidationSettings,
    group,
)

# P2OModule's flat constructor arguments before the groups (at 7f5e57e), less the four that stay on the module
FLAT = """num_rollouts temperature top_p max_new_tokens rollout_engine vllm_options tis_cap reward_timeout
dynamic_sampling max_sampling_rounds ppo_epochs ppo_mini_batch_size micro_batch_size micro_batch_tokens
norm_adv_by_std warmup_steps lr_schedule max_grad_norm clip_low clip_high clip_ratio_c loss_agg kl_coef
kl_estimator context_ratio_bounds context_mask_scope anchor_weight dtype attn_implementation
gradient_checkpointing backend logprob_chunk_size fused_head head_dtype distill plain_rollouts
drop_failed_templated plain_advantage opening_tokens opening_gate kl_rows val_num_samples val_temperature
val_max_new_tokens""".split()


def test_every_flat_setting_has_one_new_place():
    assert sorted(MOVED) == sorted(FLAT)
    places = [place.split(".") for place in MOVED.values()]
    assert len(set(MOVED.values())) == len(MOVED)  # no two old keys land on one field
    for name, field in places:
        assert field in {f.name for f in dataclasses.fields(GROUPS[name])}, (name, field)
    every_field = {(name, f.name) for name, cls in GROUPS.items() for f in dataclasses.fields(cls)}
    assert every_field == {tuple(p) for p in places}  # and every group field was a flat setting


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (RolloutSettings, dict(num_rollouts=1), "num_rollouts=1: GRPO needs at least 2"),
        (RolloutSettings, dict(top_p=0.0), "top_p=0.0 must be in"),
        (RolloutSettings, dict(engine="sglang"), "model.rollout.engine='sglang' is unknown"),
        (RolloutSettings, dict(tis_cap=0.0), "tis_cap=0.0 must be > 0"),
        (RolloutSettings, dict(dynamic_sampling="sometimes"), "dynamic_sampling='sometimes' is unknown"),
        (UpdateSettings, dict(ppo_epochs=0), "ppo_epochs=0 must be >= 1"),
        (UpdateSettings, dict(micro_batch_tokens=0), "micro_batch_tokens=0 must be >= 1"),
        (UpdateSettings, dict(lr_schedule="linear"), "lr_schedule='linear' is unknown"),
        (ComputeSettings, dict(dtype="float8"), "dtype='float8' is unknown"),
        (ComputeSettings, dict(backend="cuda"), "backend='cuda' is unknown"),
        (ComputeSettings, dict(fused_head=False, head_dtype="bfloat16"), "needs fused_head True or None"),
        (P2OSettings, dict(plain_rollouts=-1), "plain_rollouts=-1 must be >= 0"),
        (P2OSettings, dict(opening_gate=0.0), "opening_gate=0.0 must be in"),
        (P2OSettings, dict(kl_rows="some"), "kl_rows='some' is unknown"),
        (ValidationSettings, dict(max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
        (LossSettings, dict(clip_ratio_c=1.0), "clip_ratio_c must be > 1"),
    ],
)
def test_each_group_checks_its_own_fields(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_checks_across_groups_and_mappings_as_groups():
    with pytest.raises(ValueError, match=r"p2o.plain_rollouts=5 must be in \[0, rollout.num_rollouts=4\]"):
        P2OModule(rollout={"num_rollouts": 4}, p2o={"plain_rollouts": 5})
    with pytest.raises(ValueError, match="model.loss has no setting clip_hihg"):
        P2OModule(loss={"clip_hihg": 0.3})
    assert group(LossSettings, {"clip_high": 0.3}, "loss") == LossSettings(clip_high=0.3)
    assert group(LossSettings, None, "loss") == LossSettings()


def test_hyperparameters_are_plain_data_that_build_the_module_again():
    module = P2OModule(rollout=RolloutSettings(num_rollouts=4), loss=LossSettings(context_ratio_bounds=(0.1, 3.0)))
    hparams = dict(module.hparams)
    assert hparams["rollout"]["num_rollouts"] == 4 and hparams["loss"]["context_ratio_bounds"] == [0.1, 3.0]
    assert all(isinstance(v, (dict, str, int)) for v in hparams.values())  # what torch.load(weights_only=True) reads
    again = P2OModule(**hparams)
    assert (again.rollout, again.loss) == (module.rollout, module.loss)


def test_the_config_nests_the_groups(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs" / "p2o-toy.yaml"), "--model.loss.clip_high=0.3",
                  "--print_config"])  # fmt: skip
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert set(GROUPS) <= set(model)
    assert model["loss"]["clip_high"] == 0.3 and model["loss"]["anchor_weight"] == 1.0
    assert model["p2o"]["plain_rollouts"] == 2 and model["rollout"]["num_rollouts"] == 8
    assert model["compute"]["backend"] == "auto"  # a group the config leaves out shows its defaults


def test_an_old_flat_key_names_its_new_place(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(REPO / "configs" / "toy.yaml"), "--model.clip_high", "0.3"])
    assert exit_info.value.code == 2
    assert "model.clip_high moved to model.loss.clip_high" in capsys.readouterr().err
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  model: embedded\n  val_num_samples: 4\n  rollout:\n    num_rollouts: 4\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--config={old}"])
    assert "model.val_num_samples moved to model.validation.num_samples" in capsys.readouterr().err
    assert moved_options(["fit", "--model.loss.clip_high=0.3", "--model.model=x", "--model.seed=1"]) == []
