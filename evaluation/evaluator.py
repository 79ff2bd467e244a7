"""Score a candidate update rule: train the child network under a :class:`Protocol`.

    reward = accuracy_valid(train(init, lr*, final_epochs)),
    lr*    = argmax_{lr ∈ protocol.learning_rates} accuracy_valid(train(init, lr, sweep_epochs))

(Bello et al. 2017, section 4.2; see :mod:`nos_sym.evaluation.protocol`). Every run starts from the
same initialisation and sees the examples in the same order, both drawn from ``seed``.

:func:`evaluate` scores one rule on the CPU (or any device) one run after another;
:func:`evaluate_batch` trains many rules × learning rates at once as one stacked model (a GPU
technique: on the CPU stacking is slower, see ``docs/evaluation.md``) and agrees with
:func:`evaluate` up to float rounding. :func:`evaluate_optimizer` scores any ``torch.optim``
factory (the baselines).

Speed on the CPU comes from: the data resident as one normalised tensor per dataset and split
(cached in-process), each epoch gathered once into a shuffled copy so batches are contiguous
slices, the first batch norm's patch moments of each batch computed once per process and shared
by every run that sees the batch (:func:`epoch_moments`), bf16 autocast with channels-last
activations (protocol fields, part of its hash), no per-step host syncs (divergence is checked
every :data:`DIVERGENCE_CHECK_EVERY` steps; it is sticky, so the result does not depend on that
interval), evaluation in large batches under ``torch.inference_mode``, and one flat parameter
tensor per model so the optimizer step is a handful of kernels. Nothing is compiled per
candidate. Threads: torch's intra-op setting (default: every core). Parallel workers must split
the cores (``torch.set_num_threads``): two 2-thread processes on 2 cores spin against each other
and run ~10× slower.

Every evaluator returns an :class:`~nos_sym.evaluation.outcome.EvalResult` (re-exported here),
decided in one place (:func:`~nos_sym.evaluation.outcome.scored`): ``ok``; ``diverged`` (every
learning rate, or the final run, produced a non-finite loss or parameter; a diverged sweep run
scores 0 and another learning rate may still win); ``degenerate`` (the rule cannot train
anything: no training at all); ``failed`` (the candidate raised; the message says what). The
reward is 0 unless ``ok``, and never NaN. Data and caches: :mod:`nos_sym.evaluation.data`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nos_sym.dsl import Rule
from nos_sym.evaluation import datasets
from nos_sym.evaluation.child import ChildNet, StackedChild, init_child, patch_moments
from nos_sym.evaluation.data import Data, prepared, shuffled_epoch
from nos_sym.evaluation.outcome import STATUSES, EvalResult, Status, best_lr, scored
from nos_sym.evaluation.protocol import (
    Protocol,
    autocast,
    derived_seed,
    get_protocol,
    memory_format,
)
from nos_sym.presets import resolve
from nos_sym.symbolic_optim import SymbolicOptimizer, symbolic_update

__all__ = [
    "DEFAULT_MAX_MODELS",
    "DIVERGENCE_CHECK_EVERY",
    "EVAL_MODEL_EXAMPLES",
    "STATUSES",
    "EvalResult",
    "OptimizerFactory",
    "Progress",
    "evaluate",
    "evaluate_batch",
    "evaluate_optimizer",
    "rule_optimizer",
    "screen",
    "train_child",
]

OptimizerFactory = Callable[[list[Tensor], float, int], torch.optim.Optimizer]
"""``(params, lr, total_steps) -> optimizer``: how :func:`evaluate_optimizer` builds each run's
optimizer."""
Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each training run (one model at one learning rate)."""

DIVERGENCE_CHECK_EVERY = 25
"""Steps between the host syncs that stop a run early once every model in it has diverged."""
EVAL_MODEL_EXAMPLES = 500
"""Models × examples per evaluation batch, at least one training batch (1 model: 500 examples,
measured fastest on the CPU among 100…5,000)."""
DEFAULT_MAX_MODELS = {"cuda": 1_024, "cpu": 32}
"""Models trained at once by :func:`evaluate_batch`, by device type."""


# --- the child ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _initial_child(shape: tuple[int, int, int], classes: int, seed: int) -> ChildNet:
    return init_child(shape, classes, seed)


def _model(
    data: Data, protocol: Protocol, seed: int, copies: int, device: torch.device
) -> StackedChild:
    """``copies`` children, all with the initialisation drawn from ``seed``."""
    child = _initial_child(data.shape, data.classes, seed)
    return StackedChild(child, copies, device, memory_format(protocol))


# --- training ------------------------------------------------------------------------------------


