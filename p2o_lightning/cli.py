"""The command line: ``python -m p2o_lightning fit | validate | test --config …`` through ``LightningCLI``.

Every constructor argument of :class:`~p2o_lightning.module.P2OModule` (its settings groups as nested keys,
``model.loss.clip_high``) and :class:`~p2o_lightning.data.PromptDataModule` is a config key, documented by its docstring
(``--help`` shows it), and an unknown key is an error before anything is loaded; so is a key given twice in one YAML
mapping (PyYAML would silently keep the last, e.g. a ``val_files`` split named twice), and a key given flat that moved
into one of the settings groups of a callback or of the module (``--model.clip_high``: the error names
``model.loss.clip_high``). ``data.task`` is linked to ``model.task`` so the two can never disagree. ``fit`` refuses a
run folder that holds another run unless told ``--ckpt_path last`` (resume) or ``--overwrite`` (start over), and every
subcommand refuses a run folder whose path goes through a file, before anything loads (:mod:`p2o_lightning.runs`). The
progress is :func:`~p2o_lightning.console.progress_bar`'s (a live bar on a terminal, plain lines in a log) unless the
config names another; on several ranks a rank that is lost is named (:class:`~p2o_lightning.ranks.LostRanks`), and a run
across nodes without a launcher or without a run folder every rank sees is refused (:mod:`p2o_lightning.nodes`).
Checkpoints are written atomically and checked when loaded (:class:`~p2o_lightning.outputs.AtomicCheckpointIO`; a
distributed one by :class:`~p2o_lightning.sharded.FSDP2Strategy`). Two extra sub-commands are not Lightning's: ``world``
(check, measure or rebuild the shipped embedded world) and ``report`` (plots of finished runs); ``--help`` lists them
below Lightning's, under the name ``python -m p2o_lightning``. An abbreviated option is an error, not a guess
(``allow_abbrev=False``: argparse's default expands a prefix of one key to that key).

A ``--ckpt_path`` file or folder is checked as soon as the command line is parsed: LightningCLI reads its
hyperparameters before any of our code runs, and a truncated or foreign file would otherwise meet torch's advice to
load it with ``weights_only=False``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing
from typing import Any

import lightning as L
from jsonargparse import DefaultHelpFormatter, get_loader, set_loader
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from p2o_lightning.checks import check_checkpoint_file
from p2o_lightning.console import progress_bar, quiet_third_party
from p2o_lightning.data import PromptDataModule
from p2o_lightning.module import P2OModule
from p2o_lightning.nodes import SharedFolders, check_node_launch
from p2o_lightning.outputs import AtomicCheckpointIO, run_dir
from p2o_lightning.ranks import LostRanks
from p2o_lightning.runs import check_run_folder, check_run_paths, clear_run, run_paths
from p2o_lightning.settings import moved_key_error

PROG = "python -m p2o_lightning"

# the sub-commands that are not Lightning's (``main`` runs them before LightningCLI parses anything), for ``--help``
OTHER_COMMANDS = {
    "world": "check, measure or rebuild the shipped embedded world",
    "report": "plots of finished runs (side by side, or one beside a reference)",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, but the description and epilog keep their line breaks (the list of other commands)."""


