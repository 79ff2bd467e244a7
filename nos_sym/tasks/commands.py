"""The task commands: ``nos-sym rosenbrock`` (rules on the Rosenbrock function, the paper's
Figure 6: a Markdown table, JSON and two figures) and ``nos-sym transfer`` (baselines and rules
on a bigger task, the paper's Table 1: Markdown, LaTeX, JSON and the curves)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nos_sym.dsl import Rule
    from nos_sym.evaluation.protocol import Protocol
    from nos_sym.tasks.base import Task
    from nos_sym.tasks.rosenbrock import Best

_TABLE = "rosenbrock.md"
_JSON = "rosenbrock.json"
_PATHS = "rosenbrock_paths.png"
_LOSSES = "rosenbrock_losses.png"


def add_rosenbrock(command: argparse.ArgumentParser) -> None:
    """The ``rosenbrock`` sub-command's arguments."""
    command.add_argument("rules", nargs="+", metavar="RULE", help="preset names or DSL rules")
    command.add_argument("-o", "--output", required=True, help="output directory")
    command.add_argument("--steps", type=int, help="iterations per run (default 4000)")
    command.add_argument(
        "--lrs", type=float, nargs="+", help="learning rates (default 1e-6 … 1, half decades)"
    )
    command.add_argument(
        "--epsilons",
        type=float,
        nargs="+",
        help="ε swept for rules that read ε: div, adam, rmsprop (default 1e-3 … 1e-8)",
    )
    command.add_argument(
        "--start",
        type=float,
        nargs=2,
        action="append",
        metavar=("X", "Y"),
        help="a starting point (repeat for several; default: the task's four)",
    )
    command.set_defaults(run=_rosenbrock_command)


def _check(args: argparse.Namespace) -> list[tuple[float, float]]:
    """Fill in the task's defaults and check the numbers; the starting points."""
    from nos_sym.errors import CommandError
    from nos_sym.tasks import rosenbrock as R

    args.steps = R.STEPS if args.steps is None else args.steps
    args.lrs = args.lrs or list(R.LRS)
    args.epsilons = args.epsilons or list(R.EPSILONS)
    starts = [tuple(start) for start in args.start] if args.start else list(R.STARTS)
    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    for name, values in (("--lrs", args.lrs), ("--epsilons", args.epsilons)):
        bad = [value for value in values if not (math.isfinite(value) and value > 0)]
        if bad:
            raise CommandError(f"{name} must be positive finite numbers, got {bad[0]}")
    if not all(math.isfinite(value) for start in starts for value in start):
        raise CommandError(f"--start must be finite numbers, got {starts}")
    return starts


def _rosenbrock_command(args: argparse.Namespace) -> None:
    from nos_sym.presets import resolve
    from nos_sym.tasks import rosenbrock as R

    starts = _check(args)
    rules = {name: resolve(name) for name in args.rules}  # every bad rule fails before any run
    output = output_directory(args.output)
    began = time.perf_counter()
    results = {}
    for name, rule in rules.items():
        epsilons = args.epsilons if R.reads_eps(rule) else (None,)
        results[name] = R.best(rule, args.lrs, starts, args.steps, epsilons)
        print(f"{name}: {results[name].mean:.2f} ± {results[name].std:.2f}", flush=True)
    seconds = time.perf_counter() - began
    (output / _TABLE).write_text(markdown_table(results, starts))
    summary = {
        "steps": args.steps,
        "lrs": list(args.lrs),
        "epsilons": list(args.epsilons),
        "starts": [list(start) for start in starts],
        "metric": "-log10(final loss), loss clamped to [LOSS_FLOOR, float64 max], NaN = max",
        "loss_floor": R.LOSS_FLOOR,
        "diverged_metric": R.DIVERGED_METRIC,
        "seconds": seconds,
        "rules": [_rule_json(name, rules[name], result) for name, result in results.items()],
    }
    (output / _JSON).write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, starts, output)
    print(f"wrote {output / _TABLE}, {output / _JSON}, {output / _PATHS}, {output / _LOSSES}")


