"""Prompts and gold answers for RLVR: the embedded world's splits, or your own JSON / JSONL / Parquet / CSV files.

A batch is a plain ``list[dict]`` of ``{"prompt", "answer", "index", "split"}``: RL batches are prompts, not
tensors; tokenization happens in the rollout engine. Every row is checked before training starts, and a row
without a prompt or an answer is an error naming the file and the row.

The training loader is resumable: it shuffles with a generator seeded by ``(seed, epoch)``, shards across ranks
itself (so Lightning never wraps it in a ``DistributedSampler``), and saves its position in the checkpoint, so a
run resumed with ``--ckpt_path last`` sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from p2o_lightning.tasks import Problem, get_task

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _prompt_text(value: Any) -> str | None:
    """A prompt is a string, or a chat message list (verl's format) whose last user message is the prompt."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user"]
        return users[-1] if users and isinstance(users[-1], str) else None
    return None


def load_problems(path: str | os.PathLike, prompt_key: str = "prompt", answer_key: str = "answer") -> list[Problem]:
    """Read a data file with ``datasets`` and check every row; errors name the file, the row and the key."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use one of {sorted(_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    import datasets

    ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    for key in (prompt_key, answer_key):
        if key not in ds.column_names:
            raise ValueError(f"{path}: no column {key!r} (columns: {ds.column_names})")
    problems = []
    for i, row in enumerate(ds):
        prompt = _prompt_text(row[prompt_key])
        answer = row[answer_key]
        if isinstance(answer, dict) and "ground_truth" in answer:  # verl's reward_model column
            answer = answer["ground_truth"]
        if not prompt or not prompt.strip():
            raise ValueError(f"{path}: row {i} has no usable {prompt_key!r} (got {row[prompt_key]!r})")
        if answer is None or not str(answer).strip():
            raise ValueError(f"{path}: row {i} has no {answer_key!r} (got {answer!r})")
        problems.append(Problem(prompt=prompt, answer=str(answer).strip()))
    if not problems:
        raise ValueError(f"{path}: no rows")
    return problems


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


def _private_generator() -> torch.Generator:
    """A loader's own generator: starting an iterator draws a seed from it, never from the global RNG.

    Otherwise every ``iter(loader)`` (a resumed epoch, each validation) would shift the sampling RNG and a resumed
    run would sample different rollouts than the uninterrupted one.
    """
    return torch.Generator().manual_seed(0)


class PromptStream(IterableDataset):
    """Batches of prompts for one rank: shuffled per epoch, sharded, resumable at a batch boundary."""

    def __init__(self, problems: list[Problem], batch_size: int, seed: int, split: str, shuffle: bool = True) -> None:
        self.problems = problems
        self.batch_size = batch_size
        self.seed = seed
        self.split = split
        self.shuffle = shuffle
        self.epoch = 0  # the epoch being (or last) iterated
        self.yielded = 0  # batches of that epoch handed out so far

    def __len__(self) -> int:
        _, world = _rank_and_world()
        return len(self.problems) // (self.batch_size * world)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.problems)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.problems), generator=g).tolist()

    def __iter__(self) -> Iterator[list[dict]]:
        rank, world = _rank_and_world()
        n_batches = len(self)
        if self.yielded >= n_batches:  # the last pass was complete: this one is the next epoch
            self.epoch += 1
            self.yielded = 0
        order = self._order(self.epoch)
        per_step = self.batch_size * world
        for b in range(self.yielded, n_batches):
            self.yielded = b + 1
            rows = order[b * per_step : (b + 1) * per_step][rank::world]
            yield [
                {"prompt": self.problems[i].prompt, "answer": self.problems[i].answer, "index": i, "split": self.split}
                for i in rows
            ]

    # Lightning does not prefetch from a loader that has a length, so every batch handed out has been (or is being)
    # trained on when a checkpoint is written: the position to resume from is the number handed out.
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.yielded = int(state["consumed"])


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`PromptStream` that Lightning saves and restores with the checkpoint."""

    def __init__(self, stream: PromptStream) -> None:
        super().__init__(stream, batch_size=None, collate_fn=_as_list, num_workers=0, generator=_private_generator())

    def state_dict(self) -> dict[str, int]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.dataset.load_state_dict(state)


class PromptDataModule(L.LightningDataModule):
    """Training prompts and named validation splits for a verifiable task.

    Args:
        task: the verifiable task's name (``addition`` is the embedded world, ``math`` uses math-verify).
        train_file: JSON / JSONL / Parquet / CSV with a prompt and an answer per row. None: the embedded world's
            training split (task ``addition`` only).
        val_files: validation splits by name, e.g. ``{"in_dist": dev.jsonl, "ood": aime24.jsonl}``. None: the
            embedded world's ``in_dist`` (held-out easy + hard, each also reported on its own as ``easy`` and
            ``hard``) and ``ood`` splits.
        prompt_key: the column holding the prompt (a string, or a chat message list whose last user turn is used).
        answer_key: the column holding the gold answer (verl's ``reward_model`` dict is accepted too).
        batch_size: prompts per optimizer step on each device (each gets K rollouts).
        val_batch_size: prompts per validation batch.
        max_val_samples: keep at most this many problems of each validation split (None: all).
        seed: seed of the training order (shuffled anew each epoch).
        world_seed: seed of the embedded world's splits.
    """

    def __init__(
        self,
        task: str = "addition",
        train_file: str | None = None,
        val_files: dict[str, str] | None = None,
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        batch_size: int = 8,
        val_batch_size: int = 32,
        max_val_samples: int | None = None,
        seed: int = 0,
        world_seed: int = 0,
    ) -> None:
        super().__init__()
        get_task(task)  # fail on an unknown task before anything else
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(f"batch_size and val_batch_size must be >= 1, got {batch_size} and {val_batch_size}")
        if train_file is None and task != "addition":
            raise ValueError(f"task={task!r} has no embedded data: set data.train_file (and data.val_files)")
        self.task = task
        self.train_file, self.val_files = train_file, val_files
        self.prompt_key, self.answer_key = prompt_key, answer_key
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.max_val_samples = max_val_samples
        self.seed, self.world_seed = seed, world_seed
        self.train_problems: list[Problem] = []
        self.val_problems: dict[str, list[Problem]] = {}
        self.val_subsets: dict[str, list[str]] = {}  # split -> per-problem subset name, reported on its own too
        self._train_stream: PromptStream | None = None
        self._extra_stream: PromptStream | None = None  # dynamic sampling's extra rounds (checkpointed)
        self._extra_iter: Iterator[list[dict]] | None = None
        self._extra_state: dict[str, int] | None = None

    def setup(self, stage: str) -> None:
        if self.train_problems:
            return
        if self.train_file is None or self.val_files is None:
            from p2o_lightning.tasks.addition import world_splits

            splits = world_splits(self.world_seed)
        if self.train_file is None:
            self.train_problems = splits["train"]
        else:
            self.train_problems = load_problems(self.train_file, self.prompt_key, self.answer_key)
        if self.val_files is None:
            self.val_problems = {"in_dist": splits["easy"] + splits["hard"], "ood": splits["ood"]}
            self.val_subsets = {"in_dist": ["easy"] * len(splits["easy"]) + ["hard"] * len(splits["hard"])}
        else:
            self.val_problems = {
                name: load_problems(path, self.prompt_key, self.answer_key) for name, path in self.val_files.items()
            }
        if self.max_val_samples is not None:
            self.val_problems = {k: v[: self.max_val_samples] for k, v in self.val_problems.items()}
            self.val_subsets = {k: v[: self.max_val_samples] for k, v in self.val_subsets.items()}
        _, world = _rank_and_world()
        if len(self.train_problems) < self.batch_size * world:
            raise ValueError(
                f"{len(self.train_problems)} training problems cannot fill one step of batch_size={self.batch_size}"
                f" on {world} device(s)"
            )

    @property
    def val_split_names(self) -> list[str]:
        """The names validation metrics are reported under: the splits, then their subsets."""
        subsets = sorted({name for names in self.val_subsets.values() for name in names} - set(self.val_problems))
        return [*self.val_problems, *subsets]

    def train_dataloader(self) -> ResumableLoader:
        if self._train_stream is None:
            self._train_stream = PromptStream(self.train_problems, self.batch_size, self.seed, "train")
        return ResumableLoader(self._train_stream)

    def extra_batch(self) -> list[dict]:
        """The next batch of this rank's *extra* prompts, for dynamic sampling's further rounds (DAPO).

        A second stream over the training problems, shuffled with its own seed and epochs, so that drawing more
        prompts never shifts the training loader's order; its position is saved with the checkpoint
        (:meth:`state_dict`), so a resumed run draws the same extra prompts.
        """
        if self._extra_stream is None:
            self._extra_stream = PromptStream(self.train_problems, self.batch_size, self.seed + 1, "train")
            if self._extra_state is not None:
                self._extra_stream.load_state_dict(self._extra_state)
        for _ in range(2):  # a finished epoch starts the next one
            if self._extra_iter is None:
                self._extra_iter = iter(self._extra_stream)
            try:
                return next(self._extra_iter)
            except StopIteration:
                self._extra_iter = None
        raise ValueError(f"the training data cannot fill one batch of batch_size={self.batch_size}")

    def state_dict(self) -> dict[str, Any]:
        stream = self._extra_stream
        return {"extra_stream": stream.state_dict()} if stream is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._extra_state = state.get("extra_stream")
        self._extra_stream, self._extra_iter = None, None

    def _eval_loaders(self) -> list[DataLoader]:
        rank, world = _rank_and_world()
        loaders = []
        for name, problems in self.val_problems.items():
            rows = [
                {"prompt": p.prompt, "answer": p.answer, "index": i, "split": name, "subset": subsets[i]}
                for subsets in [self.val_subsets.get(name) or [None] * len(problems)]
                for i, p in enumerate(problems)
                if i % world == rank
            ]
            loaders.append(
                DataLoader(rows, batch_size=self.val_batch_size, collate_fn=_as_list, generator=_private_generator())
            )
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()