def _train_and_score(
    model: StackedChild,
    update: Callable[[], None],
    data: Data,
    protocol: Protocol,
    seed: int,
    epochs: int,
    examples: int,
) -> tuple[Tensor, Tensor]:
    """Train the K stacked models in place, ``update()`` after each backward; return
    (held-out accuracy ``[K]``, 0 where diverged; diverged ``[K]``)."""
    batch = protocol.batch_size
    diverged = torch.zeros(model.copies, dtype=torch.bool, device=model.params.device)
    step = 0
    for epoch in range(epochs):
        xs, ys = shuffled_epoch(data, seed, epoch, examples)
        moments = epoch_moments(data, seed, epoch, examples, batch)
        for start in range(0, examples - batch + 1, batch):
            with autocast(protocol, xs.device):
                losses = model.losses(
                    xs[start : start + batch], ys[start : start + batch], moments[start // batch]
                )
            model.params.grad = None
            losses.sum().backward()
            update()
            diverged |= ~torch.isfinite(losses.detach())
            step += 1
            if step % DIVERGENCE_CHECK_EVERY == 0 and bool(_check(model, diverged).all()):
                return torch.zeros(model.copies, device=diverged.device), diverged
    _check(model, diverged)
    return _accuracy(model, data, protocol).masked_fill(diverged, 0.0), diverged


@functools.lru_cache(maxsize=16)
def epoch_moments(data: Data, seed: int, epoch: int, examples: int, batch: int) -> Tensor:
    """:func:`~nos_sym.evaluation.child.patch_moments` of every batch of an epoch
    (:func:`~nos_sym.evaluation.data.shuffled_epoch`), ``[batches, C·9+1, C·9+1]``: they depend
    on the batch alone, so every run that sees the epoch — each learning rate of a sweep, the
    final run's first epoch, every candidate of a search with the same seed — shares one
    computation (~1.1 ms per batch of 100 on 2 CPU cores, ~10 % of a training step) and the
    rewards are unchanged. Cached in-process; 48 KB per epoch of 100 batches."""
    xs, _ = shuffled_epoch(data, seed, epoch, examples)
    starts = range(0, examples - batch + 1, batch)
    return torch.stack([patch_moments(xs[start : start + batch]) for start in starts])


def _check(model: StackedChild, diverged: Tensor) -> Tensor:
    """Also mark models with a non-finite parameter (``sign`` hides a NaN gradient, not a NaN
    parameter)."""
    return diverged.logical_or_(~torch.isfinite(model.params.detach()).all(dim=1))


@torch.inference_mode()
def _accuracy(model: StackedChild, data: Data, protocol: Protocol) -> Tensor:
    """Held-out accuracy ``[K]`` with the batch-norm running statistics, in large batches."""
    batch = max(protocol.batch_size, EVAL_MODEL_EXAMPLES // model.copies)
    correct = torch.zeros(model.copies, dtype=torch.long, device=data.valid_y.device)
    for start in range(0, len(data.valid_y), batch):
        with autocast(protocol, data.valid_x.device):
            correct += model.correct(
                data.valid_x[start : start + batch], data.valid_y[start : start + batch]
            )
    return correct.double().div_(len(data.valid_y))


def _message(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# --- one candidate -------------------------------------------------------------------------------


def evaluate_optimizer(
    make_optimizer: OptimizerFactory,
    *,
    dsl: str,
    key: str,
    dataset: str | datasets.Dataset = "fashion-mnist",
    protocol: str | Protocol = "quick",
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
) -> EvalResult:
    """Score the optimizer ``make_optimizer(params, lr, total_steps)`` builds (see the module
    docstring). An exception raised by the optimizer gives status ``failed``, never a raise."""
    start = time.perf_counter()
    protocol = get_protocol(protocol)
    target = torch.device(device)
    data = prepared(dataset, protocol, target)
    model = _model(data, protocol, seed, 1, target)
    runs = [(lr, protocol.sweep_epochs, protocol.sweep_examples) for lr in protocol.learning_rates]
    final_examples = protocol.final_examples or len(data.train_y)
    sweep: dict[float, float] = {}
    diverged: dict[float, bool] = {}

    def train(lr: float, epochs: int, examples: int) -> tuple[float, bool]:
        model.reset()
        optimizer = make_optimizer([model.params], lr, protocol.steps(epochs, examples))
        accuracy, bad = _train_and_score(
            model, optimizer.step, data, protocol, seed, epochs, examples
        )
        if progress is not None:
            progress(len(sweep) + 1, len(runs) + 1)
        return float(accuracy[0]), bool(bad[0])

    chosen: float | None = None
    final: tuple[float, bool] | None = None
    failure: str | None = None
    try:
        for lr, epochs, examples in runs:
            sweep[lr], diverged[lr] = train(lr, epochs, examples)
        chosen = best_lr(sweep, diverged)
        if chosen is not None:
            final = train(chosen, protocol.final_epochs, final_examples)
    except Exception as error:  # the candidate's own failure: report it, never raise
        failure = _message(error)
    return scored(
        dsl,
        key,
        sweep=sweep,
        best_lr=chosen,
        final=final,
        failure=failure,
        seconds=time.perf_counter() - start,
        device=str(target),
        protocol_hash=protocol.hash,
        seed=seed,
    )


def train_child(
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    *,
    dataset: str | datasets.Dataset,
    protocol: str | Protocol,
    seed: int,
    final: bool,
    device: str = "cpu",
) -> tuple[float, bool]:
    """One run of the child, as :func:`evaluate_optimizer` trains it: a sweep run (``final``
    False) or the final run, with ``make_optimizer([params])``; (held-out accuracy, diverged)."""
    protocol = get_protocol(protocol)
    target = torch.device(device)
    data = prepared(dataset, protocol, target)
    model = _model(data, protocol, seed, 1, target)
    epochs, examples = (
        (protocol.final_epochs, protocol.final_examples or len(data.train_y))
        if final
        else (protocol.sweep_epochs, protocol.sweep_examples)
    )
    optimizer = make_optimizer([model.params])
    accuracy, bad = _train_and_score(model, optimizer.step, data, protocol, seed, epochs, examples)
    return float(accuracy[0]), bool(bad[0])


def rule_optimizer(rule: Rule, seed: int, device: torch.device) -> OptimizerFactory:
    """Runs of ``rule`` through :class:`SymbolicOptimizer`, random draws seeded by ``seed``."""

    def make(params: list[Tensor], lr: float, total_steps: int) -> torch.optim.Optimizer:
        generator = _rule_generator(rule, seed, device)
        return SymbolicOptimizer(params, rule, lr=lr, total_steps=total_steps, generator=generator)

    return make


def _rule_generator(rule: Rule, seed: int, device: torch.device) -> torch.Generator | None:
    if not rule.stochastic:
        return None
    return torch.Generator(device).manual_seed(derived_seed(seed, "rule"))


def _unscored(
    dsl: str, key: str, status: Status, message: str, protocol: Protocol, seed: int, device: str
) -> EvalResult:
    return EvalResult(
        dsl=dsl,
        key=key,
        status=status,
        reward=0.0,
        best_lr=None,
        device=device,
        message=message,
        protocol_hash=protocol.hash,
        seed=seed,
    )


def screen(rule: Rule | str, protocol: Protocol, seed: int, device: str) -> Rule | EvalResult:
    """The parsed rule (a preset name, DSL text or a :class:`Rule`), or the result of a rule that
    needs no training (unparsable, degenerate)."""
    try:
        parsed = resolve(rule)
    except Exception as error:
        return _unscored(str(rule), "", "failed", _message(error), protocol, seed, device)
    if parsed.is_degenerate:
        message = "the update does not depend on the gradient"
        return _unscored(parsed.dsl, parsed.key, "degenerate", message, protocol, seed, device)
    return parsed


def evaluate(
    rule: Rule | str,
    *,
    dataset: str | datasets.Dataset = "fashion-mnist",
    protocol: str | Protocol = "quick",
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
) -> EvalResult:
    """Score one update rule under ``protocol`` (see the module docstring). Deterministic on the
    CPU: the same rule, data, protocol and seed give the same reward."""
    protocol = get_protocol(protocol)
    screened = screen(rule, protocol, seed, device)
    if isinstance(screened, EvalResult):
        return screened
    return evaluate_optimizer(
        rule_optimizer(screened, seed, torch.device(device)),
        dsl=screened.dsl,
        key=screened.key,
        dataset=dataset,
        protocol=protocol,
        seed=seed,
        device=device,
        progress=progress,
    )


# --- many candidates at once ---------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    """Consecutive models of one candidate in a stack: rows ``rows`` of ``StackedChild.params``,
    one learning rate each."""

    candidate: int
    rule: Rule
    rows: slice
    lrs: Tensor  # [rows]: one learning rate per model
    generator: torch.Generator | None
    state: dict[str, Tensor] = field(default_factory=dict)


def _train_stack(
    runs: Sequence[tuple[int, Rule, float]],
    *,
    data: Data,
    protocol: Protocol,
    seed: int,
    epochs: int,
    examples: int,
    device: torch.device,
    max_models: int,
    failures: dict[int, str],
    progress: Callable[[int], None],
) -> tuple[list[float], list[bool]]:
    """Train each ``(candidate, rule, lr)`` run as one model of a stack (``max_models`` at a time,
    a candidate's runs adjacent), each candidate's rows updated by its own rule; return each run's
    held-out accuracy and whether it diverged. A candidate that raises is put in ``failures`` and
    its rows stop being updated."""
    accuracies: list[float] = []
    diverged: list[bool] = []
    total_steps = protocol.steps(epochs, examples)
    for first in range(0, len(runs), max_models):
        chunk = runs[first : first + max_models]
        model = _model(data, protocol, seed, len(chunk), device)
        jobs = []
        for row, (candidate, rule, _) in enumerate(chunk):
            if jobs and jobs[-1].candidate == candidate:
                jobs[-1].rows = slice(jobs[-1].rows.start, row + 1)
            else:
                generator = _rule_generator(rule, seed, device)
                jobs.append(_Job(candidate, rule, slice(row, row + 1), torch.empty(0), generator))
        for job in jobs:
            lrs = [lr for _, _, lr in chunk[job.rows]]
            job.lrs = torch.tensor(lrs, device=device, dtype=model.params.dtype)

        @torch.no_grad()
        def update(model: StackedChild = model, jobs: list[_Job] = jobs) -> None:
            params, grads = model.params, model.params.grad
            for job in jobs:
                if job.candidate in failures:
                    continue
                try:
                    symbolic_update(
                        [params[job.rows]],
                        [grads[job.rows]],
                        [job.state],
                        rule=job.rule,
                        lr=job.lrs,
                        total_steps=total_steps,
                        generator=job.generator,
                    )
                except Exception as error:  # this candidate's failure only
                    failures[job.candidate] = _message(error)

        accuracy, bad = _train_and_score(model, update, data, protocol, seed, epochs, examples)
        accuracies += accuracy.tolist()
        diverged += bad.tolist()
        progress(len(chunk))
    return accuracies, diverged


def _by_lr(lrs: Sequence[float], values: list, candidate: int) -> dict:
    """The values of the ``candidate``-th rule's sweep runs (``len(lrs)`` adjacent runs)."""
    return dict(zip(lrs, values[candidate * len(lrs) : (candidate + 1) * len(lrs)], strict=True))


def evaluate_batch(
    rules: Sequence[Rule | str],
    *,
    dataset: str | datasets.Dataset = "fashion-mnist",
    protocol: str | Protocol = "quick",
    seed: int = 0,
    device: str = "cuda",
    max_models: int | None = None,
    progress: Progress | None = None,
) -> list[EvalResult]:
    """Score many rules at once: every (rule, learning rate) of the sweep is one model of a
    stacked child (``max_models`` per stack, default by device type), then every rule's final
    run. Same results as :func:`evaluate` up to float rounding (and, for stochastic rules, up to
    the random draws). ``seconds`` is the batch's wall time shared equally by its trained rules.
    """
    start = time.perf_counter()
    protocol = get_protocol(protocol)
    target = torch.device(device)
    screened = [screen(rule, protocol, seed, str(target)) for rule in rules]
    live = {i: rule for i, rule in enumerate(screened) if isinstance(rule, Rule)}
    data = prepared(dataset, protocol, target)
    max_models = max_models or DEFAULT_MAX_MODELS.get(target.type, DEFAULT_MAX_MODELS["cuda"])
    final_examples = protocol.final_examples or len(data.train_y)
    lrs = protocol.learning_rates
    failures: dict[int, str] = {}
    done = 0

    def advance(models: int) -> None:
        nonlocal done
        done += models
        if progress is not None:
            progress(done, len(live) * (len(lrs) + 1))

    def train(runs: list[tuple[int, Rule, float]], epochs: int, examples: int):
        return _train_stack(
            runs,
            data=data,
            protocol=protocol,
            seed=seed,
            epochs=epochs,
            examples=examples,
            device=target,
            max_models=max_models,
            failures=failures,
            progress=advance,
        )

    sweep_runs = [(i, rule, lr) for i, rule in live.items() for lr in lrs]
    accuracy, diverged = train(sweep_runs, protocol.sweep_epochs, protocol.sweep_examples)
    sweeps = {i: _by_lr(lrs, accuracy, n) for n, i in enumerate(live)}
    divergences = {i: _by_lr(lrs, diverged, n) for n, i in enumerate(live)}
    best = {i: best_lr(sweeps[i], divergences[i]) for i in live}
    final_runs = [
        (i, live[i], lr) for i, lr in best.items() if lr is not None and i not in failures
    ]
    advance(len(live) - len(final_runs))  # rules with no final run are done
    final_accuracy, final_diverged = train(final_runs, protocol.final_epochs, final_examples)
    seconds = (time.perf_counter() - start) / max(len(live), 1)
    finals = {
        i: (a, d)
        for (i, _, _), a, d in zip(final_runs, final_accuracy, final_diverged, strict=True)
    }

    def result(i: int, rule: Rule) -> EvalResult:
        return scored(
            rule.dsl,
            rule.key,
            sweep=sweeps[i],
            best_lr=best[i],
            final=finals.get(i),
            failure=failures.get(i),
            seconds=seconds,
            device=str(target),
            protocol_hash=protocol.hash,
            seed=seed,
        )

    return [result(i, r) if isinstance(r, Rule) else r for i, r in enumerate(screened)]
