"""The Python entry points: :func:`evaluate` one rule on a task, :func:`search` for rules on a
task; the same work as ``nos-sym evaluate`` and ``nos-sym search``, memoized in the same stores.

    >>> import nos_sym
    >>> nos_sym.evaluate("powersign", task="child,dataset=synthetic").status
    'ok'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nos_sym.controller.rundir import Counters
    from nos_sym.dsl import Rule
    from nos_sym.evaluation.outcome import EvalResult
    from nos_sym.evaluation.protocol import Protocol
    from nos_sym.evaluation.store import RewardStore
    from nos_sym.tasks.base import Task

__all__ = ["SearchOutcome", "evaluate", "search"]


def evaluate(
    rule: Rule | str,
    *,
    task: Task | str = "child",
    protocol: str | Protocol | None = None,
    seed: int = 0,
    store: str | os.PathLike[str] | RewardStore | None = None,
    device: str = "cpu",
) -> EvalResult:
    """Score ``rule`` (a :class:`~nos_sym.Rule`, DSL text or a preset name) on ``task`` (a
    :class:`~nos_sym.tasks.Task` or a ``--task`` spec) under ``protocol`` (None: the task's
    default) with ``seed``. With ``store`` (a path or an open store) the evaluation is memoized
    there: answered from it when any process already paid for it, else trained and stored."""
    from nos_sym.evaluation.memoized import evaluate_memoized
    from nos_sym.evaluation.store import RewardStore
    from nos_sym.presets import resolve
    from nos_sym.tasks.base import evaluate_rule
    from nos_sym.tasks.registry import get_task

    resolved = get_task(task)
    chosen = resolved.protocol(protocol)
    if store is None:
        return evaluate_rule(rule, task=resolved, protocol=chosen, seed=seed, device=device)
    opened = store if isinstance(store, RewardStore) else RewardStore(store)
    try:
        record, _ = evaluate_memoized(
            resolve(rule), task=resolved, protocol=chosen, seed=seed, store=opened, device=device
        )
    finally:
        if opened is not store:
            opened.close()
    return record.result


@dataclass(frozen=True)
class SearchOutcome:
    """What :func:`search` returns: the run directory, its leaderboard (rows of
    :func:`~nos_sym.controller.rundir.leaderboard`, best first) and its counts."""

    run_dir: Path
    leaderboard: list[dict[str, Any]]
    counts: Counters


def search(
    *,
    task: Task | str = "child",
    budget: int = 20,
    algo: str = "trpo",
    run_dir: str | os.PathLike[str],
    top: int = 10,
    **options: Any,
) -> SearchOutcome:
    """Run (or resume) a search in ``run_dir`` for rules that train ``task`` well, paying for
    ``budget`` evaluations with ``algo``; ``options`` are the other fields of
    :class:`~nos_sym.controller.rundir.SearchConfig` (``protocol``, ``space``, ``backend``,
    ``workers``, ``store``, ...). A :class:`~nos_sym.tasks.Task` object is recorded in the run
    by its identity: resume such a run from Python with the same object. Resuming takes the
    same frozen options as the run was started with (else a :class:`~nos_sym.errors.
    SearchError`) and a budget that counts every evaluation the run has paid for."""
    from nos_sym.controller.rundir import SearchConfig, leaderboard
    from nos_sym.controller.search import SearchRun
    from nos_sym.tasks.base import Task

    obj = task if isinstance(task, Task) else None
    spec = task.identity if isinstance(task, Task) else task
    config = SearchConfig(task=spec, budget=budget, algo=algo, **options)
    run = SearchRun(run_dir, config, task=obj)
    counts = run.run()
    return SearchOutcome(Path(run_dir), leaderboard(run_dir, top), counts)
