"""One evaluation memoized in the reward store: answered from it, or claimed, trained and
completed, identity (rule key, protocol hash, task identity, seed).

A finished row is the answer; a row another process is training is waited for (polling every
:data:`WAIT_SECONDS`); otherwise this process claims the row, trains while a
:class:`~nos_sym.evaluation.store.LeaseKeeper` renews the lease, and completes it (or releases it
if training raised, so nothing is half-stored). ``nos-sym evaluate``, ``calibrate`` and
``transfer`` and :func:`nos_sym.evaluate` go through here, so none pays twice for what another
trained. :func:`evaluate_memoized` scores a rule, :func:`evaluate_baseline_memoized` a
``torch.optim`` baseline (key ``baseline:NAME``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from nos_sym.dsl import Rule
from nos_sym.evaluation.outcome import EvalResult
from nos_sym.evaluation.protocol import Protocol
from nos_sym.evaluation.store import LeaseKeeper, Record, RewardStore, new_owner

if TYPE_CHECKING:
    from nos_sym.tasks.base import Progress, Task

__all__ = ["WAIT_SECONDS", "evaluate_baseline_memoized", "evaluate_memoized"]

WAIT_SECONDS = 2.0
"""How often an evaluation looks whether another process finished the same evaluation."""


def _memoized(
    identity: tuple[str, str, str, int],
    dsl: str,
    task: Task,
    store: RewardStore,
    train: Callable[[], EvalResult],
) -> tuple[Record, bool]:
    """The stored record of ``identity``, ``train()``-ing it only if no process has."""
    store.describe_task(task.identity, task.describe())
    answer = store.wait(*identity, dsl=dsl, owner=new_owner(), every=WAIT_SECONDS)
    if isinstance(answer, Record):
        return answer, True
    try:
        task.check()  # a missing data set: one clear error, before training
        with LeaseKeeper(store.path) as leases:  # the lease outlives a long evaluation
            leases.hold(answer)
            result = train()
    except BaseException:
        store.release(answer)
        raise
    return store.complete(answer, result), False


def evaluate_memoized(
    rule: Rule,
    *,
    task: Task,
    protocol: Protocol,
    seed: int,
    store: RewardStore,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[Record, bool]:
    """The stored record of ``rule`` on ``task`` under (``protocol``, ``seed``), training it
    only if no process has: ``(record, cached)``, ``cached`` True when it came from the store.
    A degenerate rule is screened without training and stored as such (``cached`` False)."""
    from nos_sym.tasks.base import evaluate_rule

    identity = (rule.key, protocol.hash, task.identity, seed)

    def train() -> EvalResult:
        return evaluate_rule(
            rule, task=task, protocol=protocol, seed=seed, device=device, progress=progress
        )

    if rule.is_degenerate:  # screened out: its result, without training
        return store.get(*identity) or store.put(*identity, train()), False
    return _memoized(identity, rule.dsl, task, store, train)


def evaluate_baseline_memoized(
    name: str,
    *,
    task: Task,
    protocol: Protocol,
    seed: int,
    store: RewardStore,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[Record, bool]:
    """:func:`evaluate_memoized` for the ``torch.optim`` baseline ``name`` (a key of
    :data:`~nos_sym.evaluation.baselines.BASELINES`), stored under key ``baseline:NAME``."""
    from nos_sym.evaluation.baselines import BASELINES, baseline_key, evaluate_baseline

    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")

    def train() -> EvalResult:
        return evaluate_baseline(
            name, task=task, protocol=protocol, seed=seed, device=device, progress=progress
        )

    identity = (baseline_key(name), protocol.hash, task.identity, seed)
    return _memoized(identity, name, task, store, train)
