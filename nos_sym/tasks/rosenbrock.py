r"""The paper's Figure 6 task: optimizers on the 2-D Rosenbrock function.

.. math::

    f(x, y) = (1 - x)^2 + 100\,(y - x^2)^2,\qquad
    \nabla f = \bigl(-2(1 - x) - 400\,x\,(y - x^2),\ 200\,(y - x^2)\bigr),

minimum 0 at (1, 1). Bello et al. (ICML 2017, section 5.1) run each optimizer for 4,000
iterations at 4 learning rates on a logarithmic scale, tune Adam's ε on a log scale from 1e-3 to
1e-8 and plot the best run; they do not say where the runs start. Here every optimizer runs from
the fixed :data:`STARTS` at every learning rate of :data:`LRS` (13 half-decades) and, for a rule
that reads ε (:func:`reads_eps`: Adam, RMSProp, ``div``), at every ε of :data:`EPSILONS`.

The metric of one run is :func:`metric`: −log10 of the final loss, higher is better, with the
loss clamped to [:data:`LOSS_FLOOR`, float64 max] and a NaN loss (a diverged run) counted as
float64 max, so a diverged run scores :data:`DIVERGED_METRIC` ≈ −308.3, the worst value.
:func:`best` picks the (lr, ε) with the highest mean metric over the starts.

Everything runs in float64 and in one batch: all (ε, lr, start) runs are rows of one [N, 2]
tensor, each (ε, lr) pair a parameter group holding a [starts, 2] view of it, and the gradient
is computed for all rows at once. The update rules are elementwise, so a row's run is the same,
bit for bit, as that run alone, and a diverged row (inf, NaN) stays in its row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from nos_sym import primitives as P
from nos_sym.dsl import Rule
from nos_sym.evaluation.protocol import Protocol
from nos_sym.presets import resolve
from nos_sym.tasks.base import MakeOptimizer, Task, TaskRun

__all__ = [
    "DIVERGED_METRIC",
    "EPSILONS",
    "LOSS_FLOOR",
    "LRS",
    "STARTS",
    "STEPS",
    "PROTOCOL",
    "Best",
    "OptimizerFactory",
    "RosenbrockTask",
    "Trajectories",
    "best",
    "epsilons_for",
    "gradient",
    "loss",
    "metric",
    "reads_eps",
    "run",
]

STEPS = 4000
"""Iterations per run (the paper's)."""
CURVE_EVERY = 100
"""Steps between the points of a :class:`RosenbrockTask` run's curve."""

STARTS: tuple[tuple[float, float], ...] = ((-1.2, 1.0), (-1.5, 2.0), (-0.5, 1.5), (1.5, 1.0))
"""Starting points: Rosenbrock's own (−1.2, 1), two more on the far side of the curved valley
and one past the minimum (the paper does not give its starting point)."""

LRS: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-12, 1))
"""Learning rates 1e-6 … 1 in half decades (the paper: 4 on a log scale, unspecified)."""

EPSILONS: tuple[float, ...] = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
"""The ε swept for rules that read it: 1e-3 … 1e-8 as the paper tunes Adam's."""

LOSS_FLOOR = float(np.finfo(np.float64).eps) ** 2
"""≈ 4.9e-32, the loss a step of one float64 ulp away from (1, 1) leaves: smaller final losses
are round-off and count as this (metric ≤ 31.3)."""

DIVERGED_METRIC = -math.log10(float(np.finfo(np.float64).max))
"""≈ −308.25: the metric of a run whose final loss is NaN, infinite or float64 max."""

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
"""Builds an optimizer from parameter groups ``{"params": [p], "lr": lr}`` (plus ``"eps"`` when
ε is swept), e.g. ``lambda groups: torch.optim.SGD(groups, momentum=0.9)``."""


