"""``nos-sym evaluate``: one rule's reward (memoized in the reward store), or the baselines;
``nos-sym calibrate``: cheap protocols' rankings against an expensive one."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from nos_sym.errors import CommandError
from nos_sym.evaluation import datasets
from nos_sym.evaluation.baselines import BASELINES
from nos_sym.evaluation.memoized import WAIT_SECONDS as WAIT_SECONDS  # re-exported
from nos_sym.evaluation.memoized import evaluate_memoized
from nos_sym.evaluation.protocol import PROTOCOLS
from nos_sym.evaluation.store import Record, RewardStore
from nos_sym.presets import PRESETS, resolve

if TYPE_CHECKING:
    from nos_sym.tasks.base import Task


def default_store() -> Path:
    """``$NOS_STORE``, else ``rewards.sqlite`` in the user cache."""
    return Path(os.environ.get("NOS_STORE") or datasets.cache_dir() / "rewards.sqlite")


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback driving a tqdm bar on stderr, opened at its first
    call (an answer from the store shows no bar) and closed on exit."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(desc=description, unit="run", leave=False, dynamic_ncols=True)
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def _record_json(record: Record, cached: bool) -> dict:
    """The stored result as JSON, and whether it was answered from the store."""
    return {**record.result.to_json(), "cached": cached}


def _evaluate_rule(args: argparse.Namespace, task: Task) -> dict:
    rule = resolve(args.rule)
    store_path = Path(args.store) if args.store else default_store()
    store_path.parent.mkdir(parents=True, exist_ok=True)
    with RewardStore(store_path) as store, progress_bar(f"evaluate {rule.dsl}") as progress:
        record, cached = evaluate_memoized(
            rule,
            task=task,
            protocol=task.protocol(args.protocol),
            seed=args.seed,
            store=store,
            device=args.device,
            progress=progress,
        )
    return _record_json(record, cached)


def task_from(args: argparse.Namespace) -> Task:
    """The task of ``--task`` (``--dataset`` sets the data set of a task that has one), checked
    to run here (e.g. its data present) before anything is paid for."""
    from nos_sym.tasks.registry import get_task

    if args.dataset is not None and args.dataset not in datasets.DATASETS:
        known = ", ".join(datasets.DATASETS)
        raise CommandError(f"unknown dataset {args.dataset!r} (known: {known})")
    task = get_task(args.task, dataset=args.dataset)
    try:
        task.protocol(getattr(args, "protocol", None))
    except ValueError as error:
        raise CommandError(str(error)) from None
    task.check()
    return task


def add_task_options(command: argparse.ArgumentParser, protocol: bool = True) -> None:
    """``--task``, ``--dataset`` (and ``--protocol``) as every command that trains takes them."""
    from nos_sym.tasks.registry import DEFAULT_TASK, TASKS

    command.add_argument(
        "--task",
        default=DEFAULT_TASK,
        help=f"{' | '.join(TASKS)} (NAME,option=value,...), or module:attribute for your own",
    )
    command.add_argument(
        "--dataset",
        help=f"the data set of a task that has one: {' | '.join(datasets.DATASETS)} "
        "(child default: fashion-mnist)",
    )
    if protocol:
        command.add_argument(
            "--protocol",
            help=f"{' | '.join(PROTOCOLS)} or the task's own (default: the task's default)",
        )


def _baselines(args: argparse.Namespace, task: Task) -> None:
    from nos_sym.evaluation.baselines import baseline_table

    rows = baseline_table(protocol=args.protocol, seeds=args.seeds, device=args.device, task=task)
    if args.format == "json":
        print(json.dumps(rows))
        return
    print(
        f"| optimizer | best lr per seed | reward per seed {tuple(args.seeds)} | mean ± std |"
        " s/candidate |\n| --- | --- | --- | --- | --- |"
    )
    for row in rows:
        lrs = ", ".join("—" if lr is None else f"{lr:g}" for lr in row["best_lrs"])
        rewards = ", ".join(f"{r:.4f}" for r in row["rewards"])
        print(
            f"| {row['optimizer']} | {lrs} | {rewards} | {row['mean']:.4f} ± {row['std']:.4f} "
            f"| {row['seconds']:.1f} |"
        )


def _evaluate_command(args: argparse.Namespace) -> None:
    if not args.baselines and args.rule is None:
        raise CommandError("evaluate needs a RULE (or --baselines)")
    task = task_from(args)
    if args.baselines:
        _baselines(args, task)
        return
    summary = _evaluate_rule(args, task)
    if args.format == "json":
        print(json.dumps(summary))
        return
    width = max(map(len, summary))
    for name, value in summary.items():
        print(f"{name:>{width}}: {value}")


def add_evaluate(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "rule", nargs="?", help="a DSL rule, quoted as one argument, or a preset name"
    )
    add_task_options(command)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    command.add_argument("--store", help=f"reward store (default: {default_store()})")
    command.add_argument("--format", choices=("text", "json"), default="text")
    command.add_argument(
        "--baselines",
        action="store_true",
        help=f"print the baseline table ({', '.join(BASELINES)}) under the same protocol instead",
    )
    command.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the baseline table"
    )
    command.set_defaults(run=_evaluate_command)


def _names(text: str, known: dict | tuple, what: str) -> list[str]:
    """A comma-separated list of names, each one of ``known``, none twice."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in known:
            raise CommandError(f"unknown {what} {name!r} (known: {', '.join(known)})")
    if len(set(names)) != len(names):
        raise CommandError(f"a {what} is given twice in {text!r}")
    return names


