"""The command line: ``python -m p2o_lightning fit | validate | test --config …`` through ``LightningCLI``.

Every constructor argument of :class:`~p2o_lightning.module.P2OModule` and
:class:`~p2o_lightning.data.PromptDataModule` is a config key, documented by its docstring (``--help`` shows it),
and an unknown key is an error before anything is loaded. ``data.task`` is linked to ``model.task`` so the two
can never disagree. Two extra sub-commands are not Lightning's: ``world`` (build and measure the embedded world)
and ``report`` (plots of finished runs).
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from p2o_lightning.data import PromptDataModule
from p2o_lightning.module import P2OModule


class P2OCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.task", "model.task")


def cli_main(args: list[str] | None = None, run: bool = True) -> P2OCLI:
    return P2OCLI(
        P2OModule,
        PromptDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        # the data module shards prompts across ranks itself (resumable, per-epoch shuffles)
        trainer_defaults={"use_distributed_sampler": False},
        parser_kwargs={"description": "P²O / GRPO trainer (p2o-lightning)"},
    )


def main(argv: list[str] | None = None) -> None:
    # models and data come from local paths: never let transformers / datasets reach for a hub at run time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "world":
        from p2o_lightning.tasks.world import main as world_main

        world_main(argv[1:])
        return
    if argv and argv[0] == "report":
        from p2o_lightning.report import main as report_main

        report_main(argv[1:])
        return
    cli_main(argv)