def loss(xy: torch.Tensor) -> torch.Tensor:
    """f(x, y) = (1 − x)² + 100·(y − x²)² of each row of ``xy`` ([..., 2] → [...])."""
    x, y = xy[..., 0], xy[..., 1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def gradient(xy: torch.Tensor) -> torch.Tensor:
    """∇f = (−2(1 − x) − 400·x·(y − x²), 200·(y − x²)) of each row of ``xy`` ([..., 2])."""
    x, y = xy[..., 0], xy[..., 1]
    valley = y - x * x
    return torch.stack((-2 * (1 - x) - 400 * x * valley, 200 * valley), dim=-1)


def metric(final_loss: np.ndarray | float) -> np.ndarray:
    """−log10 of a final loss clamped to [LOSS_FLOOR, float64 max]; NaN counts as the max."""
    worst = np.finfo(np.float64).max
    value = np.nan_to_num(np.asarray(final_loss, dtype=np.float64), nan=worst, posinf=worst)
    return -np.log10(np.clip(value, LOSS_FLOOR, worst))


def reads_eps(rule: Rule | str) -> bool:
    """Whether the rule's Δ contains ε (``div``, ``adam``, ``rmsprop``), so that ε matters."""
    return P.EPS in resolve(rule).sympy.free_symbols


def epsilons_for(rule: Rule | str) -> tuple[float | None, ...]:
    """The ε values :func:`best` sweeps: :data:`EPSILONS` if the rule reads ε, else ``(None,)``
    (the optimizer's default)."""
    return EPSILONS if reads_eps(rule) else (None,)


@dataclass(frozen=True)
class Trajectories:
    """Every (ε, lr, start) run of one optimizer, ``steps`` steps each.

    ``paths[e, l, s, t]`` is the point (x, y) after t steps (t = 0 the start) of the run at
    ``epsilons[e]``, ``lrs[l]`` from ``starts[s]``; ``losses[e, l, s, t]`` its loss.
    """

    lrs: tuple[float, ...]
    epsilons: tuple[float | None, ...]
    starts: tuple[tuple[float, float], ...]
    paths: np.ndarray
    losses: np.ndarray

    @property
    def metrics(self) -> np.ndarray:
        """[ε, lr, start] :func:`metric` of the final losses."""
        return metric(self.losses[..., -1])


@dataclass(frozen=True)
class Best:
    """The best (lr, ε) of a sweep: its metric per start, path and loss curve per start."""

    lr: float
    eps: float | None
    metrics: tuple[float, ...]
    paths: np.ndarray
    losses: np.ndarray
    sweep: Trajectories

    @property
    def mean(self) -> float:
        """Mean metric over the starts."""
        return float(np.mean(self.metrics))

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof = 1) of the metric over the starts; 0 for one."""
        return float(np.std(self.metrics, ddof=1)) if len(self.metrics) > 1 else 0.0

    @property
    def final_losses(self) -> tuple[float, ...]:
        """The final loss per start."""
        return tuple(float(loss) for loss in self.losses[:, -1])


def _factory(optimizer: Rule | str | OptimizerFactory, steps: int, seed: int) -> OptimizerFactory:
    if callable(optimizer):
        return optimizer
    from nos_sym.symbolic_optim import SymbolicOptimizer

    rule = resolve(optimizer)
    generator = torch.Generator().manual_seed(seed)
    return lambda groups: SymbolicOptimizer(groups, rule, total_steps=steps, generator=generator)


def run(
    optimizer: Rule | str | OptimizerFactory,
    lrs: Sequence[float],
    starts: Sequence[tuple[float, float]] = STARTS,
    steps: int = STEPS,
    epsilons: Sequence[float | None] = (None,),
    seed: int = 0,
) -> Trajectories:
    """Run ``optimizer`` on f from every start at every lr and ε (``None``: its default), all in
    one batch.

    ``optimizer`` is a rule (a preset name, DSL text or :class:`~nos_sym.Rule`, run by
    :class:`~nos_sym.SymbolicOptimizer` with ``total_steps=steps``) or an
    :data:`OptimizerFactory`. ``seed`` seeds the generator of a rule's random draws (``drop``,
    ``noise``); a factory brings its own.
    """
    lrs, epsilons = tuple(float(lr) for lr in lrs), tuple(epsilons)
    starts = tuple((float(x), float(y)) for x, y in starts)
    if steps < 1 or not lrs or not epsilons or not starts:
        raise ValueError("run needs steps >= 1 and at least one lr, one ε and one start")
    make = _factory(optimizer, steps, seed)
    n_starts, shape = len(starts), (len(epsilons), len(lrs), len(starts))
    point = torch.tensor(starts, dtype=torch.float64).repeat(len(epsilons) * len(lrs), 1)
    grads = torch.zeros_like(point)
    groups = []
    for index, (eps, lr) in enumerate((eps, lr) for eps in epsilons for lr in lrs):
        rows = slice(index * n_starts, (index + 1) * n_starts)
        param = point[rows]
        param.grad = grads[rows]
        groups.append({"params": [param], "lr": lr, **({} if eps is None else {"eps": eps})})
    optim = make(groups)
    paths = torch.empty((steps + 1, *point.shape), dtype=torch.float64)
    paths[0] = point
    for step in range(1, steps + 1):
        grads.copy_(gradient(point))
        optim.step()
        paths[step] = point
    losses = loss(paths)
    return Trajectories(
        lrs=lrs,
        epsilons=epsilons,
        starts=starts,
        paths=paths.permute(1, 0, 2).reshape(*shape, steps + 1, 2).numpy(),
        losses=losses.T.reshape(*shape, steps + 1).numpy(),
    )


def best(
    optimizer: Rule | str | OptimizerFactory,
    lrs: Sequence[float] = LRS,
    starts: Sequence[tuple[float, float]] = STARTS,
    steps: int = STEPS,
    epsilons: Sequence[float | None] | None = None,
    seed: int = 0,
) -> Best:
    """The (lr, ε) of the grid with the highest mean :func:`metric` over ``starts`` (ties: the
    first in grid order, ε then lr). ``epsilons=None`` sweeps :func:`epsilons_for` a rule and
    only the default ε of an :data:`OptimizerFactory`."""
    if epsilons is None:
        epsilons = (None,) if callable(optimizer) else epsilons_for(optimizer)
    sweep = run(optimizer, lrs, starts, steps, epsilons, seed)
    e, lr = np.unravel_index(np.argmax(sweep.metrics.mean(axis=-1)), sweep.metrics.shape[:2])
    return Best(
        lr=sweep.lrs[lr],
        eps=sweep.epsilons[e],
        metrics=tuple(float(value) for value in sweep.metrics[e, lr]),
        paths=sweep.paths[e, lr],
        losses=sweep.losses[e, lr],
        sweep=sweep,
    )


PROTOCOL = Protocol(
    name="rosenbrock",
    learning_rates=LRS,
    sweep_examples=STEPS,
    final_epochs=1,
    final_examples=STEPS,
    batch_size=1,
    n_valid=1,
)
"""The task's protocol: every lr of :data:`LRS`, :data:`STEPS` iterations (one "example" per
step); the final run repeats the best lr's run (the task is deterministic)."""


