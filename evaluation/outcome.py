"""The outcome of one evaluation, :class:`EvalResult`: made once by the evaluator, then stored,
read back, printed and serialized as it is.

Every evaluator decides the status in one place, :func:`scored`, from the learning-rate sweep
(its best learning rate, :func:`best_lr`) and the final run.

Statuses (:data:`STATUSES`): ``ok``; ``diverged`` (every learning rate, or the final run,
produced a non-finite loss or parameter); ``degenerate`` (the rule cannot train anything, so it
was not trained); ``failed`` (the candidate raised; ``message`` says what). The reward is the
final held-out accuracy if ``ok``, else 0, and never NaN: :class:`EvalResult` refuses anything
else.

Learning rates are floats in memory (``sweep: {lr: accuracy}``); only at a text boundary (JSON,
the reward store's sweep column) are they written as text, by :func:`lr_text`, and read back by
:func:`sweep_from_json`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

__all__ = [
    "STATUSES",
    "EvalResult",
    "Status",
    "best_lr",
    "lr_text",
    "scored",
    "sweep_from_json",
    "sweep_to_json",
]

Status = Literal["ok", "diverged", "degenerate", "failed"]
STATUSES: tuple[Status, ...] = get_args(Status)


@dataclass(frozen=True)
class EvalResult:
    """The outcome of one candidate under one protocol and seed."""

    dsl: str
    key: str  # the rule's canonical key (a baseline's name for a baseline)
    status: Status
    reward: float  # final held-out accuracy if ok, else 0.0
    best_lr: float | None = None  # None: every learning rate diverged, or nothing was trained
    # lr -> held-out accuracy after the sweep run (0 if it diverged)
    sweep: dict[float, float] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = ""  # where it trained ("" if nowhere)
    message: str = ""
    protocol_hash: str = ""
    seed: int = 0
    test: float | None = None  # the final run's test metric, if the task reports one
    curve: tuple[float, ...] = ()  # the final run's metric along training, if reported

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}, got {self.status!r}")
        if not math.isfinite(self.reward):
            raise ValueError(f"reward must be finite, got {self.reward}")
        if not isinstance(self.curve, tuple):
            object.__setattr__(self, "curve", tuple(self.curve))
        if self.status != "ok" and self.reward != 0.0:
            raise ValueError(f"a {self.status!r} result has reward 0, got {self.reward}")

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-able (the sweep's learning rates as text, see :func:`lr_text`)."""
        return {
            **dataclasses.asdict(self),
            "sweep": sweep_to_json(self.sweep),
            "curve": list(self.curve),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvalResult:
        """The inverse of :meth:`to_json`; absent fields take their defaults."""
        return cls(**{**data, "sweep": sweep_from_json(data.get("sweep") or {})})


def lr_text(lr: float) -> str:
    """A learning rate as text: its ``%g`` form (``1e-05``, ``0.1``, ``10``) when that reads
    back as the same float, else its exact ``repr``."""
    text = f"{lr:g}"
    return text if float(text) == lr else repr(lr)


def sweep_to_json(sweep: Mapping[float, float]) -> dict[str, float]:
    """``{lr: accuracy}`` with the learning rates as text (JSON object keys)."""
    return {lr_text(lr): accuracy for lr, accuracy in sweep.items()}


def sweep_from_json(sweep: Mapping[str, float]) -> dict[float, float]:
    """The inverse of :func:`sweep_to_json` (also reads stores that wrote ``f"{lr:g}"``)."""
    return {float(lr): accuracy for lr, accuracy in sweep.items()}


def best_lr(sweep: Mapping[float, float], diverged: Mapping[float, bool]) -> float | None:
    """The learning rate with the best metric among those that did not diverge (the smallest on
    ties); None if all diverged."""
    live = [lr for lr in sorted(sweep) if not diverged[lr]]
    return max(live, key=lambda lr: sweep[lr]) if live else None


def scored(
    dsl: str,
    key: str,
    *,
    sweep: dict[float, float],
    best_lr: float | None,
    final: tuple[float, bool] | None,
    failure: str | None,
    seconds: float,
    device: str,
    protocol_hash: str,
    seed: int,
    test: float | None = None,
    curve: tuple[float, ...] = (),
) -> EvalResult:
    """The scoring decision of every evaluator, from the sweep's best learning rate and the final
    run's (metric, diverged): ``failed`` if the candidate raised (``failure``); ``diverged`` if
    every learning rate diverged (``best_lr`` None) or the final run did; else ``ok`` with
    reward = the final run's metric."""
    status: Status
    if failure is not None:
        status, reward, best_lr, message = "failed", 0.0, None, failure
    elif best_lr is None or final is None:
        status, reward, message = "diverged", 0.0, "every learning rate diverged"
    elif final[1]:
        status, reward, message = "diverged", 0.0, f"final run at lr={best_lr:g} diverged"
    else:
        status, reward, message = "ok", final[0], ""
    return EvalResult(
        dsl=dsl,
        key=key,
        status=status,
        reward=reward,
        best_lr=best_lr,
        sweep=sweep,
        seconds=seconds,
        device=device,
        message=message,
        protocol_hash=protocol_hash,
        seed=seed,
        test=test if status == "ok" else None,
        curve=curve if status == "ok" else (),
    )
