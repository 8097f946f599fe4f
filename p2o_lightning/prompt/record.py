"""``SearchRecord``: what one P²O template search found and cost, and the one place that knows its file format.

A search (:func:`~p2o_lightning.prompt.search.search_templates`) returns a record;
:func:`~p2o_lightning.prompt.search.run_search` places it in the run (``rollout_step``, ``epoch``) and writes it to
``<run>/p2o/search_<index>.json`` (:meth:`SearchRecord.write`, atomic), and the P²O schedule keeps it in the
checkpoint (:meth:`SearchRecord.to_dict` / :meth:`SearchRecord.from_dict`). The run's plots, the report and the
experiment read the records back with :func:`read_records`; a run started from an earlier run's templates (the
callback's ``template_pool``) reads them with :func:`read_assignments`. A search that failed (a teacher that went
down) leaves a record with ``error`` set and nothing else found.

Fields, in the file's order:
    rollout_step, epoch: where in the run the search ran.
    num_hard, num_train, num_dev: the hard pool, and its split into GEPA's train and dev sets.
    templates: the candidates in discovery order; candidate 0 is the seed, the empty template (the plain prompt).
    parents: each candidate's parent candidates.
    dev_mean: each candidate's mean dev score (greedy, 0/1, the policy at search time).
    dev_scores: each candidate's score per dev prompt.
    pareto_front: per dev prompt, the candidates with its best score.
    discovery_eval_counts: metric calls spent when each candidate was found.
    metric_calls: examples scored (gepa's budget unit); evaluations: scorer calls.
    cover: the set cover of the dev prompts by the candidates (:func:`~p2o_lightning.prompt.assignment.template_cover`).
    assignments: each hard prompt's K templates.
    seconds, cpu_seconds: the search's wall time and this process's CPU time.
    error: why the search was skipped (None when it ran).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class SearchRecord:
    """One template search: its candidates and their dev scores, the assignments it made, and its cost."""

    rollout_step: int = -1
    epoch: int = -1
    num_hard: int = 0
    num_train: int = 0
    num_dev: int = 0
    templates: list[str] = dataclasses.field(default_factory=list)
    parents: list[list[int | None]] = dataclasses.field(default_factory=list)
    dev_mean: list[float] = dataclasses.field(default_factory=list)
    dev_scores: list[dict[str, float]] = dataclasses.field(default_factory=list)
    pareto_front: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    discovery_eval_counts: list[int] = dataclasses.field(default_factory=list)
    metric_calls: int = 0
    evaluations: int = 0
    cover: list[int] = dataclasses.field(default_factory=list)
    assignments: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = float("nan")  # unknown in a record of a version before it was measured
    error: str | None = None

    @classmethod
    def skipped(cls, rollout_step: int, epoch: int, error: str) -> SearchRecord:
        """The record of a search that could not run: no candidates, no assignments."""
        return cls(rollout_step=rollout_step, epoch=epoch, cpu_seconds=0.0, error=error)

    @property
    def best(self) -> int | None:
        """The candidate with the best mean dev score (the first of equals); None without candidates."""
        return max(range(len(self.dev_mean)), key=self.dev_mean.__getitem__) if self.dev_mean else None

    @property
    def best_dev_score(self) -> float:
        """The best candidate's mean dev score; 0 for a search without candidates."""
        return max(self.dev_mean, default=0.0)

    def ranked(self, top: int) -> list[int]:
        """The ``top`` candidates by mean dev score, best first."""
        return sorted(range(len(self.dev_mean)), key=lambda c: -self.dev_mean[c])[:top]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (what a checkpoint holds and the file says)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchRecord:
        """A record from :meth:`to_dict`'s form; a field a record of an older version lacks takes its default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"a search record has unknown fields {unknown}")
        return cls(**data)

    def write(self, folder: str | os.PathLike, index: int) -> Path:
        """``<folder>/search_<index>.json``, written to a temporary file and then moved into place."""
        path = Path(folder) / f"search_{index:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> SearchRecord:
        """The record in ``path``; a ValueError names the file when it is not one."""
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ValueError(f"{path}: cannot be read ({err})") from err
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a search record ({err})") from err


def record_paths(run: str | os.PathLike) -> list[Path]:
    """A run folder's search record files, in the order the searches ran."""
    return sorted((Path(run) / "p2o").glob("search_*.json"))


def read_records(run: str | os.PathLike, strict: bool = True) -> list[SearchRecord]:
    """Every search record of a run folder, in order; ``strict=False`` passes over a file that is not one (a
    record of another format, or a copy cut short).
    """
    records = []
    for path in record_paths(run):
        try:
            records.append(SearchRecord.read(path))
        except ValueError:
            if strict:
                raise
    return records


def read_assignments(path: str | os.PathLike, k: int) -> dict[str, list[str]]:
    """The template assignments ``{prompt: [K templates]}`` of a record file: a ``p2o/search_*.json`` of an earlier
    run, or a file of only ``{"assignments": {...}}`` (a record whose other fields take their defaults). A ValueError
    names the file when it is not a record, assigns nothing, or a prompt does not hold K template strings.
    """
    assignments = SearchRecord.read(path).assignments
    if not isinstance(assignments, dict) or not assignments:
        raise ValueError(f"{path}: expected a non-empty 'assignments' mapping of prompts to templates")
    for prompt, templates in assignments.items():
        if not (isinstance(templates, list) and len(templates) == k and all(isinstance(t, str) for t in templates)):
            raise ValueError(f"{path}: prompt {prompt[:40]!r} must map to a list of K={k} template strings")
    return {prompt: list(templates) for prompt, templates in assignments.items()}
