"""The successive-halving funnel of a search (``--rungs``): the rungs and their costs, and the
asynchronous promotion rule (ASHA, Li et al. 2020), replayed from the sample log.

Rung r scores a candidate under the protocol ``rungs[r]``; the last rung over
``final_seeds`` seeds (reward: their mean), the others under the run's ``eval_seed``. Every new
key is scored at rung 0 (the controller's samples). When a result at rung r < last arrives, the
candidates finished at rung r so far are ranked by reward (ties: by identity, the key or, with
``--dedup numeric``, the fingerprint), and every ``ok`` candidate among the first
⌊n_r · promote⌋ that is not yet promoted is promoted to rung r + 1.

The decisions depend only on the order of the results, which is the order of the log's lines:
:meth:`Funnel.fold` is called on every line as it is written and, on a resume, on every line read
back, so a resumed run knows who was promoted, which promotions finished and which were still to
run (in flight at the crash, or waiting for budget).

Cost of one evaluation (one seed) at a rung, in training steps of its protocol on the task
(:meth:`~nos_sym.tasks.base.Task.steps`):

.. math::

    c_r = |\\text{learning\\_rates}| \\cdot T_\\text{sweep} + T_\\text{final}

The budget counts evaluations in units of the last rung's cost: ``budget · c_last`` steps.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nos_sym.evaluation.protocol import Protocol
    from nos_sym.tasks.base import Task

__all__ = ["Funnel", "Promotion", "Rung", "make_rungs", "rung_cost", "seed_stats"]


@dataclass(frozen=True)
class Rung:
    """One fidelity of the funnel: its protocol (name and hash), the cost of one evaluation in
    training steps, and the seeds it evaluates."""

    index: int
    protocol: str
    hash: str
    cost: int
    seeds: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "hash": self.hash,
            "cost": self.cost,
            "seeds": list(self.seeds),
        }


@dataclass(frozen=True)
class Promotion:
    """A candidate promoted to ``rung``: its identity (key, or fingerprint with numeric dedup),
    key, DSL and fingerprint."""

    rung: int
    ident: str
    key: str
    dsl: str
    fingerprint: str | None = None


def rung_cost(task: Task, protocol: Protocol) -> int:
    """Training steps of one evaluation: ``len(learning_rates) · T_sweep + T_final``."""
    sweep = task.steps(protocol, False)
    return max(1, len(protocol.learning_rates) * sweep + task.steps(protocol, True))


def make_rungs(task: Task, names: Sequence[str], eval_seed: int, final_seeds: int) -> list[Rung]:
    """The rungs of ``names`` (protocol names the task knows); the last one over
    ``final_seeds`` seeds from ``eval_seed``."""
    rungs = []
    for index, name in enumerate(names):
        protocol = task.protocol(name)
        last = index == len(names) - 1
        seeds = tuple(range(eval_seed, eval_seed + (final_seeds if last else 1)))
        rungs.append(Rung(index, name, protocol.hash, rung_cost(task, protocol), seeds))
    return rungs


def seed_stats(rewards: Sequence[float]) -> tuple[float, float]:
    """(mean, population std) of a candidate's rewards over its seeds."""
    return statistics.fmean(rewards), statistics.pstdev(rewards)


def identity(line: dict[str, Any]) -> str:
    """A log line's candidate: its fingerprint (numeric dedup) or key."""
    return line.get("fingerprint") or line["key"]


@dataclass
class _RungState:
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # ident → its line
    ranked: list[tuple[float, str]] = field(default_factory=list)  # (−reward, ident), sorted
    promoted: dict[str, Promotion] = field(default_factory=dict)  # promoted *to* this rung
    evaluated: int = 0  # rungs ≥ 1: promotions that paid for at least one seed
    from_store: int = 0  # rungs ≥ 1: promotions answered from the store entirely
    diverged: int = 0
    failed: int = 0
    paid: int = 0  # evaluations (seeds) paid for at this rung
    charged: int = 0  # evaluations answered from another run's but charged (charge_store_hits)
    seconds: float = 0.0  # measured seconds of the evaluations paid for


class Funnel:
    """The promotion state of a run: which candidates finished each rung, who was promoted,
    which promotions are still to finish (:attr:`pending`, in decision order)."""

    def __init__(self, rungs: Sequence[Rung], promote: float):
        self.rungs = list(rungs)
        self.promote = promote
        self.state = [_RungState() for _ in self.rungs]
        self.pending: dict[tuple[int, str], Promotion] = {}

    def fold(self, line: dict[str, Any]) -> list[Promotion]:
        """Record one log line (a sample, rung 0, or a promotion's result, ``line["rung"]``)
        and return the promotions it triggers."""
        rung = line.get("rung", 0)
        state = self.state[rung]
        if rung > 0:
            self.pending.pop((rung, identity(line)), None)
            state.evaluated += line["outcome"] == "evaluated"
            state.from_store += line["outcome"] == "from_store"
            state.paid += line.get("paid", 0)
        elif line["outcome"] == "evaluated":
            state.paid += 1
        state.charged += int(line.get("charged", 0))
        if line["outcome"] == "degenerate":
            return []
        state.seconds += line.get("seconds", 0.0)
        if rung > 0 and line["status"] in ("diverged", "failed"):
            setattr(state, line["status"], getattr(state, line["status"]) + 1)
        ident = identity(line)
        if ident in state.finished:  # a duplicate sample: one candidate
            return []
        state.finished[ident] = line
        bisect.insort(state.ranked, (-line["reward"], ident))
        if rung + 1 >= len(self.rungs):
            return []
        upper = self.state[rung + 1].promoted
        top = math.floor(len(state.ranked) * self.promote + 1e-9)
        promotions = []
        for _, candidate in state.ranked[:top]:
            first = state.finished[candidate]
            if candidate in upper or first["status"] != "ok":
                continue
            promotion = Promotion(
                rung + 1, candidate, first["key"], first["dsl"], first.get("fingerprint")
            )
            upper[candidate] = promotion
            self.pending[(rung + 1, candidate)] = promotion
            promotions.append(promotion)
        return promotions

    def spent(self) -> int:
        """Training steps paid for (or charged) by the folded lines."""
        return sum(
            (state.paid + state.charged) * rung.cost
            for state, rung in zip(self.state, self.rungs, strict=True)
        )

    def counts(self) -> list[dict[str, Any]]:
        """Per rung: protocol, seeds, cost and, for rungs ≥ 1, promoted / evaluated /
        from_store / pending / diverged / failed; the measured seconds paid for."""
        rows = []
        for rung, state in zip(self.rungs, self.state, strict=True):
            row: dict[str, Any] = {
                "rung": rung.index,
                "protocol": rung.protocol,
                "seeds": len(rung.seeds),
                "cost": rung.cost,
                "finished": len(state.finished),
            }
            if rung.index > 0:
                row |= {
                    "promoted": len(state.promoted),
                    "evaluated": state.evaluated,
                    "from_store": state.from_store,
                    "pending": len(state.promoted) - state.evaluated - state.from_store,
                    "diverged": state.diverged,
                    "failed": state.failed,
                }
            if state.charged:
                row["charged"] = state.charged
            row["seconds"] = round(state.seconds, 3)
            rows.append(row)
        return rows
