r"""Optimizers measured on a task, as the paper's Table 1 (``nos-sym transfer``): every
(optimizer, seed) evaluated through the reward store, then the tables and the curves.

An *optimizer* is a ``torch.optim`` baseline (:data:`~nos_sym.evaluation.baselines.BASELINES`,
through :func:`~nos_sym.evaluation.memoized.evaluate_baseline_memoized`) or a rule (a preset name
or DSL text, through :func:`~nos_sym.evaluation.memoized.evaluate_memoized`). Each (optimizer,
seed) is one memoized :meth:`Task.evaluate <nos_sym.tasks.base.Task.evaluate>`: the protocol's
learning-rate sweep picks :math:`lr^*` on validation for that seed, the final run at
:math:`lr^*` gives the row's numbers. For optimizer o over the seeds S, with
:math:`r_s` the final run of seed s:

.. math::

    \text{final} = \operatorname{mean}_s m_T(r_s),\quad
    \text{best} = \operatorname{mean}_s \max_t m_t(r_s),\quad
    \text{test} = \operatorname{mean}_s \text{test}(r_s)

each ± the sample std (ddof = 1; none with one seed). ``best`` is the final value when the task
reports no curve. A seed that is not ``ok`` (diverged, failed, degenerate) counts as 0 in every
column and is flagged in the ``ok`` column, never dropped.

With ``workers`` > 1 the evaluations run in that many spawned processes, the cores split between
them; each goes through the store, so a killed run resumes and nothing is paid twice. The task
and its protocol are sent to the workers by pickling: a user task must be defined at module level
(:mod:`nos_sym.tasks.base`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nos_sym.evaluation.outcome import EvalResult, sweep_to_json
from nos_sym.evaluation.protocol import Protocol
from nos_sym.presets import TABLE1, resolve

if TYPE_CHECKING:
    from nos_sym.tasks.base import Task

__all__ = [
    "BASELINE_NAMES",
    "DEFAULT_RULES",
    "Contender",
    "Row",
    "Transfer",
    "contenders",
    "cores",
    "latex_escape",
    "latex_table",
    "machine",
    "markdown_table",
    "mean_std",
    "measure",
    "plot_curves",
    "row",
    "write",
]

_DECAYS = ("", "-ld", "-cd", "-rd")
BASELINE_NAMES: tuple[str, ...] = ("sgd", "momentum", "adam", "rmsprop")
"""The ``torch.optim`` baselines of every table (keys of ``BASELINES``)."""
DEFAULT_RULES: tuple[str, ...] = tuple(
    dict.fromkeys(
        (
            *(f"{base}{decay}" for base in ("powersign", "addsign") for decay in _DECAYS),
            *TABLE1,
        )
    )
)
"""PowerSign and AddSign without and with their decays, then the paper's Table 1 rules."""


@dataclass(frozen=True)
class Contender:
    """One optimizer of the table: a baseline (``dsl`` is its ``BASELINES`` name) or a rule
    (``dsl`` its canonical DSL, ``key`` its canonical key); ``name`` as the user gave it."""

    name: str
    baseline: bool
    dsl: str
    key: str


def contenders(rules: Sequence[str], baselines: Sequence[str] = BASELINE_NAMES) -> list[Contender]:
    """The baselines, then the rules (preset names or DSL text, resolved here: a bad one raises
    :class:`~nos_sym.dsl.DSLSyntaxError` before anything trains); a rule whose canonical key is
    already listed is listed once, under its first name."""
    from nos_sym.evaluation.baselines import baseline_key

    listed = [Contender(name, True, name, baseline_key(name)) for name in baselines]
    keys = {contender.key for contender in listed}
    for name in rules:
        rule = resolve(name)
        if rule.key not in keys:
            keys.add(rule.key)
            listed.append(Contender(name, False, rule.dsl, rule.key))
    return listed


def _evaluate(
    contender: Contender,
    task: Task,
    protocol: Protocol,
    seed: int,
    store_path: str,
    device: str,
) -> tuple[EvalResult, bool]:
    """One memoized evaluation in this process: ``(result, cached)``."""
    from nos_sym.dsl import parse
    from nos_sym.evaluation.memoized import evaluate_baseline_memoized, evaluate_memoized
    from nos_sym.evaluation.store import RewardStore

    where = {"task": task, "protocol": protocol, "seed": seed, "device": device}
    with RewardStore(store_path) as store:
        if contender.baseline:
            record, cached = evaluate_baseline_memoized(contender.dsl, store=store, **where)
        else:
            record, cached = evaluate_memoized(parse(contender.dsl), store=store, **where)
    return record.result, cached


def _init_worker(threads: int) -> None:
    """A worker process's share of the cores."""
    import torch

    torch.set_num_threads(threads)


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Transfer:
    """Every measured number: ``results[i][j]`` is contender i on ``seeds[j]``; ``trained``
    evaluations were paid now, ``from_store`` answered by the store."""

    contenders: tuple[Contender, ...]
    seeds: tuple[int, ...]
    results: tuple[tuple[EvalResult, ...], ...]
    trained: int
    from_store: int


