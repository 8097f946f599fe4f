"""Grading rollouts safely: a reward function that raises or hangs must not stop training.

Every response is scored by ``task.score(response, answer)`` in a worker thread with a timeout. An exception, a
reward that is not a number or not finite, or a return value that is not a ``Score`` scores 0, is counted and is
logged once per kind (exception type); a call that outlives ``timeout`` scores 0 and is counted too
(its thread is abandoned: Python cannot kill a thread, so a grader that hangs forever leaks one worker).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
from dataclasses import dataclass, field

from p2o_lightning.tasks.base import Score, Task

log = logging.getLogger(__name__)


@dataclass
class GradeResult:
    rewards: list[float]
    feedback: list[str]
    errors: int = 0  # reward calls that raised
    timeouts: int = 0  # reward calls that did not return within the timeout
    messages: list[str] = field(default_factory=list)


class SafeGrader:
    """Scores responses with ``task.score`` in a thread pool, with a per-call timeout in seconds."""

    def __init__(self, task: Task, timeout: float = 10.0, max_workers: int = 4) -> None:
        if timeout <= 0:
            raise ValueError(f"reward_timeout must be > 0 seconds, got {timeout}")
        self.task = task
        self.timeout = timeout
        self.max_workers = max_workers
        self._pool: cf.ThreadPoolExecutor | None = None
        self._seen_errors: set[str] = set()

    def _executor(self) -> cf.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(self.max_workers, thread_name_prefix="reward")
        return self._pool

    def grade(self, responses: list[str], answers: list[str]) -> GradeResult:
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        pool = self._executor()
        futures = [pool.submit(self.task.score, r, a) for r, a in zip(responses, answers)]
        result = GradeResult([], [])
        hung = False
        for i, fut in enumerate(futures):
            try:
                score = fut.result(timeout=self.timeout)
                if not isinstance(score, Score):
                    raise TypeError(f"task.score returned {type(score).__name__}, expected Score")
                reward = float(score.reward)  # a non-number raises here
                if not math.isfinite(reward):
                    raise ValueError(f"task.score returned a non-finite reward ({reward})")
                result.rewards.append(reward)
                result.feedback.append(score.feedback)
            except cf.TimeoutError:
                hung = True
                result.timeouts += 1
                result.rewards.append(0.0)
                result.feedback.append(f"The grader timed out after {self.timeout}s.")
                self._warn(
                    "timeout", f"reward function {self.task.name!r} timed out after {self.timeout}s on response {i}"
                )
            except Exception as err:  # a buggy grader must not kill the run: score 0, count, log once
                result.errors += 1
                result.rewards.append(0.0)
                result.feedback.append("The grader failed on this response.")
                self._warn(type(err).__name__, f"reward function {self.task.name!r} raised {type(err).__name__}: {err}")
        if hung:  # do not queue new work behind hung threads
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        return result

    def _warn(self, kind: str, message: str) -> None:
        """Log the first failure of each kind (a timeout, an exception type); later ones are only counted."""
        if kind not in self._seen_errors:
            self._seen_errors.add(kind)
            log.warning(f"{message} (scored 0; further failures of this kind are counted in train/reward_errors or "
                        f"train/reward_timeouts, not logged)")  # fmt: skip

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
