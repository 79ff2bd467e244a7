r"""Does the search beat random? ``nos-sym study``: search arms (algorithm × seed) at equal
compute on one shared reward store, and their report.

An *arm* is one search run, ``DIR/arms/<algo>-<seed>/``, with the study's budget, space, rungs
(or protocol), task and eval seed, its own controller seed, sharing ``DIR/store.sqlite`` with
``charge_store_hits`` on: the first time an arm asks for a key another arm paid for, the answer
comes from the store (nothing is trained twice) but the arm's budget is charged as if it had
trained it, so every arm gets the same compute whatever ran before it.

The report:

* best reward so far against compute, per arm: after each logged line, compute = the training
  steps paid or charged so far / the last rung's cost (:meth:`Funnel.spent`), best = the highest
  reward of a candidate at the last rung (the only rung whose rewards are comparable across
  candidates); an algorithm's curve is the mean over its arms from where every arm has a
  reward (a mean over the arms started so far would fall as arms join), with the min–max band;
* each arm's final best rule (its leaderboard's first: highest rung, then reward) re-evaluated
  under ``final_protocol`` over seeds ``0 … final_seeds_eval − 1`` (memoized in the store), beside
  the ``torch.optim`` baselines :data:`STUDY_BASELINES` under the same protocol and seeds;
* per algorithm, a one-sided Mann–Whitney U test of its arms' final rewards (the mean over the
  final seeds, one value per arm) against ``random``'s: H₁ "the algorithm's arms score higher".
  With n and m arms and no ties the smallest p the exact test can reach is
  :math:`1/\binom{n+m}{n}` (1/6 for 2 × 2, 1/252 for 5 × 5), reported beside p;
* evaluations saved by dedup per arm: from_store + degenerate samples (charged: those of them
  charged as if trained).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nos_sym.controller.funnel import Funnel, make_rungs
from nos_sym.controller.rundir import (
    ALGORITHMS,
    Counters,
    RunFiles,
    SearchConfig,
    SearchError,
    atomic_write,
    check_resumable,
    leaderboard,
    load_config,
    read_log,
    status,
)
from nos_sym.controller.search import SearchRun
from nos_sym.dsl import Rule, parse
from nos_sym.evaluation.memoized import evaluate_baseline_memoized, evaluate_memoized
from nos_sym.evaluation.store import Record, RewardStore
from nos_sym.tasks.base import Task
from nos_sym.tasks.transfer import machine, mean_std

__all__ = [
    "DEFAULT_RUNGS",
    "STUDY_BASELINES",
    "StudyConfig",
    "best_so_far",
    "command_line",
    "min_p",
    "rank_test",
    "run_study",
]

DEFAULT_RUNGS: tuple[str, ...] = ("quick", "screen")
STUDY_BASELINES: tuple[str, ...] = ("sgd", "momentum", "adam", "rmsprop")
REFERENCE = "random"


@dataclass(frozen=True)
class StudyConfig:
    """A study: its arms (``algos`` × ``seeds``), the search options every arm shares, and the
    final re-evaluation (``final_protocol`` over ``final_seeds_eval`` seeds). ``rungs`` None:
    every arm searches under ``protocol`` alone."""

    algos: tuple[str, ...] = ("trpo", "reinforce", "evolution", "random")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    budget: int = 60
    rungs: tuple[str, ...] | None = DEFAULT_RUNGS
    protocol: str = "quick"
    space: str = "paper"
    task: str = "child"
    dataset: str = "fashion-mnist"
    workers: int = 1
    final_seeds: int = 1
    promote: float = 0.1
    eval_seed: int = 0
    final_protocol: str = "paper"
    final_seeds_eval: int = 5

    def __post_init__(self):
        checks = [
            (len(self.algos) > 0, "--algos must name at least one algorithm"),
            (len(set(self.algos)) == len(self.algos), f"--algos has a name twice: {self.algos}"),
            (
                all(algo in ALGORITHMS for algo in self.algos),
                f"--algos must be among {', '.join(ALGORITHMS)}",
            ),
            (len(self.seeds) > 0, "--seeds must give at least one seed"),
            (len(set(self.seeds)) == len(self.seeds), f"--seeds has a seed twice: {self.seeds}"),
            (self.budget >= 1, "--budget must be at least 1"),
            (self.final_seeds_eval >= 1, "--final-seeds-eval must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SearchError(message)
        for algo in self.algos:  # the search options, checked as a search checks them
            self.arm(algo, self.seeds[0], "store.sqlite")

    def arm(self, algo: str, seed: int, store: str) -> SearchConfig:
        """The search config of arm (``algo``, ``seed``) on the shared ``store``."""
        return SearchConfig(
            algo=algo,
            seed=seed,
            budget=self.budget,
            rungs=self.rungs,
            protocol=self.protocol,
            space=self.space,
            task=self.task,
            dataset=self.dataset,
            backend="inline" if self.workers == 1 else "process",
            workers=self.workers,
            final_seeds=self.final_seeds,
            promote=self.promote,
            eval_seed=self.eval_seed,
            store=store,
            charge_store_hits=True,
        )

    @property
    def ladder(self) -> tuple[str, ...]:
        """The protocols of the arms' rungs: ``rungs``, or ``(protocol,)``."""
        return self.rungs or (self.protocol,)

    @property
    def arms(self) -> list[tuple[str, int]]:
        """(algorithm, seed) of every arm, in the order they run."""
        return [(algo, seed) for algo in self.algos for seed in self.seeds]


