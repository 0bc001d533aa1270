"""Tasks: what a model is asked, what one of its answers is, and how the answers are scored.

A task is one module that builds a `Task` and one line in `TASKS`. The driver, dispatch, timing,
results and the framing of collect and report never name a task: they call its functions. A job's
`task:` picks one; it defaults to `classification`.
"""

from __future__ import annotations

from runner.tasks import causal_lm, classification
from runner.tasks.task import Scored, Targets, Task

TASKS: dict[str, Task] = {task.name: task for task in [classification.TASK, causal_lm.TASK]}
DEFAULT_TASK = "classification"

__all__ = ["DEFAULT_TASK", "TASKS", "Scored", "Targets", "Task"]
