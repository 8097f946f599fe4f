"""Prompts and gold answers for RLVR: the embedded world's splits, or your own JSON / JSONL / Parquet / CSV files.

A batch is a plain ``list[dict]`` of ``{"prompt", "answer", "index", "split"}``: RL batches are prompts, not
tensors; tokenization happens in the rollout engine. Every row is checked before training starts: an empty file,
a line that is not JSON, a row without a prompt or an answer is an error naming the file and every bad row (up to
ten, then a count). Answers written as numbers are taken as their text. Once the model is known, every prompt is
checked against its positions (:meth:`PromptDataModule.fit_to_positions`, :mod:`p2o_lightning.overlong`): too long is an
error naming the file and rows, or, with ``filter_overlong_prompts``, the rows are dropped and counted.

The training loader is resumable: its batch sampler shuffles with a generator seeded by ``(seed, epoch)``, shards
across ranks itself (so Lightning never wraps it in a ``DistributedSampler``), and saves its position in the
checkpoint, so a run resumed with ``--ckpt_path last`` sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from p2o_lightning.overlong import fit_split, prompt_limit
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


MAX_LISTED_ERRORS = 10  # bad rows listed in one error; the rest are counted


def _read_json(path: Path, text: str) -> list[tuple[str, Any]]:
    """(location, row) pairs of a JSON array or a JSON-lines file; a line that does not parse is a row whose value
    is the error, so that every bad line is reported at once.
    """
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return [(f"row {i}", row) for i, row in enumerate(data)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as err:
            rows.append((f"line {n}", ValueError(f"not valid JSON ({err.msg} at column {err.colno})")))
    return rows


def _read_rows(path: Path, fmt: str) -> list[tuple[str, Any]]:
    if fmt == "json":
        return _read_json(path, path.read_text(encoding="utf-8"))
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)  # every value stays text: "007" is not the number 7
            return [(f"row {i} (line {reader.line_num})", row) for i, row in enumerate(reader)]
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise ValueError(f"{path}: cannot be read as Parquet ({type(err).__name__}: {err})") from err
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def load_problems(path: str | os.PathLike, prompt_key: str = "prompt", answer_key: str = "answer") -> list[Problem]:
    """Read a data file and check every row; errors name the file, every bad row (up to a limit) and the key.

    JSON (an array, or JSON lines), JSONL, CSV (read as text) and Parquet. An answer written as a number (``42``)
    is accepted as its text (``"42"``).
    """
    return load_problem_rows(path, prompt_key, answer_key)[0]


def load_problem_rows(
    path: str | os.PathLike, prompt_key: str = "prompt", answer_key: str = "answer"
) -> tuple[list[Problem], list[str]]:
    """:func:`load_problems`, and where each problem is in the file (``line 3``, ``row 2 (line 4)``)."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use one of {sorted(_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        rows = _read_rows(path, fmt)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    if not rows:
        raise ValueError(f"{path}: the file is empty (no rows)")
    columns = {k for _, row in rows if isinstance(row, dict) for k in row}
    for key in (prompt_key, answer_key):
        if columns and key not in columns:
            raise ValueError(f"{path}: no column {key!r} (columns: {sorted(columns)})")
    problems, where_each, bad = [], [], []
    for where, row in rows:
        if isinstance(row, Exception):
            bad.append(f"{where}: {row}")
            continue
        if not isinstance(row, dict):
            bad.append(f"{where}: not an object with {prompt_key!r} and {answer_key!r} (got {row!r:.60})")
            continue
        prompt = _prompt_text(row.get(prompt_key))
        answer = row.get(answer_key)
        if isinstance(answer, dict) and "ground_truth" in answer:  # verl's reward_model column
            answer = answer["ground_truth"]
        problems_here = []
        if not prompt or not prompt.strip():
            problems_here.append(f"no usable {prompt_key!r} (got {row.get(prompt_key)!r:.60})")
        if _missing(answer) or isinstance(answer, (dict, list)):
            problems_here.append(f"no {answer_key!r} (got {answer!r:.60})")
        if problems_here:
            bad.append(f"{where}: " + "; ".join(problems_here))
            continue
        problems.append(Problem(prompt=prompt, answer=str(answer).strip()))
        where_each.append(where)
    if bad:
        listed = "\n  ".join(bad[:MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(bad) - MAX_LISTED_ERRORS} more" if len(bad) > MAX_LISTED_ERRORS else ""
        raise ValueError(f"{path}: {len(bad)} of {len(rows)} rows are unusable:\n  {listed}{more}")
    return problems, where_each


def _numbered(problems: list[Problem]) -> list[str]:
    return [f"problem {i}" for i in range(len(problems))]


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


def _private_generator() -> torch.Generator:
    """A loader's own generator: starting an iterator draws a seed from it, never from the global RNG.

    Otherwise every ``iter(loader)`` (a resumed epoch, each validation) would shift the sampling RNG and a resumed
    run would sample different rollouts than the uninterrupted one.
    """
    return torch.Generator().manual_seed(0)


class PromptBatches(Sampler[list[int]]):
    """The training order of one rank, as batches of row indices: shuffled per epoch, sharded, resumable at a batch
    boundary. A batch sampler over a list of rows, so Lightning sees a map-style loader with an exact length.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0  # the epoch being (or last) iterated
        self.yielded = 0  # batches of that epoch handed out so far

    def __len__(self) -> int:
        _, world = _rank_and_world()
        return self.num_rows // (self.batch_size * world)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = _rank_and_world()
        n_batches = len(self)
        if self.yielded >= n_batches:  # the last pass was complete: this one is the next epoch
            self.epoch += 1
            self.yielded = 0
        order = self._order(self.epoch)
        per_step = self.batch_size * world
        for b in range(self.yielded, n_batches):
            self.yielded = b + 1
            yield order[b * per_step : (b + 1) * per_step][rank::world]

    # Lightning does not prefetch from a loader that has a length, so every batch handed out has been (or is being)
    # trained on when a checkpoint is written: the position to resume from is the number handed out.
    def state_dict(self) -> dict[str, int]:
        _, world = _rank_and_world()
        return {"epoch": self.epoch, "consumed": self.yielded, "world": world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the checkpoint's place in the epoch's order; on another number of ranks a step holds another
        number of prompts, so the place is counted in prompts and rounded down to a whole step (a few may repeat).
        """
        _, world = _rank_and_world()
        self.epoch = int(state["epoch"])
        self.yielded = int(state["consumed"]) * int(state.get("world", world)) // world


def problem_rows(problems: list[Problem], split: str) -> list[dict]:
    """The rows a batch is made of: ``{"prompt", "answer", "index", "split"}``."""
    return [{"prompt": p.prompt, "answer": p.answer, "index": i, "split": split} for i, p in enumerate(problems)]


class ResumableLoader(DataLoader):
    """A DataLoader over training rows in :class:`PromptBatches` order, saved and restored with the checkpoint."""

    def __init__(self, rows: list[dict], batches: PromptBatches) -> None:
        generator = _private_generator()
        super().__init__(rows, batch_sampler=batches, collate_fn=_as_list, num_workers=0, generator=generator)

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


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
        max_prompt_length: the most tokens a prompt may have (as the rollout engine encodes it: chat template and
            special tokens included). None: the model's positions (``max_position_embeddings``, or vLLM's
            ``max_model_len``) minus ``model.rollout.max_new_tokens`` (``model.validation.max_new_tokens`` for
            validation splits), which also caps a larger value. Checked for every split when the model is set up.
        filter_overlong_prompts: drop the prompts longer than that, with a warning counting them per file (verl's
            ``filter_overlong_prompts``). False: such a prompt is an error naming its file and row.
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
        max_prompt_length: int | None = None,
        filter_overlong_prompts: bool = False,
    ) -> None:
        super().__init__()
        get_task(task)  # fail on an unknown task before anything else
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(f"batch_size and val_batch_size must be >= 1, got {batch_size} and {val_batch_size}")
        if max_prompt_length is not None and max_prompt_length < 1:
            raise ValueError(
                f"data.max_prompt_length must be >= 1 (or null: the model's positions): {max_prompt_length}"
            )
        if train_file is None and task != "addition":
            raise ValueError(f"task={task!r} has no embedded data: set data.train_file (and data.val_files)")
        for name in val_files or {}:
            if not isinstance(name, str) or not name.strip() or "/" in name or name != name.strip():
                raise ValueError(
                    f"data.val_files: split name {name!r} cannot name metrics (val/<split>/greedy_acc): use a "
                    "non-empty name without '/' or surrounding spaces"
                )
        self.task = task
        self.train_file, self.val_files = train_file, val_files
        self.prompt_key, self.answer_key = prompt_key, answer_key
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.max_val_samples = max_val_samples
        self.seed, self.world_seed = seed, world_seed
        self.max_prompt_length, self.filter_overlong_prompts = max_prompt_length, filter_overlong_prompts
        self.rows: dict[str, tuple[str, list[str]]] = {}  # split -> (its file, where each problem is in it)
        self.dropped_prompts: dict[str, int] = {}  # split -> overlong prompts dropped (filter_overlong_prompts)
        self._fitted_splits: set[str] = set()  # splits checked by fit_to_positions
        self.train_problems: list[Problem] = []
        self.val_problems: dict[str, list[Problem]] = {}
        self.val_subsets: dict[str, list[str]] = {}  # split -> per-problem subset name, reported on its own too
        self._train_batches: PromptBatches | None = None
        self._extra_batches: PromptBatches | None = None  # dynamic sampling's extra rounds (checkpointed)
        self._extra_iter: Iterator[list[int]] | None = None
        self._extra_state: dict[str, int] | None = None

    def setup(self, stage: str) -> None:
        if self.train_problems:
            return
        if self.train_file is None or self.val_files is None:
            from p2o_lightning.tasks.addition import world_splits

            splits = world_splits(self.world_seed)
        if self.train_file is None:
            self.train_problems = splits["train"]
            self.rows["train"] = ("the embedded world's training split", _numbered(self.train_problems))
        else:
            self.train_problems, where = load_problem_rows(self.train_file, self.prompt_key, self.answer_key)
            self.rows["train"] = (str(self.train_file), where)
        if self.val_files is None:
            self.val_problems = {"in_dist": splits["easy"] + splits["hard"], "ood": splits["ood"]}
            self.val_subsets = {"in_dist": ["easy"] * len(splits["easy"]) + ["hard"] * len(splits["hard"])}
            for name, problems in self.val_problems.items():
                self.rows[name] = (f"the embedded world's {name} split", _numbered(problems))
        else:
            for name, path in self.val_files.items():
                self.val_problems[name], where = load_problem_rows(path, self.prompt_key, self.answer_key)
                self.rows[name] = (str(path), where)
        if self.max_val_samples is not None:
            self.val_problems = {k: v[: self.max_val_samples] for k, v in self.val_problems.items()}
            self.val_subsets = {k: v[: self.max_val_samples] for k, v in self.val_subsets.items()}
        self._check_enough_training_problems()

    def _check_enough_training_problems(self) -> None:
        _, world = _rank_and_world()
        if len(self.train_problems) < self.batch_size * world:
            dropped = self.dropped_prompts.get("train")
            why = f" ({dropped} overlong prompts were dropped)" if dropped else ""
            raise ValueError(
                f"{len(self.train_problems)} training problems{why} cannot fill one step of "
                f"batch_size={self.batch_size} on {world} device(s)"
            )

    def fit_to_positions(
        self,
        prompt_lengths: Callable[[list[str]], list[int]],
        positions: int | None,
        response_tokens: int,
        val_response_tokens: int,
        train: bool = True,
    ) -> None:
        """Check the prompts of every split against the model's positions (:mod:`p2o_lightning.overlong`), each
        split once, after :meth:`setup`; the training split only when ``train`` (a fit).

        ``prompt_lengths`` counts prompts as the rollout engine encodes them; ``positions`` is the model's number of
        positions (None: unknown); the response budgets are ``max_new_tokens`` for training and validation. A prompt
        over its split's limit is an error naming its file and row, or, with ``filter_overlong_prompts``, dropped and
        counted.
        """
        splits = {"train": self.train_problems} if train else {}
        splits.update(self.val_problems)
        for split, problems in splits.items():
            if split in self._fitted_splits:
                continue
            self._fitted_splits.add(split)
            budget = response_tokens if split == "train" else val_response_tokens
            limit, why = prompt_limit(positions, budget, self.max_prompt_length)
            if limit is None:
                continue
            source, where = self.rows[split][0], self.rows[split][1][: len(problems)]  # max_val_samples: the first
            lengths = prompt_lengths([p.prompt for p in problems])
            keep = fit_split(source, where, lengths, limit, why, self.filter_overlong_prompts)
            if len(keep) == len(problems):
                continue
            self.dropped_prompts[split] = len(problems) - len(keep)
            self.rows[split] = (source, [where[i] for i in keep])
            if split == "train":
                self.train_problems = [problems[i] for i in keep]
                continue
            self.val_problems[split] = [problems[i] for i in keep]
            if split in self.val_subsets:
                self.val_subsets[split] = [self.val_subsets[split][i] for i in keep]
        self._check_enough_training_problems()

    @property
    def val_split_names(self) -> list[str]:
        """The names validation metrics are reported under: the splits, then their subsets."""
        subsets = sorted({name for names in self.val_subsets.values() for name in names} - set(self.val_problems))
        return [*self.val_problems, *subsets]

    def train_dataloader(self) -> ResumableLoader:
        if self._train_batches is None:
            self._train_batches = PromptBatches(len(self.train_problems), self.batch_size, self.seed)
        return ResumableLoader(problem_rows(self.train_problems, "train"), self._train_batches)

    def extra_batch(self) -> list[dict]:
        """The next batch of this rank's *extra* prompts, for dynamic sampling's further rounds (DAPO).

        A second stream over the training problems, shuffled with its own seed and epochs, so that drawing more
        prompts never shifts the training loader's order; its position is saved with the checkpoint
        (:meth:`state_dict`), so a resumed run draws the same extra prompts.
        """
        if self._extra_batches is None:
            self._extra_batches = PromptBatches(len(self.train_problems), self.batch_size, self.seed + 1)
            if self._extra_state is not None:
                self._extra_batches.load_state_dict(self._extra_state)
        for _ in range(2):  # a finished epoch starts the next one
            if self._extra_iter is None:
                self._extra_iter = iter(self._extra_batches)
            try:
                return [
                    {"prompt": self.train_problems[i].prompt, "answer": self.train_problems[i].answer, "index": i,
                     "split": "train"} for i in next(self._extra_iter)
                ]  # fmt: skip
            except StopIteration:
                self._extra_iter = None
        raise ValueError(f"the training data cannot fill one batch of batch_size={self.batch_size}")

    def state_dict(self) -> dict[str, Any]:
        batches = self._extra_batches
        return {"extra_stream": batches.state_dict()} if batches is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._extra_state = state.get("extra_stream")
        self._extra_batches, self._extra_iter = None, None

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