def _arm_dir(root: Path, algo: str, seed: int) -> Path:
    return root / "arms" / f"{algo}-{seed}"


def _checked(
    root: Path, config: StudyConfig
) -> tuple[Task, list[tuple[Path, SearchConfig]], list[dict[str, Any]]]:
    """The study's task, its arms (directory, config) and earlier invocations, every input
    checked before anything is written: protocols the task knows, existing arms resumable with
    these options, the study's own files readable."""
    task = config.arm(config.algos[0], config.seeds[0], "").resolved_task()
    known = task.known_protocols
    for option, names in (
        ("--rungs", config.rungs or ()),
        ("--protocol", () if config.rungs else (config.protocol,)),
        ("--final-protocol", (config.final_protocol,)),
    ):
        for name in names:
            if name not in known:
                raise SearchError(
                    f"{option}: unknown protocol {name!r}; known: {', '.join(known)}"
                    f" (task {task.name!r})"
                )
    store = str(root / "store.sqlite")
    arms = []
    for algo, seed in config.arms:
        arm_dir, arm = _arm_dir(root, algo, seed), config.arm(algo, seed, store)
        if RunFiles(arm_dir).config.exists():
            check_resumable(arm_dir, load_config(arm_dir)[0], arm)
        arms.append((arm_dir, arm))
    invocations = _invocations(root)
    task.check()  # e.g. a missing data set: one clear error, before any work
    return task, arms, invocations


