"""The standard optimizers the paper compares against, scored through the same protocol code path
as candidate rules (:func:`~nos_sym.evaluation.evaluator.evaluate_optimizer`).

Hyper-parameters are the libraries' defaults (``torch.optim``; TensorFlow's for PowerSign and
AddSign, as :mod:`nos_sym.sign_optim` implements them): only the learning rate is swept, as for
candidates. ``-ld`` variants decay the sign term linearly to 0 over each run's steps.

A baseline's ``dsl`` is its rule in :data:`nos_sym.presets.PRESETS` where the preset takes the
same steps (SGD, Adam, PowerSign and AddSign with their linear decays); ``momentum`` and
``rmsprop`` have none (the presets of those names differ from ``torch.optim``'s, see
:mod:`nos_sym.presets`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nos_sym.evaluation import datasets
from nos_sym.evaluation.evaluator import EvalResult, Progress, evaluate_optimizer
from nos_sym.evaluation.protocol import Protocol, get_protocol
from nos_sym.presets import PRESETS
from nos_sym.sign_decay import SignDecay, linear
from nos_sym.sign_optim import AddSign, PowerSign

if TYPE_CHECKING:
    from nos_sym.tasks.base import Task


@dataclass(frozen=True)
class Baseline:
    """An optimizer factory ``(params, lr, total_steps) -> Optimizer`` (picklable, for workers)."""

    optimizer: type[torch.optim.Optimizer]
    hyper: dict[str, Any] = field(default_factory=dict)
    sign_decay: Callable[[int], SignDecay] | None = None  # total_steps -> decay
    dsl: str = ""  # the same update in the DSL, where it has one

    def __call__(self, params: list[Tensor], lr: float, total_steps: int) -> torch.optim.Optimizer:
        extra = {} if self.sign_decay is None else {"sign_decay": self.sign_decay(total_steps)}
        return self.optimizer(params, lr=lr, **self.hyper, **extra)


BASELINES: dict[str, Baseline] = {
    "sgd": Baseline(torch.optim.SGD, dsl=PRESETS["sgd"]),
    "momentum": Baseline(torch.optim.SGD, {"momentum": 0.9}),
    "adam": Baseline(torch.optim.Adam, dsl=PRESETS["adam"]),
    "rmsprop": Baseline(torch.optim.RMSprop),
    "powersign": Baseline(PowerSign, dsl=PRESETS["powersign"]),
    "addsign": Baseline(AddSign, dsl=PRESETS["addsign"]),
    "powersign-ld": Baseline(PowerSign, sign_decay=linear, dsl=PRESETS["powersign-ld"]),
    "addsign-ld": Baseline(AddSign, sign_decay=linear, dsl=PRESETS["addsign-ld"]),
}


def baseline_key(name: str) -> str:
    """The key baseline ``name``'s rewards are stored under: ``baseline:NAME``."""
    return f"baseline:{name}"


def evaluate_baseline(
    name: str,
    *,
    dataset: str | datasets.Dataset = "fashion-mnist",
    protocol: str | Protocol | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
    task: Task | None = None,
) -> EvalResult:
    """Score baseline ``name`` (a key of :data:`BASELINES`) exactly as a candidate rule is: on
    ``task`` when given (``protocol`` None: its default), else on the child on ``dataset``
    (``protocol`` None: ``quick``)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    if task is None:
        return evaluate_optimizer(
            BASELINES[name],
            dsl=name,
            key=baseline_key(name),
            dataset=dataset,
            protocol=protocol or "quick",
            seed=seed,
            device=device,
            progress=progress,
        )
    return task.evaluate(
        BASELINES[name],
        dsl=name,
        key=baseline_key(name),
        protocol=task.protocol(protocol),
        seed=seed,
        device=device,
        progress=progress,
    )


def baseline_table(
    dataset: str | datasets.Dataset = "fashion-mnist",
    protocol: str | Protocol | None = None,
    seeds: Iterable[int] = (0, 1),
    names: Sequence[str] | None = None,
    device: str = "cpu",
    task: Task | None = None,
) -> list[dict[str, Any]]:
    """One row per baseline (on ``task`` when given, else the child on ``dataset``): rewards and
    best learning rates per seed, their mean and spread (population std over seeds), mean
    seconds per evaluation."""
    protocol = task.protocol(protocol) if task is not None else get_protocol(protocol or "quick")
    seeds = list(seeds)
    rows = []
    for name in names or BASELINES:
        results = [
            evaluate_baseline(
                name, dataset=dataset, protocol=protocol, seed=seed, device=device, task=task
            )
            for seed in seeds
        ]
        rewards = [result.reward for result in results]
        rows.append(
            {
                "optimizer": name,
                "protocol": protocol.name,
                "seeds": seeds,
                "rewards": rewards,
                "best_lrs": [result.best_lr for result in results],
                "statuses": [result.status for result in results],
                "mean": statistics.fmean(rewards),
                "std": statistics.pstdev(rewards),
                "seconds": statistics.fmean(result.seconds for result in results),
            }
        )
    return rows
