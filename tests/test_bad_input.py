"""Bad input is a clear error naming the thing, before any rollout: model folders, checkpoints, configs, data."""

import argparse
import pickle
import shutil
import traceback

import pytest
import torch
from helpers import REPO, small_data, small_module, trainer, write_jsonl
from lightning.pytorch.callbacks import ModelCheckpoint

from p2o_lightning.checks import check_checkpoint_file
from p2o_lightning.cli import cli_main
from p2o_lightning.data import PromptDataModule
from p2o_lightning.module import P2OModule
from p2o_lightning.overlong import prompt_limit


def test_model_path_missing_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"model path {tmp_path / 'nope'} does not exist \(model must be"):
        P2OModule(model=str(tmp_path / "nope"))


def test_folder_without_a_model_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(ValueError, match=rf"model path {tmp_path} holds no model: no config.json"):
        P2OModule(model=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has a config.json but no weights"):
        P2OModule(model=str(tmp_path))


def test_tokenizer_missing_from_a_model_folder_is_named(tiny_world, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_world, model)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=rf"model path {model} holds a model but no tokenizer"):
        P2OModule(model=str(model))


def _fit_from(world, tmp_path, ckpt_path):
    module = small_module(world)
    with pytest.raises(ValueError) as err:
        trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, datamodule=small_data(), ckpt_path=ckpt_path)
    assert module.rollout_steps == 0  # failed while restoring, before any rollout
    return str(err.value)


def test_truncated_checkpoint_is_named(tiny_world, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer(tmp_path / "first", max_steps=1, callbacks=[ckpt], limit_val_batches=0).fit(
        small_module(tiny_world), datamodule=small_data()
    )
    good = tmp_path / "ckpt" / "last.ckpt"
    check_checkpoint_file(good)  # a checkpoint of this project passes the --ckpt_path check
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    message = _fit_from(tiny_world, tmp_path / "second", str(cut))
    assert message.startswith(f"{cut} is not a checkpoint of p2o-lightning: it does not load (truncated, corrupt")
    assert "file an issue" not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"weight": torch.zeros(2)}, "not a Lightning training checkpoint"),
        ({"state_dict": {"layer.weight": torch.zeros(2)}, "loops": {}}, "a Lightning checkpoint of another module"),
    ],
    ids=["state-dict", "other-module"],
)
def test_foreign_checkpoint_is_named(tiny_world, tmp_path, content, expected):
    foreign = tmp_path / "foreign.ckpt"
    torch.save(content, foreign)
    message = _fit_from(tiny_world, tmp_path / "run", str(foreign))
    assert message.startswith(f"{foreign} is not a checkpoint of p2o-lightning: {expected}")


def test_val_files_naming_a_split_twice_is_an_error(tmp_path, capsys):
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  val_files:\n    dev: a.jsonl\n    dev: b.jsonl\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs" / "toy.yaml"), "--config", str(config), "--print_config"])
    assert "the key 'dev' is given twice in one mapping (lines 3 and 4)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["", "in/dist", " dev"])