def _invocations(root: Path) -> list[dict[str, Any]]:
    """The earlier invocations of the study (date, seconds), from its ``study.json``."""
    path = root / "study.json"
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text())["invocations"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SearchError(f"{path} is damaged: {error}; move it away to rewrite it") from None


def best_so_far(lines: Sequence[dict[str, Any]], funnel: Funnel) -> list[tuple[float, float]]:
    """(compute, best reward at the last rung) after every line folded into ``funnel`` (a fresh
    one: compute = its :meth:`~Funnel.spent` in last-rung evaluations) from the first line
    that reaches the last rung on; the points where either changes."""
    last, unit = len(funnel.rungs) - 1, funnel.rungs[-1].cost
    best, points = -math.inf, []
    for line in lines:
        funnel.fold(line)
        if line.get("rung", 0) == last and line["outcome"] != "degenerate":
            best = max(best, line["reward"])
        if best > -math.inf:
            point = (funnel.spent() / unit, best)
            if not points or point != points[-1]:
                points.append(point)
    return points


def min_p(n: int, m: int) -> float:
    """The smallest one-sided p of the exact Mann–Whitney test with n and m values, no ties:
    :math:`1/\\binom{n+m}{n}`."""
    return 1 / math.comb(n + m, n)


def rank_test(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """One-sided Mann–Whitney U of ``x`` against ``y`` (H₁: x tends to be larger): U, p, the
    sizes and the smallest p they allow; U and p None when either side is empty."""
    result: dict[str, Any] = {"n": len(x), "m": len(y), "U": None, "p": None, "min_p": None}
    if x and y:
        from scipy.stats import mannwhitneyu

        test = mannwhitneyu(x, y, alternative="greater")
        result |= {
            "U": float(test.statistic),
            "p": float(test.pvalue),
            "min_p": min_p(*map(len, (x, y))),
        }
    return result


def _final_rewards(
    evaluate: Callable[..., tuple[Record, bool]],
    what: Rule | str,
    task: Task,
    config: StudyConfig,
    store: RewardStore,
) -> dict[str, Any]:
    """``evaluate(what, …)`` (a memoized evaluation) under the final protocol over seeds
    0 … final_seeds_eval − 1: the rewards, their mean and sample std."""
    protocol = task.protocol(config.final_protocol)
    rewards = [
        evaluate(what, task=task, protocol=protocol, seed=seed, store=store)[0].result.reward
        for seed in range(config.final_seeds_eval)
    ]
    mean, std = mean_std(rewards)
    return {"rewards": rewards, "mean": mean, "std": std}


def _final(
    rows: list[dict[str, Any]], task: Task, config: StudyConfig, store: RewardStore
) -> dict[str, Any] | None:
    """An arm's best rule (its leaderboard's first row) re-evaluated under the final protocol
    over the final seeds; None when the arm has no rule."""
    if not rows:
        return None
    row = rows[0]
    return {
        "dsl": row["dsl"],
        "minimal_dsl": row["minimal_dsl"],
        "key": row["key"],
        "search_reward": row["reward"],
        "search_protocol": row.get("protocol", config.ladder[0]),
        **_final_rewards(evaluate_memoized, parse(row["dsl"]), task, config, store),
    }


def _baselines(task: Task, config: StudyConfig, store: RewardStore) -> list[dict[str, Any]]:
    """:data:`STUDY_BASELINES` under the final protocol and seeds (memoized in the store)."""
    return [
        {"optimizer": name, **_final_rewards(evaluate_baseline_memoized, name, task, config, store)}
        for name in STUDY_BASELINES
    ]


def _arm_summary(arm_dir: Path, algo: str, seed: int, task: Task, config: StudyConfig) -> dict:
    """An arm's counts, dedup savings and best-so-far curve (read from its directory)."""
    counts = status(arm_dir)
    rungs = make_rungs(task, config.ladder, config.eval_seed, config.final_seeds)
    funnel = Funnel(rungs, config.promote)
    curve = best_so_far(read_log(arm_dir)[0], funnel)
    return {
        "arm": f"{algo}-{seed}",
        "algo": algo,
        "seed": seed,
        "counts": counts,
        "saved": counts["from_store"] + counts["degenerate"],
        "compute": funnel.spent() / rungs[-1].cost,
        "curve": curve,
    }


def command_line(root: str | Path, config: StudyConfig) -> str:
    """The ``nos-sym study`` command that runs (or resumes) this study, every option explicit."""
    import shlex

    funnel = (
        ["--rungs", ",".join(config.rungs), "--promote", f"{config.promote:g}"]
        if config.rungs
        else ["--protocol", config.protocol]
    )
    options = {
        "--budget": config.budget,
        "--final-seeds": config.final_seeds,
        "--space": config.space,
        "--task": config.task,
        "--dataset": config.dataset,
        "--workers": config.workers,
        "--eval-seed": config.eval_seed,
        "--final-protocol": config.final_protocol,
        "--final-seeds-eval": config.final_seeds_eval,
    }
    return shlex.join(
        ["nos-sym", "study", "--run-dir", str(root), "--algos", ",".join(config.algos)]
        + ["--seeds", *map(str, config.seeds), *funnel]
        + [str(part) for option, value in options.items() for part in (option, value)]
    )


def run_study(
    root: str | Path,
    config: StudyConfig,
    progress: Callable[[str, Counters], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every arm of the study in ``root``, one after another, then re-evaluate
    their best rules and the baselines and write ``study.md``, ``study.json`` and
    ``best_so_far.png``; returns what ``study.json`` holds. Every input is checked before
    anything is written; a completed arm pays nothing again."""
    root = Path(root)
    start, date = time.perf_counter(), datetime.datetime.now(datetime.UTC)
    task, arms, invocations = _checked(root, config)
    for arm_dir, arm in arms:
        report = None if progress is None else functools.partial(progress, arm_dir.name)
        SearchRun(arm_dir, arm).run(report)
    summaries = [_arm_summary(arm_dir, arm.algo, arm.seed, task, config) for arm_dir, arm in arms]
    with RewardStore(root / "store.sqlite") as store:
        for summary, (arm_dir, _) in zip(summaries, arms, strict=True):
            summary["final"] = _final(leaderboard(arm_dir, 1), task, config, store)
        baselines = _baselines(task, config, store)
    finals = {
        algo: [s["final"]["mean"] for s in summaries if s["algo"] == algo and s["final"]]
        for algo in config.algos
    }
    algorithms = []
    for algo, values in finals.items():
        row: dict[str, Any] = {"algo": algo, "arms": len(values)}
        if values:
            row["mean"], row["std"] = mean_std(values)
        if algo != REFERENCE and REFERENCE in finals:
            row["test"] = rank_test(values, finals[REFERENCE])
        algorithms.append(row)
    seconds = round(time.perf_counter() - start, 1)
    invocations.append({"date": date.isoformat(timespec="seconds"), "seconds": seconds})
    result = {
        "command": command_line(root, config),
        "machine": machine(),
        "config": dataclasses.asdict(config),
        "task": task.identity,
        "arms": summaries,
        "algorithms": algorithms,
        "baselines": baselines,
        "invocations": invocations,
    }
    _write(root, result)
    return result


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def markdown(result: dict[str, Any]) -> str:
    """``study.md``: the command, machine, dates and wall time, the config, the curves' figure,
    the final table beside the baselines, the rank tests and the dedup savings."""
    config = result["config"]
    final, seeds = config["final_protocol"], config["final_seeds_eval"]
    ladder = config["rungs"] or [config["protocol"]]
    total = sum(invocation["seconds"] for invocation in result["invocations"])
    out = [
        "# Does the search beat random?",
        "",
        f"```\n{result['command']}\n```",
        "",
        f"- machine: {result['machine']}",
        f"- date (UTC): {result['invocations'][-1]['date']}; invocations: "
        f"{len(result['invocations'])}",
        f"- wall time: {total:.0f} s in all ({total / 3600:.2f} h), this invocation "
        f"{result['invocations'][-1]['seconds']:.0f} s",
        f"- task: `{result['task']}`",
        f"- config: `{json.dumps(config)}`",
        "",
        "## Best reward so far against compute",
        "",
        f"Compute in evaluations of the last rung (`{ladder[-1]}`), charged per arm as if it "
        f"were alone; the reward is the best at the last rung. Mean over the seeds, min–max band.",
        "",
        "![best so far](best_so_far.png)",
        "",
        f"## Final best rules under `{final}` (seeds 0–{seeds - 1}, mean ± std)",
        "",
        f"| arm | rule (minimal form) | search reward (protocol) | `{final}` reward | per seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm in result["arms"]:
        row = arm["final"]
        if row is None:
            out.append(f"| {arm['arm']} | (no rule) | — | — | — |")
            continue
        out.append(
            f"| {arm['arm']} | `{row['minimal_dsl']}` | {row['search_reward']:.4f} "
            f"({row['search_protocol']}) | {_pm(row['mean'], row['std'])} | "
            f"{', '.join(f'{r:.4f}' for r in row['rewards'])} |"
        )
    for row in result["baselines"]:
        out.append(
            f"| *{row['optimizer']}* | baseline | — | {_pm(row['mean'], row['std'])} | "
            f"{', '.join(f'{r:.4f}' for r in row['rewards'])} |"
        )
    out += [
        "",
        f"## Each algorithm against `{REFERENCE}` (one-sided Mann–Whitney U)",
        "",
        f"One value per arm: its final rule's mean `{final}` reward. H₁: the algorithm's arms "
        f"score higher than `{REFERENCE}`'s. min p: the smallest p the exact test can reach with "
        "these n and m (1/C(n+m, n)); where it is above 0.05 the test cannot reject at all, and "
        "with few seeds it has little power either way: a large p is no evidence of equality.",
        "",
        "| algorithm | arms | final reward over arms | U | p | n, m | min p |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["algorithms"]:
        test = row.get("test")
        cells = (
            ["—"] * 4
            if test is None
            else [
                "—" if test["U"] is None else f"{test['U']:g}",
                _p(test["p"]),
                f"{test['n']}, {test['m']}",
                _p(test["min_p"]),
            ]
        )
        mean = _pm(row.get("mean"), row.get("std"))
        out.append(f"| {row['algo']} | {row['arms']} | {mean} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## Evaluations saved by dedup (rung 0 samples)",
        "",
        "saved = from_store + degenerate (never trained by this arm); charged = the from_store "
        "ones another arm trained, charged to this arm's budget; compute in last-rung "
        "evaluations.",
        "",
        "| arm | samples | evaluated | from_store | charged | degenerate | saved | compute |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in result["arms"]:
        c = arm["counts"]
        out.append(
            f"| {arm['arm']} | {c['samples']} | {c['evaluated']} | {c['from_store']} | "
            f"{c['charged']} | {c['degenerate']} | {arm['saved']} | {arm['compute']:.2f} |"
        )
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """``best_so_far.png``: per algorithm, the mean over its arms of the best reward so far
    against compute (from where every arm has a reward), with the min–max band."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    budget = result["config"]["budget"]
    grid = np.linspace(0, budget, 401)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for algo in result["config"]["algos"]:
        curves = []
        for arm in result["arms"]:
            if arm["algo"] != algo or not arm["curve"]:
                continue
            x, y = map(np.array, zip(*arm["curve"], strict=True))
            index = np.searchsorted(x, grid, side="right") - 1
            curves.append(np.where(index >= 0, y[np.maximum(index, 0)], np.nan))
        if not curves:
            continue
        # NaN until every arm has a candidate at the last rung: a mean over the arms started so
        # far would fall as later, lower arms join, which a best-so-far curve never does
        stack = np.array(curves)
        mean, low, high = (f(stack, axis=0) for f in (np.mean, np.min, np.max))
        (line,) = axes.plot(grid, mean, label=f"{algo} ({len(curves)} seeds)")
        axes.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
    config = result["config"]
    ladder = config["rungs"] or [config["protocol"]]
    axes.set_xlabel(f"compute (evaluations of `{ladder[-1]}`)")
    axes.set_ylabel(f"best reward so far ({ladder[-1]})")
    if axes.lines:  # (no arm reached the last rung: an empty figure, and the table says so)
        axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)


def _write(root: Path, result: dict[str, Any]) -> None:
    """``study.json``, ``study.md`` and ``best_so_far.png`` in ``root`` (each written whole)."""
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(root / "study.json", lambda path: path.write_text(text))
    atomic_write(root / "study.md", lambda path: path.write_text(markdown(result)))
    with warnings.catch_warnings():  # an all-NaN column before the first reward
        warnings.simplefilter("ignore", RuntimeWarning)
        atomic_write(root / "best_so_far.png", lambda path: plot(result, path))
