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
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import torch
from _results import write_section
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


def timed(setups: dict[str, tuple[Setup, int]], steps: int, rounds: int) -> dict[str, float]:
    """Median ms per step (divided by the setup's model count) over interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name, (setup, models) in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                setup.step()
            times[name].append((time.perf_counter() - start) * 1000 / steps / models)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
