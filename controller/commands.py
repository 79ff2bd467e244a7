"""``nos-sym search``, ``report`` and ``study`` (``top`` and ``status``:
:mod:`~nos_sym.controller.read_commands`, re-exported)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from nos_sym.controller.backends import BACKENDS
from nos_sym.controller.read_commands import add_status, add_top, print_top
from nos_sym.controller.rundir import (
    ALGORITHMS,
    DEDUP,
    Counters,
    SearchConfig,
    SearchError,
    load_checkpoint,
    load_config,
)
from nos_sym.controller.search import SearchRun
from nos_sym.controller.space import SPACES
from nos_sym.evaluation.datasets import DATASETS
from nos_sym.evaluation.protocol import PROTOCOLS
from nos_sym.tasks.registry import TASKS

__all__ = ["add_report", "add_search", "add_status", "add_study", "add_top", "config_from"]

_SEARCH_OPTIONS = {
    # option: (config field, type, help)
    "--budget": (
        "budget",
        int,
        "evaluations to pay for (new keys), not samples; with --rungs, in last-rung evaluations",
    ),
    "--max-samples": ("max_samples", int, "stop after this many samples (default 20 × budget)"),
    "--algo": ("algo", str, f"controller training: {'|'.join(ALGORITHMS)}"),
    "--space": ("space", str, f"search space preset: {' | '.join(SPACES)}"),
    "--groups": ("groups", int, "groups per rule, 1-3"),
    "--task": ("task", str, f"{' | '.join(TASKS)} (NAME,option=value,...) or module:attribute"),
    "--dataset": ("dataset", str, f"data set of a task that has one: {' | '.join(DATASETS)}"),
    "--protocol": ("protocol", str, f"{' | '.join(PROTOCOLS)} or the task's own"),
    "--seed": ("seed", int, "controller seed"),
    "--eval-seed": ("eval_seed", int, "child-network seed (part of a reward's identity)"),
    "--batch": ("batch", int, "samples per controller step"),
    "--dedup": ("dedup", str, f"{' | '.join(DEDUP)} (numeric: also merge equal fingerprints)"),
    "--backend": ("backend", str, f"where children train: {'|'.join(BACKENDS)}"),
    "--workers": ("workers", int, "concurrent evaluations"),
    "--store": ("store", str, "a reward store shared between runs (default: in the run dir)"),
    "--ray-address": ("ray_address", str, "Ray cluster address (default: a local Ray)"),
    "--population": ("population", int, "--algo evolution: population size (default 50)"),
    "--tournament": ("tournament", int, "--algo evolution: tournament size (default 10)"),
    "--rungs": ("rungs", str, "successive halving over protocols, e.g. quick,screen,paper"),
    "--promote": ("promote", float, "--rungs: fraction of a rung promoted (default 0.1)"),
    "--final-seeds": ("final_seeds", int, "--rungs: seeds of the last rung (default 1)"),
}


def config_from(args: argparse.Namespace) -> SearchConfig | None:
    """The options given on the command line over the saved config (a resume) or the defaults
    (a new run). None: resume exactly as saved."""
    given = {
        field: getattr(args, field)
        for field, _, _ in _SEARCH_OPTIONS.values()
        if getattr(args, field) is not None
    }
    if (Path(args.run_dir) / "config.json").exists():
        saved, _ = load_config(args.run_dir)
        return dataclasses.replace(saved, **given) if given else None
    return SearchConfig(**given)


def _search_command(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    run = SearchRun(args.run_dir, config_from(args))
    config = run.config
    if not run.files.samples.exists():
        run.task.check()  # e.g. a missing data set: one clear error, before any work
    # the bar counts evaluations; with --rungs, the compute in evaluations of the last rung
    paid = (lambda: run.counters.evaluated) if config.rungs is None else (lambda: run.compute)
    bar = tqdm(
        total=config.budget,
        initial=paid(),
        unit="eval",
        desc="search",
        dynamic_ncols=True,
    )
    start, first = time.perf_counter(), paid()

    def progress(counters: Counters) -> None:
        rate = (paid() - first) / max(time.perf_counter() - start, 1e-9)
        bar.n = paid()
        bar.set_postfix(
            best=f"{counters.best_reward:.4f}",
            evals_per_s=f"{rate:.3f}",
            from_store=counters.from_store,
            samples=counters.samples,
            refresh=True,
        )

    counters = run.run(progress)
    bar.close()
    if counters.samples >= run.sample_limit and paid() < config.budget:
        print(
            f"stopped after {counters.samples} samples (--max-samples {run.sample_limit}): "
            f"the controller only re-sampled known rules; {paid():g} of "
            f"{config.budget} evaluations paid"
        )
    print_top(args.run_dir, 10, "text")
    print(f"\nreport: nos-sym report {args.run_dir} -o {Path(args.run_dir) / 'report.png'}")


def _report_command(args: argparse.Namespace) -> None:
    from nos_sym.controller.report import write_report, write_report_html

    if args.output is None and args.html is None:
        raise SearchError("nothing to write: give -o FILE.png, --html FILE.html or both")
    load_config(args.run_dir)
    load_checkpoint(args.run_dir)  # a damaged checkpoint: one error before any file is written
    try:
        written = list(write_report(args.run_dir, args.output)) if args.output else []
        if args.html:
            written.append(write_report_html(args.run_dir, args.html))
    except OSError as error:
        where = error.filename or args.html or args.output
        raise SearchError(f"cannot write {where}: {error.strerror or error}") from None
    for path in written:
        print(path)


def add_search(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--run-dir", required=True, help="the run directory (resumed if it exists)"
    )
    for option, (field, kind, text) in _SEARCH_OPTIONS.items():
        command.add_argument(option, dest=field, type=kind, default=None, help=text)
    command.set_defaults(run=_search_command)


def add_report(command: argparse.ArgumentParser) -> None:
    command.add_argument("run_dir")
    command.add_argument("-o", "--output", help="FILE.png (a FILE.md goes beside)")
    command.add_argument("--html", help="FILE.html: one self-contained page (works offline)")
    command.set_defaults(run=_report_command)


def _study_command(args: argparse.Namespace) -> None:
    import sys

    from nos_sym.controller.study import DEFAULT_RUNGS, StudyConfig, run_study

    given = {
        name: value
        for name, value in {
            "budget": args.budget,
            "space": args.space,
            "task": args.task,
            "dataset": args.dataset,
            "workers": args.workers,
            "final_seeds": args.final_seeds,
            "promote": args.promote,
            "eval_seed": args.eval_seed,
            "final_protocol": args.final_protocol,
            "final_seeds_eval": args.final_seeds_eval,
        }.items()
        if value is not None
    }
    if args.algos is not None:
        given["algos"] = tuple(name.strip() for name in args.algos.split(","))
    if args.seeds is not None:
        given["seeds"] = tuple(args.seeds)
    # --rungs: the funnel; --protocol alone: no funnel; neither: the default funnel
    if args.rungs is not None:
        given["rungs"] = tuple(name.strip() for name in args.rungs.split(","))
    elif args.protocol is not None:
        given |= {"rungs": None, "protocol": args.protocol}
    else:
        given["rungs"] = DEFAULT_RUNGS
    config = StudyConfig(**given)

    def progress(arm: str, counters: Counters) -> None:
        print(
            f"\r{arm}: {counters.samples} samples, {counters.evaluated} evaluated, "
            f"best {counters.best_reward:.4f}",
            end="",
            file=sys.stderr,
            flush=True,
        )

    result = run_study(args.run_dir, config, progress)
    print(file=sys.stderr)
    for row in result["algorithms"]:
        test = row.get("test") or {}
        mean = row.get("mean")
        print(
            f"{row['algo']:>10}: {row['arms']} arms, final {config.final_protocol} "
            + ("—" if mean is None else f"{mean:.4f}")
            + ("" if test.get("p") is None else f", vs random p = {test['p']:.3g}")
        )
    print(Path(args.run_dir) / "study.md")


def add_study(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--run-dir", required=True, help="the study directory (resumed if it exists)"
    )
    command.add_argument(
        "--algos", help=f"comma-separated, of {','.join(ALGORITHMS)} (default: all four)"
    )
    command.add_argument("--seeds", type=int, nargs="+", help="controller seeds (default 0-4)")
    command.add_argument("--budget", type=int, help="per arm, in last-rung evaluations (60)")
    command.add_argument("--rungs", help="the arms' funnel (default quick,screen)")
    command.add_argument("--protocol", help="without --rungs: one protocol, no funnel")
    command.add_argument("--promote", type=float, help="--rungs: fraction promoted (0.1)")
    command.add_argument("--final-seeds", type=int, help="seeds of the arms' last rung (1)")
    command.add_argument("--space", help=f"search space preset: {' | '.join(SPACES)}")
    command.add_argument("--task", help=f"{' | '.join(TASKS)} or module:attribute")
    command.add_argument("--dataset", help=f"{' | '.join(DATASETS)}")
    command.add_argument("--workers", type=int, help="concurrent evaluations of an arm (1)")
    command.add_argument("--eval-seed", type=int, help="the arms' child-network seed (0)")
    command.add_argument(
        "--final-protocol", help="re-evaluation of each arm's best rule (default paper)"
    )
    command.add_argument(
        "--final-seeds-eval", type=int, help="seeds of the re-evaluation (default 5)"
    )
    command.set_defaults(run=_study_command)
