"""One rule's evaluation memoized in the reward store: answered from it, or claimed, trained and
completed, identity (rule key, protocol hash, data set, seed).

A finished row is the answer; a row another process is training is waited for (polling every
:data:`WAIT_SECONDS`); otherwise this process claims the row, trains while a
:class:`~nos_sym.evaluation.store.LeaseKeeper` renews the lease, and completes it (or releases it
if training raised, so nothing is half-stored). ``nos-sym evaluate`` and ``nos-sym calibrate``
both go through :func:`evaluate_memoized`, so neither pays twice for what the other trained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nos_sym.dsl import Rule
from nos_sym.evaluation import datasets
from nos_sym.evaluation.protocol import Protocol
from nos_sym.evaluation.store import LeaseKeeper, Record, RewardStore, new_owner

if TYPE_CHECKING:
    from nos_sym.evaluation.evaluator import Progress

__all__ = ["WAIT_SECONDS", "evaluate_memoized"]

WAIT_SECONDS = 2.0
"""How often an evaluation looks whether another process finished the same evaluation."""


def evaluate_memoized(
    rule: Rule,
    *,
    dataset: str,
    protocol: Protocol,
    seed: int,
    store: RewardStore,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[Record, bool]:
    """The stored record of ``rule`` under (``protocol``, ``dataset``, ``seed``), training it
    only if no process has: ``(record, cached)``, ``cached`` True when it came from the store.
    A degenerate rule is screened without training and stored as such (``cached`` False)."""
    from nos_sym.evaluation.evaluator import evaluate

    identity = (rule.key, protocol.hash, dataset, seed)
    if rule.is_degenerate:  # evaluate() screens it out: its result, without training
        degenerate = evaluate(rule, protocol=protocol, seed=seed, device=device)
        return store.get(*identity) or store.put(*identity, degenerate), False
    answer = store.wait(*identity, dsl=rule.dsl, owner=new_owner(), every=WAIT_SECONDS)
    if isinstance(answer, Record):
        return answer, True
    try:
        datasets.load(dataset)  # a missing dataset: one clear error, before training
        with LeaseKeeper(store.path) as leases:  # the lease outlives a long evaluation
            leases.hold(answer)
            result = evaluate(
                rule,
                dataset=dataset,
                protocol=protocol,
                seed=seed,
                device=device,
                progress=progress,
            )
    except BaseException:
        store.release(answer)
        raise
    return store.complete(answer, result), False