def check_distinct_seeds(seeds: list[int]) -> None:
    """``--seeds`` names every seed at most once (a repeated seed would be paid for, or
    averaged, twice)."""
    if len(set(seeds)) != len(seeds):
        raise CommandError(f"--seeds has a seed twice: {seeds}")


def _calibrate_command(args: argparse.Namespace) -> None:
    import shlex

    from nos_sym.controller.space import SPACES, get_space
    from nos_sym.evaluation import calibrate

    task = task_from(args)
    known = task.known_protocols
    protocols = [task.protocol(name) for name in _names(args.protocols, known, "protocol")]
    if len(protocols) < 2:
        raise CommandError(
            "--protocols needs at least two protocols: the cheaper ones, then the truth"
        )
    presets = _names(args.presets, PRESETS, "preset")
    if args.space not in SPACES:
        raise CommandError(f"unknown space {args.space!r} (known: {', '.join(SPACES)})")
    if args.random < 0:
        raise CommandError(f"--random must be ≥ 0, got {args.random}")
    check_distinct_seeds(args.seeds)
    try:
        space = get_space(args.space)
        rules = calibrate.reference_rules(presets, space, args.random, args.sample_seed)
    except ValueError as error:
        raise CommandError(f"--space {args.space} --random {args.random}: {error}") from None
    if len(rules) < 2:
        raise CommandError(f"calibration needs at least two rules, got {len(rules)}")
    output = Path(args.output)
    try:  # an output that cannot be written: before paying for anything
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"cannot write {output}: {error.strerror or error}") from None
    store_path = Path(args.store) if args.store else default_store()
    store_path.parent.mkdir(parents=True, exist_ok=True)
    with RewardStore(store_path) as store, progress_bar("calibrate") as progress:
        measurements = calibrate.measure(
            rules,
            protocols,
            args.seeds,
            task=task,
            store=store,
            device=args.device,
            progress=progress,
        )
    command = shlex.join(
        [
            "nos-sym",
            "calibrate",
            "--task",
            args.task,
            *(["--dataset", args.dataset] if args.dataset else []),
            "--protocols",
            args.protocols,
            "--seeds",
            *map(str, args.seeds),
            "--random",
            str(args.random),
            "--space",
            args.space,
            "--sample-seed",
            str(args.sample_seed),
            "--presets",
            args.presets,
            "--store",
            str(store_path),
            "-o",
            str(output),
        ]
    )  # every option spelt out: the exact command, whatever the defaults become
    try:
        stats = calibrate.report(measurements, output, command)
    except OSError as error:
        raise CommandError(f"cannot write {output}: {error.strerror or error}") from None
    print(calibrate.markdown_table(stats, stats[-1].seconds), end="")
    print(
        f"{len(rules)} rules × {len(protocols)} protocols × {len(args.seeds)} seeds: "
        f"{measurements.trained} trained, {measurements.from_store} from the store; "
        f"written to {output}"
    )


def add_calibrate(command: argparse.ArgumentParser) -> None:
    from nos_sym.controller.space import SPACES
    from nos_sym.evaluation.calibrate import REFERENCE_PRESETS

    add_task_options(command, protocol=False)
    command.add_argument(
        "--protocols",
        default="quick,paper",
        help="comma-separated, cheapest first; the last one is the truth "
        f"(known: {', '.join(PROTOCOLS)})",
    )
    command.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    command.add_argument(
        "--random", type=int, default=40, help="non-degenerate rules sampled from --space"
    )
    command.add_argument("--space", default="paper", help=" | ".join(SPACES))
    command.add_argument("--sample-seed", type=int, default=0, help="seeds the sampled rules")
    command.add_argument(
        "--presets",
        default=",".join(REFERENCE_PRESETS),
        help="comma-separated preset names of the reference set (default: the baselines and "
        "the paper's Table 1; '' for none)",
    )
    command.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    command.add_argument("--store", help=f"reward store (default: {default_store()})")
    command.add_argument("-o", "--output", required=True, help="directory of the report")
    command.set_defaults(run=_calibrate_command)