def _rule_json(name: str, rule: Rule, result: Best) -> dict:
    from nos_sym.tasks import rosenbrock as R

    return {
        "name": name,
        "dsl": rule.dsl,
        "key": rule.key,
        "reads_eps": R.reads_eps(rule),
        "lr": result.lr,
        "eps": result.eps,
        "metrics": list(result.metrics),
        "final_losses": [loss if math.isfinite(loss) else None for loss in result.final_losses],
        "mean": result.mean,
        "std": result.std,
        # mean metric over the starts of every (ε, lr) of the sweep: [ε][lr]
        "sweep_mean": result.sweep.metrics.mean(axis=-1).tolist(),
    }


def markdown_table(results: dict[str, Best], starts: list[tuple[float, float]]) -> str:
    """One row per rule: best lr, ε, the metric per start, mean ± std (sample std)."""
    heads = " | ".join(f"({x:g}, {y:g})" for x, y in starts)
    lines = [
        f"| rule | best lr | ε | {heads} | mean ± std |",
        "| --- | --- | --- |" + " --- |" * len(starts) + " --- |",
    ]
    for name, result in results.items():
        eps = "—" if result.eps is None else f"{result.eps:g}"
        values = " | ".join(f"{value:.2f}" for value in result.metrics)
        lines.append(
            f"| `{name}` | {result.lr:.3g} | {eps} | {values} | "
            f"{result.mean:.2f} ± {result.std:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Best], starts: list[tuple[float, float]], output: Path) -> None:
    """Two PNGs with one panel per start: each rule's best path over the contour of log10 f,
    and its loss curve (log scale, floored at LOSS_FLOOR, cut at 10 × the starting loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from nos_sym.tasks import rosenbrock as R

    xs, ys = np.meshgrid(np.linspace(-2, 2, 300), np.linspace(-1, 3, 300))
    surface = R.loss(torch.from_numpy(np.stack((xs, ys), axis=-1))).numpy()
    levels = np.logspace(-1, 3.5, 12)
    columns = min(len(starts), 2)
    rows = math.ceil(len(starts) / columns)
    size = (4.6 * columns, 4 * rows)
    paths, path_axes = plt.subplots(rows, columns, figsize=size, squeeze=False)
    losses, loss_axes = plt.subplots(rows, columns, figsize=size, squeeze=False)
    for index, (x, y) in enumerate(starts):
        path_ax, loss_ax = path_axes.flat[index], loss_axes.flat[index]
        path_ax.contour(xs, ys, surface, levels=levels, colors="0.7", linewidths=0.6)
        for name, result in results.items():
            eps = "" if result.eps is None else f", ε {result.eps:g}"
            label = f"{name} (lr {result.lr:.3g}{eps})"
            path_ax.plot(*result.paths[index].T, lw=1.2, label=label)
            curve = np.maximum(result.losses[index], R.LOSS_FLOOR)  # NaN stays NaN: not drawn
            loss_ax.semilogy(np.where(np.isfinite(curve), curve, np.nan), lw=1.2, label=label)
        path_ax.plot([x], [y], "o", color="tab:red", ms=5)
        path_ax.plot([1], [1], "o", color="black", ms=6)
        path_ax.set(xlim=(-2, 2), ylim=(-1, 3), title=f"start ({x:g}, {y:g})", xlabel="x")
        top = 10 * max(1.0, float(R.loss(torch.tensor((x, y), dtype=torch.float64))))
        loss_ax.set(title=f"start ({x:g}, {y:g})", xlabel="step", ylabel="loss", ylim=(None, top))
    for axes in (path_axes, loss_axes):
        for ax in axes.flat[len(starts) :]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize=7)
    paths.tight_layout()
    losses.tight_layout()
    for figure, name in ((paths, _PATHS), (losses, _LOSSES)):
        figure.savefig(output / name, dpi=72, pil_kwargs={"optimize": True})
        plt.close(figure)


def output_directory(path: str) -> Path:
    """The output directory ``path``, created, or a one-line :class:`CommandError` when it
    cannot be created or written."""
    import os

    from nos_sym.errors import CommandError

    output = Path(path)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"cannot create {output}: {error.strerror or error}") from None
    if not os.access(output, os.W_OK):
        raise CommandError(f"cannot write {output}: permission denied")
    return output


def add_transfer(command: argparse.ArgumentParser) -> None:
    """The ``transfer`` sub-command's arguments."""
    from nos_sym.evaluation.commands import add_task_options
    from nos_sym.tasks.transfer import BASELINE_NAMES, DEFAULT_RULES

    add_task_options(command)
    command.set_defaults(task="wrn")  # the paper's Table 1 model (help: --task)
    command.add_argument(
        "--rules",
        nargs="+",
        default=list(DEFAULT_RULES),
        metavar="RULE",
        help="preset names or DSL rules, after the baselines "
        f"{', '.join(BASELINE_NAMES)} (default: PowerSign/AddSign with and without decays, "
        "then the paper's Table 1 rules)",
    )
    command.add_argument(
        "--baselines",
        nargs="*",
        default=list(BASELINE_NAMES),
        metavar="NAME",
        help=f"torch.optim baselines listed first (default: {' '.join(BASELINE_NAMES)})",
    )
    command.add_argument(
        "--lrs", type=float, nargs="+", help="learning rates of the sweep (default: the protocol's)"
    )
    command.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    command.add_argument(
        "--workers",
        type=int,
        default=1,
        help="evaluations at once, in spawned processes sharing the cores (default 1)",
    )
    command.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    command.add_argument("--store", help="reward store (default: DIR/store.sqlite)")
    command.add_argument("-o", "--output", required=True, help="output directory DIR")
    command.set_defaults(run=_transfer_command)


def _transfer_protocol(args: argparse.Namespace, task: Task) -> Protocol:
    """The task's protocol, its learning rates replaced by ``--lrs`` (a new hash)."""
    import dataclasses

    from nos_sym.errors import CommandError

    protocol = task.protocol(args.protocol)
    if not args.lrs:
        return protocol
    try:
        return dataclasses.replace(protocol, learning_rates=tuple(args.lrs))
    except ValueError as error:
        raise CommandError(f"--lrs: {error}") from None


def _check_transfer(args: argparse.Namespace, task: Task, protocol: Protocol) -> None:
    """What can be wrong in the options before training: seeds, baselines, workers (the task
    must pickle to reach them)."""
    import pickle

    from nos_sym.errors import CommandError
    from nos_sym.evaluation.baselines import BASELINES
    from nos_sym.evaluation.commands import check_distinct_seeds

    check_distinct_seeds(args.seeds)
    unknown = [name for name in args.baselines if name not in BASELINES]
    if unknown:
        raise CommandError(f"unknown baseline {unknown[0]!r} (known: {', '.join(BASELINES)})")
    if args.workers < 1:
        raise CommandError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1:
        try:
            pickle.dumps((task, protocol))
        except Exception as error:  # what pickling a user's object raises is not ours to know
            raise CommandError(
                f"--workers {args.workers}: task {task.name!r} cannot be sent to worker "
                f"processes (define it at module level): {error}"
            ) from None


def _transfer_command(args: argparse.Namespace) -> None:
    import datetime
    import shlex

    from nos_sym.evaluation.commands import progress_bar, task_from
    from nos_sym.tasks import transfer as T

    task = task_from(args)
    protocol = _transfer_protocol(args, task)
    _check_transfer(args, task, protocol)
    items = T.contenders(args.rules, args.baselines)  # a bad rule fails before anything trains
    output = output_directory(args.output)
    store = Path(args.store) if args.store else output / "store.sqlite"
    store.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(
        [
            "nos-sym",
            "transfer",
            "--task",
            args.task,
            *(["--dataset", args.dataset] if args.dataset else []),
            "--protocol",
            args.protocol or task.default_protocol,
            *(["--lrs", *map(str, args.lrs)] if args.lrs else []),
            "--baselines",
            *args.baselines,
            "--rules",
            *args.rules,
            "--seeds",
            *map(str, args.seeds),
            "--workers",
            str(args.workers),
            *(["--device", args.device] if args.device != "cpu" else []),
            *(["--store", str(store)] if args.store else []),
            "-o",
            str(output),
        ]
    )  # every option spelt out: the exact command, whatever the defaults become
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    began = time.perf_counter()
    with progress_bar("transfer") as progress:
        measured = T.measure(
            items,
            args.seeds,
            task=task,
            protocol=protocol,
            store_path=store,
            workers=args.workers,
            device=args.device,
            progress=progress,
        )
    rows = T.write(
        measured,
        output,
        task=task,
        protocol=protocol,
        command=command,
        date=date,
        seconds=time.perf_counter() - began,
    )
    print(T.markdown_table(rows, len(args.seeds)), end="")
    print(
        f"{len(items)} optimizers × {len(args.seeds)} seeds: {measured.trained} trained, "
        f"{measured.from_store} from the store; written to {output}"
    )