def test_val_split_names_that_cannot_name_metrics(name):
    with pytest.raises(ValueError, match=r"data.val_files: split name .* cannot name metrics"):
        PromptDataModule(val_files={name: "dev.jsonl"}, train_file="train.jsonl")


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--trainer.default_root_dir=some_file/run", "trainer.default_root_dir some_file/run"),
        ("--trainer.logger.init_args.save_dir=some_file/runs", "run folder some_file/runs/toy"),
    ],
    ids=["default_root_dir", "logger-save_dir"],
)
def test_run_folder_through_a_file_is_named(tiny_world, tmp_path, monkeypatch, flag, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some_file").write_text("notes")
    args = ["fit", "--config", str(REPO / "configs" / "toy.yaml"), f"--model.model={tiny_world}", flag]
    with pytest.raises(NotADirectoryError) as err:
        cli_main(args)
    assert str(err.value).startswith(f"{expected} cannot be created: some_file is a file, not a folder. Choose")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some_file"]  # before anything was written


def _write_truncated(path):
    torch.save({"state_dict": {"policy.w": torch.zeros(64)}, "loops": {}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (_write_truncated, "it does not load (truncated, corrupt or not a torch file: not the zip archive that"),
        (lambda p: p.write_text("hello\n"), "it does not load (truncated, corrupt or not a torch file: not the zip"),
        (lambda p: p.write_bytes(pickle.dumps(argparse.Namespace(lr=1))), "it does not load"),
        (
            lambda p: torch.save({"args": argparse.Namespace(lr=1)}, p),
            "it does not load (truncated, corrupt or not a torch file: it holds a Python object of type "
            "argparse.Namespace, which no checkpoint of this project holds)",
        ),
        (lambda p: torch.save({"weight": torch.zeros(2)}, p), "not a Lightning training checkpoint"),
    ],
    ids=["truncated", "text", "pickle", "foreign-object", "state-dict"],
)
def test_ckpt_path_that_is_not_a_checkpoint_is_named_before_lightning_reads_it(
    tiny_world, tmp_path, monkeypatch, write, expected
):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "model.ckpt"
    write(ckpt)
    args = ["fit", "--config", str(REPO / "configs" / "toy.yaml"), f"--model.model={tiny_world}", f"--ckpt_path={ckpt}"]
    with pytest.raises(ValueError) as err:
        cli_main(args)
    assert str(err.value).startswith(f"{ckpt} is not a checkpoint of p2o-lightning: {expected}")
    shown = "".join(traceback.format_exception(err.value))  # what the user sees, chained causes included
    assert "weights_only" not in shown and "arbitrary code" not in shown and "file an issue" not in shown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]  # before anything was written


def test_ckpt_path_missing_is_named(tiny_world, tmp_path):
    args = ["fit", "--config", str(REPO / "configs" / "toy.yaml"), f"--model.model={tiny_world}"]
    with pytest.raises(FileNotFoundError, match=rf"checkpoint not found: {tmp_path / 'nope.ckpt'} \(--ckpt_path"):
        cli_main([*args, f"--ckpt_path={tmp_path / 'nope.ckpt'}"])


def _train_file_with_a_long_prompt(tmp_path):
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)]
    rows.insert(2, {"prompt": "1+" * 1500 + "1=", "answer": "1501"})  # 3,002 characters, at line 3
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows)
    return path


def test_prompt_longer_than_the_model_positions_is_named(tiny_world, tmp_path):
    train = _train_file_with_a_long_prompt(tmp_path)
    module = small_module(tiny_world)  # the tiny world has 256 positions; max_new_tokens=12 leaves 244 for a prompt
    with pytest.raises(ValueError) as err:
        trainer(tmp_path, max_steps=1).fit(module, datamodule=small_data(train_file=str(train)))
    message = str(err.value)
    expected = (
        f"{train}: 1 of 9 prompts are longer than 244 tokens (the model's 256 positions minus 12 response tokens)"
    )
    assert message.startswith(f"{expected}: line 3 (")
    assert "set data.filter_overlong_prompts=true" in message
    assert module.policy is None  # refused when the data is set up, before any weights load


def test_overlong_prompts_are_dropped_and_counted_when_asked(tiny_world, tmp_path):
    train = _train_file_with_a_long_prompt(tmp_path)
    module, data = small_module(tiny_world), small_data(train_file=str(train), filter_overlong_prompts=True)
    dropped = rf"{train}: dropped 1 of 9 prompts longer than 244 tokens \(.*\): line 3 \(\d+ tokens\)"
    with pytest.warns(UserWarning, match=dropped):
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=data)
    assert module.rollout_steps == 1
    assert data.dropped_prompts == {"train": 1} and [p.prompt for p in data.train_problems][:3] == [
        "0+0=",
        "1+1=",
        "2+2=",
    ]
    assert data.rows["train"][1][:3] == ["line 1", "line 2", "line 4"]


def test_prompt_limit():
    # 256 positions - 12 response tokens = 244; a smaller data.max_prompt_length wins, a larger one is capped
    assert prompt_limit(256, 12, None) == (244, "the model's 256 positions minus 12 response tokens")
    assert prompt_limit(256, 12, 100) == (100, "data.max_prompt_length=100")
    assert prompt_limit(256, 12, 500)[0] == 244
    assert prompt_limit(None, 12, 500) == (500, "data.max_prompt_length=500")
    assert prompt_limit(None, 12, None) == (None, "")
    with pytest.raises(
        ValueError, match=r"max_new_tokens=256 leaves no room for a prompt in the model's 256 positions"
    ):
        prompt_limit(256, 256, None)
