"""Verifiable tasks by name: the embedded ``addition`` world and ``math`` (math-verify)."""

from __future__ import annotations

from p2o_lightning.tasks.base import Problem, Score, Task, apply_template, feedback_sentence

TASKS = ("addition", "math")


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name is a ValueError that lists the known ones."""
    if name == "addition":
        from p2o_lightning.tasks.addition import AdditionTask

        return AdditionTask()
    if name == "math":
        from p2o_lightning.tasks.math import MathTask

        return MathTask()
    raise ValueError(f"task={name!r} is unknown; choose one of {TASKS}")


__all__ = ["TASKS", "Problem", "Score", "Task", "apply_template", "feedback_sentence", "get_task"]
