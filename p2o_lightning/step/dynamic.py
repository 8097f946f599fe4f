"""Dynamic sampling stage (DAPO, verl's ``filter_groups``): drop groups without reward spread, sample more prompts.

A group whose K rewards are all equal has zero advantage everywhere and gives no gradient (P²O's *advantage
collapse*). With ``dynamic_sampling: filter`` such groups are dropped and further batches of prompts are drawn and
sampled — at most ``max_sampling_rounds`` rounds in all — until the step holds as many informative groups as the
batch has prompts; extra informative groups are dropped (the batch keeps its size, as verl trims to
``train_batch_size``). If the rounds run out first, the batch is filled with the first dropped groups (they carry
zero advantage, as in plain GRPO), so every step trains on the same number of prompts.

Every rank samples the same number of rounds (``any_rank`` says whether some rank is still short): under FSDP2
each round's ``generate`` is a collective, and the PPO update must take the same number of micro-batches on every
rank. All sampled groups, dropped ones included, are returned as ``seen``: they are what the P²O callback collects
its hard samples from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from p2o_lightning.ops import collapsed_groups
from p2o_lightning.step.batch import RolloutBatch, cat_batches

DYNAMIC_SAMPLING = ("off", "filter")


def check_dynamic_sampling(mode: str, max_rounds: int, datamodule=None) -> None:
    """The settings, and (given the datamodule) that it can draw more prompts."""
    if mode not in DYNAMIC_SAMPLING:
        raise ValueError(f"dynamic_sampling={mode!r} is unknown; choose one of {DYNAMIC_SAMPLING}")
    if max_rounds < 1:
        raise ValueError(f"max_sampling_rounds={max_rounds} must be >= 1")
    if datamodule is not None and mode == "filter" and not hasattr(datamodule, "extra_batch"):
        raise ValueError(
            f"dynamic_sampling='filter' draws more prompts: {type(datamodule).__name__} has no extra_batch()"
        )


def informative_groups(rewards: torch.Tensor) -> list[bool]:
    """[G] the group's K rewards are not all equal (``rewards``: [G, K]; :func:`p2o_lightning.ops.collapsed_groups`)."""
    return (~collapsed_groups(rewards)).tolist()


def dynamic_sample(
    sample_groups: Callable[[list[dict]], RolloutBatch],
    first: list[dict],
    draw: Callable[[], list[dict]] | None,
    max_rounds: int,
    pad_id: int = 0,
    any_rank: Callable[[bool], bool] = lambda short: short,
) -> tuple[RolloutBatch, RolloutBatch, int]:
    """``(kept, seen, rounds)``: the step's batch of ``len(first)`` groups, every group sampled, and the rounds run.

    ``sample_groups(rows)`` samples and grades one batch of data rows (the step's
    :class:`~p2o_lightning.step.sample.GroupSampler`); ``draw()`` gives the next batch of rows.
    ``pad_id`` pads the rounds' rows to common widths. ``max_rounds = 1`` is plain GRPO: the first batch as sampled
    (``kept`` is ``seen``).
    """
    if max_rounds == 1:
        batch = sample_groups(first)
        return batch, batch, 1
    size = len(first)
    rounds = [sample_groups(first)]
    n_informative = sum(informative_groups(rounds[0].rewards))
    while len(rounds) < max_rounds and any_rank(n_informative < size):
        rounds.append(sample_groups(draw()))
        n_informative += sum(informative_groups(rounds[-1].rewards))
    seen = rounds[0] if len(rounds) == 1 else cat_batches(rounds, pad_id)
    flags = informative_groups(seen.rewards)
    chosen = [g for g, ok in enumerate(flags) if ok][:size]
    chosen += [g for g, ok in enumerate(flags) if not ok][: size - len(chosen)]  # rounds ran out: zero-advantage
    return seen.select_groups(sorted(chosen)), seen, len(rounds)
