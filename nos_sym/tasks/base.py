r"""The task interface: what one training run is, and how a protocol scores an optimizer on it.

A :class:`Task` says what *one training run* is: from a seed, build the model (or state), train it
for ``steps`` steps with the optimizer ``make_optimizer(params)`` builds, and return a
:class:`TaskRun`: a metric where higher is better (accuracy, −log10 loss, BLEU), whether the run
diverged, and optionally its curve and a test metric. A :class:`~nos_sym.evaluation.protocol.
Protocol` then scores an optimizer on any task the same way (:meth:`Task.evaluate`):

.. math::

    \text{reward} = m\bigl(\text{run}(lr^\*, T_\text{final})\bigr),\qquad
    lr^\* = \operatorname{argmax}_{lr \in \text{protocol.learning\_rates}}
            m\bigl(\text{run}(lr, T_\text{sweep})\bigr)

with diverged sweep runs never chosen. A task's **identity** (:attr:`Task.identity`) is its name,
version and configuration, hashed; it takes the place of a data set in every reward's identity
(rule key, protocol hash, task identity, seed), so a changed version or configuration never
reuses a stored reward.

Your own task: subclass :class:`Task` (a frozen dataclass whose fields are its configuration is the
natural shape), or wrap a function with :class:`FunctionTask`. The process and Ray backends send
the task object to their workers by pickling it: its class (and a :class:`FunctionTask`'s
function) must be importable by name, i.e. defined at module level, not a lambda or closure.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from nos_sym.evaluation.outcome import EvalResult, best_lr, scored
from nos_sym.evaluation.protocol import PROTOCOLS, Protocol
from nos_sym.tasks.identity import description, task_identity

if TYPE_CHECKING:
    import torch

    from nos_sym.dsl import Rule

__all__ = [
    "FunctionTask",
    "MakeOptimizer",
    "OptimizerFactory",
    "Progress",
    "Task",
    "TaskRun",
    "evaluate_rule",
]

MakeOptimizer = Callable[[Any], "torch.optim.Optimizer"]
"""``make_optimizer(params)``: the optimizer of one run, its learning rate and total steps bound;
``params`` is whatever ``torch.optim`` takes (tensors or parameter groups)."""
OptimizerFactory = Callable[[Any, float, int], "torch.optim.Optimizer"]
"""``factory(params, lr, total_steps)``: how :meth:`Task.evaluate` builds each run's optimizer."""
Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each training run."""


@dataclass(frozen=True)
class TaskRun:
    """What one training run returned: ``metric`` (higher is better, at the end of the run),
    whether it ``diverged``, the metric along the run (``curve``, optional) and a ``test`` metric
    (reported, never used to choose anything)."""

    metric: float
    diverged: bool = False
    curve: tuple[float, ...] = ()
    test: float | None = None

    @classmethod
    def of(cls, value: TaskRun | float) -> TaskRun:
        """A run from what a task returned: a :class:`TaskRun`, or a bare metric. A non-finite
        metric is a diverged run."""
        run = value if isinstance(value, TaskRun) else cls(metric=float(value))
        if not math.isfinite(run.metric):
            return dataclasses.replace(run, metric=0.0, diverged=True)
        return run


class Task(abc.ABC):
    """One kind of training run an optimizer is scored on (see the module docstring).

    Subclasses set :attr:`name` and :attr:`version` (bump it whenever what a run computes
    changes) and implement :meth:`run`; :meth:`config` is the configuration that enters the
    identity (a dataclass task: its fields). A task may declare its own protocols
    (:attr:`protocols`, looked up before the global ones) and a :attr:`default_protocol`.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int | str] = 1
    protocols: ClassVar[Mapping[str, Protocol]] = {}
    default_protocol: ClassVar[str] = "quick"

    def config(self) -> dict[str, Any]:
        """The configuration that enters :attr:`identity` (JSON-able); a dataclass's fields."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def describe(self) -> dict[str, Any]:
        """``{"name", "version", "config"}``: what :attr:`identity` hashes."""
        return description(self.name, self.version, self.config())

    @property
    def identity(self) -> str:
        """``name@version/h``, ``h`` the first 16 hex digits of the sha256 of the canonical JSON
        of :meth:`describe` (:func:`~nos_sym.tasks.identity.task_identity`): equal exactly when
        name, version and configuration are."""
        return task_identity(self.name, self.version, self.config())

    @property
    def known_protocols(self) -> dict[str, Protocol]:
        """Every protocol this task runs under, by name: the global ones, then its own (which
        win on a shared name)."""
        return {**PROTOCOLS, **self.protocols}

    def protocol(self, protocol: str | Protocol | None = None) -> Protocol:
        """The protocol called ``protocol`` (the task's own first; None: its default); a
        :class:`Protocol` passes through."""
        if isinstance(protocol, Protocol):
            return protocol
        name = protocol or self.default_protocol
        known = self.known_protocols
        if name not in known:
            raise ValueError(
                f"unknown protocol {name!r} for task {self.name!r}; known: {', '.join(known)}"
            )
        return known[name]

    def steps(self, protocol: Protocol, final: bool) -> int:
        """Steps of a sweep run (``final`` False) or of the final run:
        ``epochs · ⌊examples / batch⌋`` of the protocol (the final run's examples default to the
        sweep's when the protocol says "all")."""
        if not final:
            return protocol.sweep_steps
        return protocol.steps(
            protocol.final_epochs, protocol.final_examples or protocol.sweep_examples
        )

    def check(self) -> None:
        """Raise a :class:`~nos_sym.errors.UserError` if this task cannot run here (e.g. its
        data is missing), before anything is trained. Default: nothing to check."""
        return None

    @abc.abstractmethod
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
    ) -> TaskRun | float:
        """One training run: the model drawn from ``seed``, ``steps`` updates of the optimizer
        ``make_optimizer(params)`` builds (learning rate ``lr``), the metric at the end.
        ``final`` says whether this is the protocol's final run (a task may train on more data
        then); the same ``seed`` must give the same initialisation in every run."""

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
        """Score the optimizer ``factory`` builds: the protocol's learning-rate sweep, then the
        final run at the best learning rate (see the module docstring). An exception raised in a
        run gives status ``failed``, never a raise."""
        start = time.perf_counter()
        sweep: dict[float, float] = {}
        diverged: dict[float, bool] = {}
        chosen: float | None = None
        final: TaskRun | None = None
        failure: str | None = None
        total = len(protocol.learning_rates) + 1

        def train(lr: float, is_final: bool) -> TaskRun:
            steps = self.steps(protocol, is_final)
            outcome = self.run(
                lambda params: factory(params, lr, steps),
                lr=lr,
                seed=seed,
                steps=steps,
                protocol=protocol,
                final=is_final,
                device=device,
            )
            if progress is not None:
                progress(len(sweep) + 1, total)
            return TaskRun.of(outcome)

        try:
            for lr in protocol.learning_rates:
                outcome = train(lr, False)
                sweep[lr], diverged[lr] = outcome.metric, outcome.diverged
            chosen = best_lr(sweep, diverged)
            if chosen is not None:
                final = train(chosen, True)
        except Exception as error:  # the candidate's own failure: report it, never raise
            failure = f"{type(error).__name__}: {error}"
        return scored(
            dsl,
            key,
            sweep=sweep,
            best_lr=chosen,
            final=None if final is None else (final.metric, final.diverged),
            failure=failure,
            seconds=time.perf_counter() - start,
            device=device,
            protocol_hash=protocol.hash,
            seed=seed,
            curve=() if final is None else final.curve,
            test=None if final is None else final.test,
        )


TrainFunction = Callable[[MakeOptimizer, float, int, int], "TaskRun | float"]
"""``train_fn(make_optimizer, lr, seed, steps) -> metric`` (or a :class:`TaskRun`)."""


class FunctionTask(Task):
    """A task from a plain function ``train_fn(make_optimizer, lr, seed, steps)`` that trains
    a fresh model from ``seed`` for ``steps`` steps with ``make_optimizer(params)`` and returns
    the metric (higher is better; NaN or inf means diverged) or a :class:`TaskRun`.

    ``name`` and ``version`` (and the optional JSON-able ``config``) are the identity: bump
    ``version`` whenever ``train_fn`` changes what it computes. ``train_fn`` is not part of the
    identity. For the process and Ray backends it must be a module-level function.
    """

    def __init__(
        self,
        name: str,
        version: int | str,
        train_fn: TrainFunction,
        *,
        config: Mapping[str, Any] | None = None,
        protocols: Mapping[str, Protocol] | None = None,
        default_protocol: str = "quick",
    ) -> None:
        if not name or not callable(train_fn):
            raise ValueError("FunctionTask needs a name and a callable train_fn")
        self.name = name
        self.version = version
        self.train_fn = train_fn
        self._config = dict(config or {})
        self.protocols = dict(protocols or {})
        self.default_protocol = default_protocol

    def __repr__(self) -> str:
        return f"FunctionTask({self.name!r}, {self.version!r}, {self.train_fn!r})"

    def config(self) -> dict[str, Any]:
        return dict(self._config)

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
    ) -> TaskRun | float:
        return self.train_fn(make_optimizer, lr, seed, steps)


def evaluate_rule(
    rule: Rule | str,
    *,
    task: Task,
    protocol: str | Protocol | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
) -> EvalResult:
    """Score one update rule on ``task`` under ``protocol`` (None: the task's default): an
    unparsable or degenerate rule is answered without training, any other is run through
    :class:`~nos_sym.SymbolicOptimizer` (random draws seeded by ``seed``)."""
    import torch

    from nos_sym.evaluation.evaluator import rule_optimizer, screen

    resolved = task.protocol(protocol)
    screened = screen(rule, resolved, seed, device)
    if isinstance(screened, EvalResult):
        return screened
    return task.evaluate(
        rule_optimizer(screened, seed, torch.device(device)),
        dsl=screened.dsl,
        key=screened.key,
        protocol=resolved,
        seed=seed,
        device=device,
        progress=progress,
    )
