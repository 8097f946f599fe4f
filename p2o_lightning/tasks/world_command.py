"""The ``world`` command: check the shipped embedded world, measure it, or rebuild it from its recipe.

    python -m p2o_lightning world                     # the shipped world, checked: folder, fingerprint, recipe hash
    python -m p2o_lightning world --report            # and its report table (sampling, K=8, 40 problems a row)
    python -m p2o_lightning world --rebuild [--force] # build the recipe here and compare with the shipped weights
    python -m p2o_lightning world --rebuild --ship    # replace the shipped copy with this build
    python -m p2o_lightning world --rebuild --seed 1  # another world: the recipe with seed 1, built into the cache

The world itself is :mod:`p2o_lightning.tasks.world` (recipe, build, measurement); its shipped copy and checks are
:mod:`p2o_lightning.tasks.shipped_world`. This module only wires the two to a command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import transformers

from p2o_lightning.tasks import shipped_world as shipped
from p2o_lightning.tasks import world


def _describe(path: Path) -> str:
    """The world's folder, weights' fingerprint, recipe hash and where it was built, in three lines."""
    build = json.loads((path / "build.json").read_text())
    where = f"built on {build.get('cpu', 'an unrecorded CPU')}, {build['threads']} threads"
    return (
        f"world: {path}\nweights: {world.world_fingerprint(path)} ({where})\nrecipe: {build['hash']}; build time "
        f"{build['build_seconds']:.0f}s ({build['parameters']:,} parameters)"
    )


def _save_report(path: Path, lines: list[str], k: int, temperature: float, n: int) -> Path:
    build = json.loads((path / "build.json").read_text())
    header = (
        f"# World report: {path.name}, weights {world.world_fingerprint(path)}\n\n"
        f"`python -m p2o_lightning world --report` (K={k}, T={temperature}, {n} problems per row), measured "
        f"{time.strftime('%Y-%m-%d')} on {world._cpu_name()}, {os.cpu_count()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. The world was built on {build.get('cpu', 'an unrecorded CPU')}, "
        f"{build['threads']} threads, torch {build['torch']}. Sampling is seeded: the same world and machine give "
        f"the same table.\n\n"
    )
    out = path / "report.md"
    out.write_text(header + "\n".join(line for line in lines if line.startswith("|")) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m p2o_lightning world [--report | --save-report] [--rebuild [--force] [--ship] [--cache-dir DIR]]``.

    Without ``--rebuild``: the shipped world, checked (:func:`~p2o_lightning.tasks.shipped_world.shipped_world`).
    With it: the recipe's world built here (into the cache), compared with the shipped one; ``--ship`` replaces the
    shipped copy with it. ``--report`` measures whichever of the two it names.
    """
    parser = argparse.ArgumentParser(
        prog="python -m p2o_lightning world", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--report", action="store_true", help="measure the world under sampling and print a table")
    parser.add_argument("--save-report", action="store_true", help="--report, and write it to the world's report.md")
    rebuild = "build the recipe's world here (in the cache) and compare it with the shipped one"
    parser.add_argument("--rebuild", action="store_true", help=rebuild)
    parser.add_argument("--ship", action="store_true", help="with --rebuild: replace the shipped world by this build")
    parser.add_argument("--force", action="store_true", help="with --rebuild: build even if the cache holds the world")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $P2O_CACHE or ~/.cache/p2o_lightning)")
    seed = "with --rebuild: the recipe with this seed (another world: own weights and data splits; default: shipped)"
    parser.add_argument("--seed", type=int, default=None, help=seed)
    parser.add_argument("--threads", type=int, default=None, help="with --rebuild: torch threads (default every core)")
    parser.add_argument("--k", type=int, default=8, help="rollouts per problem")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--n", type=int, default=40, help="problems per report row")
    args = parser.parse_args(argv)
    if not args.rebuild and (args.ship or args.force or args.cache_dir or args.seed is not None or args.threads):
        parser.error("--ship, --force, --cache-dir, --seed and --threads apply to a build: give --rebuild too")
    if args.ship and args.seed is not None:
        parser.error("--ship replaces the shipped world by a build of its own recipe: drop --seed")
    start = time.perf_counter()
    recipe = world.DEFAULT_RECIPE  # read at call time: a test may stand in another recipe
    if args.seed is not None:
        recipe = dataclasses.replace(recipe, seed=args.seed)
    if args.rebuild:
        logged: list[str] = []
        build_log = lambda line: (print(line), logged.append(line))  # noqa: E731
        path = world.build_world(recipe, args.cache_dir, args.force, build_log, args.threads)
        print(_describe(path))
        if not logged:
            print("(the cached build of this recipe, not built again: --force builds it anew)")
        if args.seed is not None:
            print(f"another world (recipe seed {args.seed}), not compared with the shipped one; train on it with "
                  f"model.model={path} data.world_seed={args.seed}")  # fmt: skip
            reference = None
        else:
            try:
                reference = shipped.shipped_world(recipe)
            except shipped.ShippedWorldError as error:
                print(f"not compared with a shipped world: {error}")
                reference = None
        if reference is not None:
            print(shipped.describe_comparison(shipped.compare_weights(reference, path), path, reference))
        if args.ship:
            path = shipped.ship_world(path, recipe)
            print(f"shipped: {path} now holds this build (manifest written; its report.md is gone: --save-report)")
    else:
        path = shipped.shipped_world(recipe)
        manifest = shipped.read_manifest(path)
        print(_describe(path))
        print(f"shipped, checked: recipe hash {manifest['recipe_hash']}, weights SHA-256 {manifest['weights_sha256']}")
    print(f"ready in {time.perf_counter() - start:.1f}s")
    if args.report or args.save_report:
        lines: list[str] = []

        def log(line: str) -> None:
            print(line)
            lines.append(line)

        world.report(path, k=args.k, temperature=args.temperature, n=args.n, log=log)
        if args.save_report:
            print(f"report: {_save_report(path, lines, args.k, args.temperature, args.n)}")


if __name__ == "__main__":
    main()
