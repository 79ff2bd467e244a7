"""The outcome of one evaluation, :class:`EvalResult`: made once by the evaluator, then stored,
read back, printed and serialized as it is.

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

__all__ = ["STATUSES", "EvalResult", "Status", "lr_text", "sweep_from_json", "sweep_to_json"]

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

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}, got {self.status!r}")
        if not math.isfinite(self.reward):
            raise ValueError(f"reward must be finite, got {self.reward}")
        if self.status != "ok" and self.reward != 0.0:
            raise ValueError(f"a {self.status!r} result has reward 0, got {self.reward}")

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-able (the sweep's learning rates as text, see :func:`lr_text`)."""
        return {**dataclasses.asdict(self), "sweep": sweep_to_json(self.sweep)}

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
