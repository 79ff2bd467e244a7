"""Where one training step of the child network goes on the CPU, and what the alternatives
issue 15 names cost, per step, in the same process.

A step is what the evaluator runs 1,200 times per ``paper`` candidate: the forward and backward
of :class:`~nos_sym.evaluation.child.StackedChild` on a batch of 100 Fashion-MNIST images and a
DSL PowerSign step. For each precision (the protocol's ``bf16`` autocast and ``fp32``, both
channels-last), ms per step, median over interleaved rounds, of:

- **eager** — the model's step computing its patch moments itself (the evaluator's step before
  they were shared; the reference of the ratios);
- **eager, patch moments shared** — the evaluator's step: the batch's patch moments from
  :func:`~nos_sym.evaluation.evaluator.epoch_moments`, computed once per epoch and process;
- **compiled** — ``torch.compile(StackedChild.losses)`` as it stands (compiled once; the
  compile's seconds are reported separately), the first try the issue describes;
- **compiled, patches eager** — the same with ``image_patches`` left out of the graph
  (``torch.compiler.disable``), the kernel that dominated the compiled step in its profile;
- **7 models stacked, per model** — the seven sweep learning rates as one stacked model of 7
  copies (one shared patch matrix, a grouped second convolution), its step time / 7.

Then the evaluator's step's profile: the operators with the largest share of self CPU time.

``--pooling`` instead times the evaluator's step against the same step with the two 2×2
max-pools written as a reshape + ``max`` or a reshape + ``amax`` (process CPU time), counts the
pooling windows whose maximum is tied, and compares losses and gradients with ``max_pool2d``'s
on the first batches; it prints and leaves RESULTS.md alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from unittest import mock

import torch
from _results import write_section
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

import nos_sym.evaluation.child as child
from nos_sym.evaluation.data import prepared, shuffled_epoch
from nos_sym.evaluation.evaluator import _model, epoch_moments
from nos_sym.evaluation.protocol import autocast, get_protocol
from nos_sym.presets import resolve
from nos_sym.symbolic_optim import SymbolicOptimizer

PRECISIONS = ("bf16", "fp32")
SWEEP_MODELS = 7
PROFILED = "eager, patch moments shared"


class Setup:
    """One way of training: its model, optimizer and loss function, stepping through one
    epoch's batches."""

    def __init__(self, protocol, copies: int, losses: Callable, shared: bool = False) -> None:
        self.protocol = protocol
        self.data = prepared("fashion-mnist", protocol, torch.device("cpu"))
        self.xs, self.ys = shuffled_epoch(self.data, 0, 0, protocol.sweep_examples)
        self.model = _model(self.data, protocol, 0, copies, torch.device("cpu"))
        self.optimizer = SymbolicOptimizer([self.model.params], resolve("powersign"), lr=1e-3)
        self.losses = losses
        self.moments = (
            epoch_moments(self.data, 0, 0, protocol.sweep_examples, protocol.batch_size)
            if shared
            else None
        )
        self.batch = 0

    def step(self) -> None:
        size = self.protocol.batch_size
        index = self.batch % (len(self.ys) // size)
        self.batch += 1
        start = index * size
        moments = None if self.moments is None else self.moments[index]
        with autocast(self.protocol, torch.device("cpu")):
            losses = self.losses(
                self.model, self.xs[start : start + size], self.ys[start : start + size], moments
            )
        self.model.params.grad = None
        losses.sum().backward()
        self.optimizer.step()


def compiled(patches_eager: bool) -> Callable:
    """``StackedChild.losses`` under ``torch.compile``; optionally with the patch matrix built
    eagerly (a graph break around ``image_patches``)."""
    function = child.StackedChild.losses
    if not patches_eager:
        return torch.compile(function, dynamic=False)
    eager_patches = torch.compiler.disable(child.image_patches)

    def losses(model, x, y, moments):
        original = child.image_patches
        child.image_patches = eager_patches
        try:
            return inner(model, x, y, moments)
        finally:
            child.image_patches = original

    inner = torch.compile(function, dynamic=False)
    return losses


def pool_reshape_max(h: Tensor, k: int) -> Tensor:
    """``max_pool2d(h, k)`` (k dividing the size) as a reshape + ``max`` over each window's k²
    values, channels-last in and out: one copy; the gradient goes to the window's first maximum
    in scan order, as ``max_pool2d``'s does."""
    batch, channels, height, width = h.shape
    windows = h.permute(0, 2, 3, 1).unflatten(2, (width // k, k)).unflatten(1, (height // k, k))
    flat = windows.transpose(2, 3).reshape(batch, height // k, width // k, k * k, channels)
    return flat.max(dim=3).values.permute(0, 3, 1, 2)


def pool_reshape_amax(h: Tensor, k: int) -> Tensor:
    """``max_pool2d(h, k)`` as a view + ``amax``: its backward splits the gradient evenly among a
    window's tied maxima; copied, because ``amax`` saves its result and the model's ReLU is in
    place."""
    windows = h.unflatten(3, (h.shape[3] // k, k)).unflatten(2, (h.shape[2] // k, k))
    return windows.amax(dim=(3, 5)).clone()


POOLS = {
    "max-pool as reshape + max": pool_reshape_max,
    "max-pool as reshape + amax": pool_reshape_amax,
}


def pooled_with(pool: Callable[[Tensor, int], Tensor]) -> Callable:
    """``StackedChild.losses`` with ``F.max_pool2d`` replaced by ``pool`` during the call."""

    def losses(model, x, y, moments):
        with mock.patch.object(child.F, "max_pool2d", pool):
            return child.StackedChild.losses(model, x, y, moments)

    return losses


def timed(
    setups: dict[str, tuple[Setup, int]],
    steps: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median ms per step (divided by the setup's model count) over interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name, (setup, models) in setups.items():
            start = clock()
            for _ in range(steps):
                setup.step()
            times[name].append((clock() - start) * 1000 / steps / models)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def batch_gradient(setup: Setup, index: int, losses: Callable) -> tuple[Tensor, Tensor]:
    """(summed loss, gradient of the parameters) of batch ``index`` at the current weights."""
    size = setup.protocol.batch_size
    x, y = setup.xs[index * size : (index + 1) * size], setup.ys[index * size : (index + 1) * size]
    with autocast(setup.protocol, torch.device("cpu")):
        loss = losses(setup.model, x, y, setup.moments[index]).sum()
    (gradient,) = torch.autograd.grad(loss, setup.model.params)
    return loss.detach(), gradient


def tied_windows(setup: Setup, batches: int) -> list[tuple[float, float]]:
    """Per max-pool, the share of its windows whose maximum two or more values reach, and the
    share where all k² are equal, over the first ``batches`` batches at the current weights."""
    counts: list[tuple[int, int, int]] = []

    def counting(h: Tensor, k: int) -> Tensor:
        windows = h.detach().unflatten(3, (h.shape[3] // k, k)).unflatten(2, (h.shape[2] // k, k))
        reaching = (windows == windows.amax(dim=(3, 5), keepdim=True)).sum(dim=(3, 5))
        counts.append((int((reaching > 1).sum()), int((reaching == k * k).sum()), reaching.numel()))
        return torch.max_pool2d(h, k)  # what F.max_pool2d calls (F's is patched here)

    for index in range(batches):
        batch_gradient(setup, index, pooled_with(counting))
    layers = [counts[layer::2] for layer in range(2)]
    return [
        (
            sum(c[0] for c in rows) / sum(c[2] for c in rows),
            sum(c[1] for c in rows) / sum(c[2] for c in rows),
        )
        for rows in layers
    ]


def pooling(args: argparse.Namespace) -> None:
    """``--pooling``: the max-pool variants' step time (process CPU time), tied windows, and
    the differences of their losses and gradients from ``max_pool2d``'s; printed."""
    batches = 5
    for precision in PRECISIONS:
        protocol = dataclasses.replace(get_protocol("paper"), precision=precision)
        reference = Setup(protocol, 1, child.StackedChild.losses, shared=True)
        for layer, (tied, equal) in enumerate(tied_windows(reference, batches), start=1):
            print(
                f"{precision} max-pool {layer}: {tied:.1%} of the windows have a tied maximum,"
                f" {equal:.1%} four equal values (first {batches} batches, initial weights)"
            )
        expected = [batch_gradient(reference, i, child.StackedChild.losses) for i in range(batches)]
        for name, pool in POOLS.items():
            found = [batch_gradient(reference, i, pooled_with(pool)) for i in range(batches)]
            loss = max(float((a[0] - b[0]).abs()) for a, b in zip(expected, found, strict=True))
            relative = max(
                float((a[1] - b[1]).norm() / a[1].norm())
                for a, b in zip(expected, found, strict=True)
            )
            identical = all(torch.equal(a[1], b[1]) for a, b in zip(expected, found, strict=True))
            print(
                f"{precision} {name}: max |Δ loss| {loss:.1e}, max |Δ gradient| / |gradient|"
                f" {relative:.1e}, gradients identical: {identical}"
            )
        setups = {"eager, patch moments shared": (reference, 1)}
        setups.update(
            {name: (Setup(protocol, 1, pooled_with(pool), True), 1) for name, pool in POOLS.items()}
        )
        for setup, _ in setups.values():
            setup.step()
        ms = timed(setups, args.steps, args.rounds, clock=time.process_time)
        reference_ms = ms["eager, patch moments shared"]
        for name in setups:
            print(f"{precision} {name}: {ms[name]:.2f} ms / step, {ms[name] / reference_ms:.2f}×")


def profile_rows(setup: Setup, steps: int, top: int) -> list[tuple[str, float]]:
    """(operator, share of self CPU time) of the ``top`` operators of ``steps`` steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            setup.step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / total) for e in events[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--top", type=int, default=8, help="operators in the profile")
    parser.add_argument(
        "--pooling",
        action="store_true",
        help="time and compare the max-pool variants instead (printed, RESULTS.md untouched)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.pooling:
        pooling(args)
        return
    rows, profiles = [], []
    for precision in PRECISIONS:
        protocol = dataclasses.replace(get_protocol("paper"), precision=precision)
        setups: dict[str, tuple[Setup, int]] = {}
        compile_seconds: dict[str, float] = {}
        variants = {
            "eager": (1, child.StackedChild.losses),
            "eager, patch moments shared": (1, child.StackedChild.losses),
            "compiled": (1, compiled(False)),
            "compiled, patches eager": (1, compiled(True)),
            f"{SWEEP_MODELS} models stacked, per model": (
                SWEEP_MODELS,
                child.StackedChild.losses,
            ),
        }
        for name, (copies, losses) in variants.items():
            setup = Setup(protocol, copies, losses, shared=name.endswith("shared"))
            start = time.perf_counter()
            setup.step()  # compiles, for the compiled variants
            compile_seconds[name] = time.perf_counter() - start
            setups[name] = (setup, copies)
        ms = timed(setups, args.steps, args.rounds)
        for name in setups:
            first = f"{compile_seconds[name]:.1f}" if name.startswith("compiled") else "—"
            rows.append(
                f"| {precision} | {name} | {ms[name]:.2f} | {ms[name] / ms['eager']:.2f}× |"
                f" {first} |"
            )
        profiles += [
            f"| {precision} | `{op}` | {share:.1%} |"
            for op, share in profile_rows(setups[PROFILED][0], args.steps, args.top)
        ]
    body = "\n".join(
        [
            f"One training step of the child (batch 100, Fashion-MNIST, `paper` protocol's"
            f" model, channels-last, DSL PowerSign), {args.threads} threads; median over"
            f" {args.rounds} interleaved rounds of {args.steps} steps. `first step`: seconds of"
            " the first call (the compile; less when Inductor's on-disk cache holds the graphs"
            " from an earlier run).",
            "",
            "| precision | variant | ms / step | vs eager | first step (s) |",
            "| --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"The evaluator's step (eager, patch moments shared), share of self CPU time"
            f" ({args.steps} steps, torch.profiler):",
            "",
            "| precision | operator | share |",
            "| --- | --- | --- |",
            *profiles,
        ]
    )
    write_section("bench_child", body)


if __name__ == "__main__":
    main()
