"""Tasks by name: the built-in tasks (:data:`TASKS`) and user tasks named ``module:attribute``,
resolved by :func:`get_task` from the text a user types after ``--task``.

A spec is ``NAME`` or ``NAME,option=value,...`` for a built-in task (its options are the fields of
its dataclass, e.g. ``wrn,width=2``), or ``package.module:attribute`` for your own: the attribute
is a :class:`~nos_sym.tasks.base.Task` instance, or a class or function that returns one when
called without arguments. The module is imported (it runs as any import does); nothing else in
the spec is evaluated.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from nos_sym.errors import UserError
from nos_sym.tasks.base import Task

__all__ = ["DEFAULT_TASK", "TASKS", "TaskError", "get_task"]

TASKS: dict[str, str] = {
    "child": "nos_sym.tasks.child:ChildTask",
    "rosenbrock": "nos_sym.tasks.rosenbrock:RosenbrockTask",
    "wrn": "nos_sym.tasks.wrn:WideResNetTask",
    "seq": "nos_sym.tasks.seq:TranslationTask",
}
"""Built-in task names → ``module:class`` (imported on first use)."""
DEFAULT_TASK = "child"


class TaskError(UserError, ValueError):
    """A task spec that names no task, or options the task does not have."""


def _attribute(target: str) -> Any:
    module, _, attribute = target.partition(":")
    try:
        value: Any = importlib.import_module(module)
    except ImportError as error:
        raise TaskError(f"task {target!r}: cannot import {module!r} ({error})") from None
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise TaskError(f"task {target!r}: {module!r} has no attribute {attribute!r}")
        value = getattr(value, part)
    return value


def _converted(cls: type, name: str, text: str) -> Any:
    """``text`` as the type of the field ``name``'s default (int, float, bool or str)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        known = ", ".join(fields) or "none"
        raise TaskError(f"task {cls.name!r} has no option {name!r} (options: {known})")
    default = fields[name].default
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return type(default)(text) if isinstance(default, int | float | str) else text
    except ValueError:
        kind = type(default).__name__
        raise TaskError(f"task option {name}={text!r} is not a {kind}") from None


def get_task(spec: str | Task = DEFAULT_TASK, *, dataset: str | None = None) -> Task:
    """The task ``spec`` names (a :class:`Task` passes through). ``dataset``, when given, sets the
    ``dataset`` option of a built-in task that has one and whose spec does not set it (the
    ``--dataset`` shorthand)."""
    if isinstance(spec, Task):
        return spec
    spec = spec.strip()
    if ":" in spec:
        value = _attribute(spec)
        task = value if isinstance(value, Task) else value() if callable(value) else None
        if not isinstance(task, Task):
            raise TaskError(f"task {spec!r} is not a nos_sym Task (nor makes one)")
        return task
    name, *pairs = spec.split(",")
    if "@" in name:
        raise TaskError(
            f"task {spec!r} is the identity of a task given from Python: pass that Task object "
            "again (nos_sym.search(task=...))"
        )
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)} (or module:attribute)")
    cls = _attribute(TASKS[name])
    options: dict[str, Any] = {}
    for pair in pairs:
        option, equals, text = pair.partition("=")
        if not equals:
            raise TaskError(f"task {spec!r}: expected option=value, got {pair!r}")
        options[option.strip()] = _converted(cls, option.strip(), text.strip())
    has_dataset = any(f.name == "dataset" for f in dataclasses.fields(cls))
    if dataset is not None and has_dataset:
        options.setdefault("dataset", dataset)
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise TaskError(f"task {spec!r}: {error}") from None
