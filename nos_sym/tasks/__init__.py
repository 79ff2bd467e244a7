"""What a rule is scored on: the task interface (:mod:`nos_sym.tasks.base`), the built-in tasks
(``child``, ``rosenbrock``, ``wrn``, ``seq``) and :func:`get_task`, which resolves ``--task``.

The names below are imported on first use, so ``nos_sym.tasks`` costs nothing until a task runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "FunctionTask": "nos_sym.tasks.base",
    "Task": "nos_sym.tasks.base",
    "TaskRun": "nos_sym.tasks.base",
    "evaluate_rule": "nos_sym.tasks.base",
    "ChildTask": "nos_sym.tasks.child",
    "RosenbrockTask": "nos_sym.tasks.rosenbrock",
    "DEFAULT_TASK": "nos_sym.tasks.registry",
    "TASKS": "nos_sym.tasks.registry",
    "TaskError": "nos_sym.tasks.registry",
    "get_task": "nos_sym.tasks.registry",
}

if TYPE_CHECKING:
    from nos_sym.tasks.base import FunctionTask, Task, TaskRun, evaluate_rule
    from nos_sym.tasks.child import ChildTask
    from nos_sym.tasks.registry import DEFAULT_TASK, TASKS, TaskError, get_task
    from nos_sym.tasks.rosenbrock import RosenbrockTask


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nos_sym.tasks' has no attribute {name!r}")


__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "ChildTask",
    "FunctionTask",
    "RosenbrockTask",
    "Task",
    "TaskError",
    "TaskRun",
    "evaluate_rule",
    "get_task",
]
