"""The task ``child``: the paper's child ConvNet on an image data set (Bello et al. 2017, section
4.2), scored by :mod:`nos_sym.evaluation.evaluator` exactly as before tasks existed.

Its identity covers the data set; the network and the training loop are covered by the protocol's
hash (:data:`~nos_sym.evaluation.protocol.PROTOCOL_VERSION`), so :attr:`ChildTask.version` stays
1. Reward stores written before tasks existed name the data set instead; the store's schema
migration rewrites those rows to :attr:`ChildTask.identity` (see :mod:`nos_sym.evaluation.store`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nos_sym.evaluation.outcome import EvalResult
from nos_sym.evaluation.protocol import Protocol
from nos_sym.tasks.base import MakeOptimizer, OptimizerFactory, Progress, Task, TaskRun

__all__ = ["ChildTask"]


@dataclass(frozen=True)
class ChildTask(Task):
    """The child ConvNet on ``dataset`` (``fashion-mnist``, ``cifar10`` or ``synthetic``); the
    metric is the held-out accuracy. :meth:`evaluate` is the CPU evaluator's own path
    (:func:`~nos_sym.evaluation.evaluator.evaluate_optimizer`), bit for bit."""

    dataset: str = "fashion-mnist"

    name: ClassVar[str] = "child"
    version: ClassVar[int | str] = 1

    def check(self) -> None:
        from nos_sym.evaluation.data import load_dataset

        load_dataset(self.dataset)  # a missing data set: one clear DatasetError

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
        from nos_sym.evaluation.evaluator import train_child

        accuracy, diverged = train_child(
            make_optimizer,
            dataset=self.dataset,
            protocol=protocol,
            seed=seed,
            final=final,
            device=device,
        )
        return TaskRun(metric=accuracy, diverged=diverged)

    def evaluate(
        self,
        factory: OptimizerFactory,
        *,
        dsl: str,
        key: str,
        protocol: Protocol,
        seed: int,
        device: str = "cpu",
        progress: Progress | None = None,
    ) -> EvalResult:
        from nos_sym.evaluation.evaluator import evaluate_optimizer

        return evaluate_optimizer(
            factory,
            dsl=dsl,
            key=key,
            dataset=self.dataset,
            protocol=protocol,
            seed=seed,
            device=device,
            progress=progress,
        )