class P2OCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.task", "model.task")
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: start over in a run folder that holds a run (its metrics, checkpoints, policy and P²O "
            "searches are removed first). Without it such a fit is refused; --ckpt_path last resumes instead.",
        )

    def parse_arguments(self, parser, args) -> None:
        """Refuse a flat model option of before the settings groups, naming its new place (:func:`moved_options`);
        parse; then check ``--ckpt_path`` (:func:`~p2o_lightning.checks.check_checkpoint_file`) before LightningCLI
        reads the checkpoint's hyperparameters: a truncated or foreign file is an error naming it.
        """
        moved = moved_options(sys.argv[1:] if args is None else args) if args is None or isinstance(args, list) else []
        if moved:
            parser.error("; ".join(moved))
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            check_checkpoint_file(ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, with :func:`~p2o_lightning.console.progress_bar` as its progress bar (a live bar on a
        terminal, plain lines otherwise) unless the config names another or turns the bar off
        (``--trainer.enable_progress_bar false``), :class:`~p2o_lightning.ranks.LostRanks` (on several ranks, a
        lost rank is named) and :class:`~p2o_lightning.nodes.SharedFolders` (every rank sees the run folder).
        """
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
        extra = [] if any(isinstance(c, LostRanks) for c in callbacks) else [LostRanks()]
        if not any(isinstance(c, SharedFolders) for c in callbacks):
            extra.append(SharedFolders(run_paths))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            extra.append(progress_bar())
        if extra:
            kwargs.setdefault("callbacks", [*callbacks, *extra])
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default; sharded strategies keep their own
            strategy.checkpoint_io = AtomicCheckpointIO()

    def _check_launch(self) -> None:
        """Refuse a run across nodes that no launcher started (:func:`~p2o_lightning.nodes.check_node_launch`)."""
        check_node_launch(self.trainer.num_nodes, getattr(self.trainer.strategy, "cluster_environment", None))

    def before_fit(self) -> None:
        self._check_launch()
        check_run_paths(self.trainer)
        config = self.config[self.subcommand]
        folder = run_dir(self.trainer)
        if config.get("overwrite"):
            if self.trainer.is_global_zero:
                removed = clear_run(folder)
                if removed:
                    rank_zero_info(f"--overwrite: removed {', '.join(str(p) for p in removed)}")
            return
        check_run_folder(folder, config.get("ckpt_path"))

    def before_validate(self) -> None:
        self._check_launch()
        check_run_paths(self.trainer)

    def before_test(self) -> None:
        self._check_launch()
        check_run_paths(self.trainer)


def _yaml_load_rejecting_duplicates(stream):
    """The YAML loader of jsonargparse, but a key given twice in one mapping is an error naming it and its line."""
    import yaml

    if isinstance(stream, str):
        try:
            root = yaml.compose(stream, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            root = None  # not YAML on its own (a plain value): the default loader decides
        nodes = [root] if root is not None else []
        while nodes:
            node = nodes.pop()
            if isinstance(node, yaml.MappingNode):
                seen: dict[str, int] = {}
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode):
                        if key.value in seen:
                            raise yaml.constructor.ConstructorError(
                                problem=f"the key {key.value!r} is given twice in one mapping (lines "
                                f"{seen[key.value] + 1} and {key.start_mark.line + 1}); YAML would keep only the last"
                            )
                        seen[key.value] = key.start_mark.line
                    nodes.append(value)
            elif isinstance(node, yaml.SequenceNode):
                nodes.extend(node.value)
    loaded = _DEFAULT_YAML_LOAD(stream)
    _reject_moved_keys(loaded)
    _reject_moved_model_keys(loaded)
    return loaded


_DEFAULT_YAML_LOAD = get_loader("yaml")


def _reject_moved_keys(node: Any) -> None:
    """A key that moved into a settings group (a dataclass argument) of a ``class_path``'s class, given flat in its
    ``init_args`` (e.g. ``P2OCallback``'s ``tau``, now ``schedule.tau``), is an error naming its new place.
    """
    import yaml

    if isinstance(node, list):
        for item in node:
            _reject_moved_keys(item)
    if not isinstance(node, dict):
        return
    for value in node.values():
        _reject_moved_keys(value)
    init_args, class_path = node.get("init_args"), node.get("class_path")
    if not (isinstance(class_path, str) and isinstance(init_args, dict)):
        return
    try:
        module, _, name = class_path.rpartition(".")
        hints = typing.get_type_hints(getattr(importlib.import_module(module), name).__init__)
    except Exception:  # not ours to judge: jsonargparse names a class it cannot import
        return
    groups = {name: hint for name, hint in hints.items() if dataclasses.is_dataclass(hint)}
    places = {field.name: f"init_args.{group}.{field.name}" for group, hint in groups.items()
              for field in dataclasses.fields(hint)}  # fmt: skip
    moved = [key for key in init_args if key not in hints and key in places]
    if moved:
        raise yaml.constructor.ConstructorError(
            problem=f"{class_path}: {', '.join(map(repr, moved))} moved into settings groups; write "
            + ", ".join(places[key] for key in moved)
        )


def _reject_moved_model_keys(config: Any) -> None:
    """A flat key of a config's ``model`` mapping that moved into one of the module's settings groups is an error
    naming its new place (``model.clip_high moved to model.loss.clip_high``; :data:`~p2o_lightning.settings.MOVED`,
    which also names the renamed ones: ``rollout_engine`` is ``rollout.engine``).
    """
    import yaml

    model = config.get("model") if isinstance(config, dict) else None
    moved = [error for key in model if (error := moved_key_error(key))] if isinstance(model, dict) else []
    if moved:
        raise yaml.constructor.ConstructorError(problem="; ".join(moved))


def moved_options(args: list[str]) -> list[str]:
    """An error for each command-line option ``--model.<key>`` of a flat setting of before the module's settings
    groups, naming its new place (jsonargparse would only call the option unrecognized).
    """
    keys = [arg.removeprefix("--model.").split("=", 1)[0] for arg in args if arg.startswith("--model.")]
    return [error for key in keys if (error := moved_key_error(key))]


def cli_main(args: list[str] | None = None, run: bool = True) -> P2OCLI:
    quiet_third_party()
    import yaml

    set_loader("yaml", _yaml_load_rejecting_duplicates, exceptions=(yaml.YAMLError,))
    return P2OCLI(
        P2OModule,
        PromptDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},  # the run-folder check (before_fit) guards earlier runs
        # the data module shards prompts across ranks itself (resumable, per-epoch shuffles)
        trainer_defaults={"use_distributed_sampler": False},
        parser_kwargs={
            "prog": PROG,
            "description": "P²O / GRPO trainer (p2o-lightning)",
            "epilog": "other commands (not Lightning's; each has its own --help):\n"
            + "".join(f"  {PROG} {name:<8} {what}\n" for name, what in OTHER_COMMANDS.items()),
            "formatter_class": _HelpFormatter,
            # an abbreviated option is an error, not a guess: argparse would take --model.lr for --model.lr_schedule
            "allow_abbrev": False,
        },
    )


def main(argv: list[str] | None = None) -> None:
    # models and data come from local paths: never let transformers / datasets reach for a hub at run time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = sys.argv[1:] if argv is None else argv
    sys.argv[0] = PROG  # the parsers jsonargparse makes on its own (--trainer.callbacks.help CLASS) call it this too
    if args and args[0] == "world":
        from p2o_lightning.tasks.world_command import main as world_main

        world_main(args[1:])
        return
    if args and args[0] == "report":
        from p2o_lightning.report import main as report_main

        report_main(args[1:])
        return
    cli_main(argv)  # None: LightningCLI reads sys.argv itself (given both, it warns)