def measure(
    items: Sequence[Contender],
    seeds: Sequence[int],
    *,
    task: Task,
    protocol: Protocol,
    store_path: str | os.PathLike[str],
    workers: int = 1,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Transfer:
    """Evaluate every contender on every seed through the store at ``store_path``; with
    ``workers`` > 1 in that many spawned processes of ``max(1, cores() // workers)`` torch
    threads each (``task`` and ``protocol`` must then be picklable)."""
    jobs = [(i, j) for j in range(len(seeds)) for i in range(len(items))]
    answers: dict[tuple[int, int], tuple[EvalResult, bool]] = {}

    def args(i: int, j: int) -> tuple:
        return items[i], task, protocol, seeds[j], os.fspath(store_path), device

    def done() -> None:
        if progress is not None:
            progress(len(answers), len(jobs))

    if workers <= 1:
        for i, j in jobs:
            answers[i, j] = _evaluate(*args(i, j))
            done()
    else:
        import multiprocessing

        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(max(1, cores() // workers),),
        ) as pool:
            futures = {pool.submit(_evaluate, *args(i, j)): (i, j) for i, j in jobs}
            try:
                for future in as_completed(futures):
                    answers[futures[future]] = future.result()
                    done()
            except BaseException:  # stop: what finished is stored, the rest is not started
                pool.shutdown(cancel_futures=True)
                raise
    results = tuple(tuple(answers[i, j][0] for j in range(len(seeds))) for i in range(len(items)))
    trained = sum(not hit and r.status != "degenerate" for r, hit in answers.values())
    from_store = sum(hit for _, hit in answers.values())
    return Transfer(tuple(items), tuple(seeds), results, trained, from_store)


@dataclass(frozen=True)
class Row:
    """One optimizer's numbers over the seeds (not-ok seeds as 0): final and best validation,
    test (None when the task reports none), the chosen learning rate per seed and the flags of
    the seeds that were not ok (``"seed 1: diverged"``)."""

    name: str
    baseline: bool
    final: tuple[float, ...]
    best: tuple[float, ...]
    test: tuple[float, ...] | None
    lrs: tuple[float | None, ...]
    ok: int
    flags: tuple[str, ...]


def row(
    contender: Contender,
    seeds: Sequence[int],
    results: Sequence[EvalResult],
    reports_test: bool | None = None,
) -> Row:
    """The table row of ``contender`` from its per-seed ``results``; ``reports_test`` says
    whether the task reports a test metric (None: whether one of these results has one), so
    that a row whose every seed failed shows test 0, not none."""
    ok = [result.status == "ok" for result in results]
    final = tuple(result.reward for result in results)
    best = tuple(
        max(result.curve) if good and result.curve else result.reward
        for result, good in zip(results, ok, strict=True)
    )
    if reports_test is None:
        reports_test = any(result.test is not None for result in results)
    test = (
        tuple(
            (result.test or 0.0) if good else 0.0 for result, good in zip(results, ok, strict=True)
        )
        if reports_test
        else None
    )
    flags = tuple(
        f"seed {seed}: {result.status}"
        for seed, result, good in zip(seeds, results, ok, strict=True)
        if not good
    )
    return Row(
        name=contender.name,
        baseline=contender.baseline,
        final=final,
        best=best,
        test=test,
        lrs=tuple(result.best_lr for result in results),
        ok=sum(ok),
        flags=flags,
    )


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample std (ddof = 1; None with fewer than two values)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell(values: Sequence[float] | None, pm: str) -> str:
    if values is None:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.4f}" if std is None else f"{mean:.4f}{pm}{std:.4f}"


def _lrs(lrs: Sequence[float | None]) -> str:
    return ", ".join("—" if lr is None else f"{lr:g}" for lr in lrs)


def _ok(item: Row, seeds: int) -> str:
    return f"{item.ok}/{seeds}" + (f" ({'; '.join(item.flags)})" if item.flags else "")


HEADER: tuple[str, ...] = (
    "optimizer",
    "final validation",
    "best validation",
    "test",
    "lr per seed",
    "ok seeds",
)


def markdown_table(rows: Sequence[Row], seeds: int) -> str:
    """The Markdown table: one row per optimizer, baselines in italics."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    for item in rows:
        name = item.name.replace("|", "\\|")
        cells = (
            f"*{name}*" if item.baseline else f"`{name}`",
            _cell(item.final, " ± "),
            _cell(item.best, " ± "),
            _cell(item.test, " ± "),
            _lrs(item.lrs),
            _ok(item, seeds),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def latex_table(rows: Sequence[Row], seeds: int) -> str:
    """The booktabs table (``\\toprule``, ``\\midrule`` below the header and the baselines,
    ``\\bottomrule``)."""
    lines = [
        r"\begin{tabular}{lllllr}",
        r"\toprule",
        " & ".join(latex_escape(head.capitalize()) for head in HEADER) + r" \\",
        r"\midrule",
    ]
    for index, item in enumerate(rows):
        if index and rows[index - 1].baseline and not item.baseline:
            lines.append(r"\midrule")
        cells = (
            latex_escape(item.name),
            _cell(item.final, r" $\pm$ "),
            _cell(item.best, r" $\pm$ "),
            _cell(item.test, r" $\pm$ "),
            latex_escape(_lrs(item.lrs)),
            latex_escape(_ok(item, seeds)),
        )
        lines.append(" & ".join(cells).replace("—", "---") + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def machine() -> str:
    """``CPU model, N cores`` (the model from /proc/cpuinfo where there is one)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return f"{model}, {cores()} cores"


def plot_curves(transfer: Transfer, path: Path) -> None:
    """Each optimizer's validation curve of its final run: the mean over its ok seeds (cut to
    the shortest) with a min–max band; baselines black, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab20")
    dashes = ("--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
    drawn = baselines = rules = 0
    for contender, results in zip(transfer.contenders, transfer.results, strict=True):
        curves = [r.curve for r in results if r.status == "ok" and r.curve]
        if not curves:
            continue
        length = min(map(len, curves))
        stack = np.array([curve[:length] for curve in curves], dtype=float)
        steps = np.arange(1, length + 1)
        if contender.baseline:  # black, each its own dashes
            colour, style = "black", dashes[baselines % len(dashes)]
            baselines += 1
        else:
            colour, style = colours(rules % 20), "-"
            rules += 1
        axes.plot(steps, stack.mean(axis=0), color=colour, linestyle=style, label=contender.name)
        axes.fill_between(steps, stack.min(axis=0), stack.max(axis=0), color=colour, alpha=0.12)
        drawn += 1
    if drawn:
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        axes.text(0.5, 0.5, "the task reports no curves", ha="center", transform=axes.transAxes)
    axes.set_xlabel("evaluation point of the final run")
    axes.set_ylabel("validation metric (mean over seeds, min–max band)")
    axes.set_title("final runs at the chosen learning rate")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _seed_json(seed: int, result: EvalResult, item: Row, index: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "status": result.status,
        "final_validation": item.final[index],
        "best_validation": item.best[index],
        "test": None if item.test is None else item.test[index],
        "best_lr": result.best_lr,
        "sweep": sweep_to_json(result.sweep),
        "curve": list(result.curve),
        "seconds": result.seconds,
        "message": result.message,
    }


def _summary(values: Sequence[float] | None) -> dict[str, float | None] | None:
    if values is None:
        return None
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def write(
    transfer: Transfer,
    output: Path,
    *,
    task: Task,
    protocol: Protocol,
    command: str,
    date: str,
    seconds: float,
) -> list[Row]:
    """Write ``transfer.md``, ``transfer.tex``, ``transfer.json`` and ``curves.png`` into
    ``output``; returns the table's rows."""
    reports_test = any(r.test is not None for results in transfer.results for r in results)
    rows = [
        row(contender, transfer.seeds, results, reports_test)
        for contender, results in zip(transfer.contenders, transfer.results, strict=True)
    ]
    n = len(transfer.seeds)
    seeds = ", ".join(map(str, transfer.seeds))
    description = json.dumps(task.describe(), sort_keys=True)
    where = machine()
    (output / "transfer.md").write_text(
        f"# Transfer: {len(rows)} optimizers on `{task.identity}`\n\n"
        f"```\n{command}\n```\n\n"
        f"- task: `{task.identity}` — `{description}`\n"
        f"- protocol: `{protocol.name}` ({protocol.hash[:12]}): learning rates "
        f"{', '.join(f'{lr:g}' for lr in protocol.learning_rates)}; `{protocol.to_json()}`\n"
        f"- seeds: {seeds}\n"
        f"- machine: {where}\n"
        f"- date: {date}; wall time {seconds:.1f} s ({transfer.trained} evaluations trained, "
        f"{transfer.from_store} from the store)\n\n"
        "Per seed the learning rate is chosen on validation by the protocol's sweep; final and "
        "best validation and test are of the final run at that rate, mean ± std (ddof 1) over "
        "the seeds; a seed that is not ok counts as 0 and is flagged.\n\n" + markdown_table(rows, n)
    )
    (output / "transfer.tex").write_text(latex_table(rows, n))
    summary = {
        "command": command,
        "task": {"identity": task.identity, **task.describe()},
        "protocol": {"hash": protocol.hash, **json.loads(protocol.to_json())},
        "seeds": list(transfer.seeds),
        "machine": where,
        "date": date,
        "seconds": seconds,
        "trained": transfer.trained,
        "from_store": transfer.from_store,
        "optimizers": [
            {
                "name": item.name,
                "kind": "baseline" if contender.baseline else "rule",
                "dsl": contender.dsl,
                "key": contender.key,
                "ok": item.ok,
                "final_validation": _summary(item.final),
                "best_validation": _summary(item.best),
                "test": _summary(item.test),
                "seeds": [
                    _seed_json(seed, result, item, index)
                    for index, (seed, result) in enumerate(
                        zip(transfer.seeds, results, strict=True)
                    )
                ],
            }
            for item, contender, results in zip(
                rows, transfer.contenders, transfer.results, strict=True
            )
        ],
    }
    (output / "transfer.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    plot_curves(transfer, output / "curves.png")
    return rows