@dataclass(frozen=True)
class RosenbrockTask(Task):
    """The task ``rosenbrock``: one run = every start of :data:`STARTS` for ``steps`` steps at
    one lr (ε the optimizer's default); metric = the mean :func:`metric` over the starts;
    diverged when every start's final loss is non-finite. The curve: the mean metric every
    :data:`CURVE_EVERY` steps. (``nos-sym rosenbrock`` also sweeps ε; a task run does not.)"""

    name: ClassVar[str] = "rosenbrock"
    version: ClassVar[int | str] = 1
    protocols: ClassVar[Mapping[str, Protocol]] = {"rosenbrock": PROTOCOL}
    default_protocol: ClassVar[str] = "rosenbrock"

    def run(
        self,
        make_optimizer: MakeOptimizer,
        *,
        lr: float,
        seed: int,
        steps: int,
        protocol: Protocol,
        final: bool,
        device: str = "cpu",
    ) -> TaskRun:
        runs = run(make_optimizer, lrs=(lr,), steps=steps, seed=seed)
        losses = runs.losses[0, 0]  # [start, step]
        curve = metric(losses[:, ::CURVE_EVERY]).mean(axis=0)
        return TaskRun(
            metric=float(runs.metrics[0, 0].mean()),
            diverged=bool(not np.isfinite(losses[:, -1]).any()),
            curve=tuple(float(value) for value in curve),
        )
