"""Tasks: what a model is asked, what one of its answers is, and how the answers are scored.

A task is one package that declares a `Task` (runner/tasks/task.py) and registers it here. The
spec, the plan, the driver, dispatch, timing, the results files and the framing of collect and
report never name a task: they ask its declaration, and a variant's process its worker. A job's
`task:` picks one; it defaults to `classification`.
"""

from __future__ import annotations

from runner.tasks import causal_lm, classification
from runner.tasks.task import Scored, Targets, Task, Tolerance

TASKS: dict[str, Task] = {}
DEFAULT_TASK = "classification"


def register(task: Task) -> None:
    """Adds a task under its name. Registering the same task again (its module imported once
    more, in a worker) changes nothing; another task under a taken name is refused."""
    known = TASKS.get(task.name)
    if known is not None and type(known) is not type(task):
        raise ValueError(f"a task named {task.name!r} is registered already: {type(known)}")
    TASKS.setdefault(task.name, task)


def tolerances() -> dict[str, Tolerance]:
    """Every tolerance a job may state, by name: each task's, in the order the tasks name them
    (the first description of a name stands)."""
    found: dict[str, Tolerance] = {}
    for task in TASKS.values():
        for tolerance in task.tolerances:
            found.setdefault(tolerance.name, tolerance)
    return found


def task_of_model(config: dict) -> Task | None:
    """The task whose kind of model every one of the model's saved architectures is; None where
    no task claims them all."""
    saved = [str(a) for a in config.get("architectures") or []]
    claims = [t for t in TASKS.values() if t.architectures and saved]
    return next((t for t in claims if all(a.endswith(t.architectures) for a in saved)), None)


register(classification.TASK)
register(causal_lm.TASK)

__all__ = ["DEFAULT_TASK", "TASKS", "Scored", "Targets", "Task", "register", "tolerances"]
