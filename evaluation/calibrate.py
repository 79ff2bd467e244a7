r"""Calibrating cheap protocols against an expensive one (``nos-sym calibrate``): the reference
rules, their rewards under every protocol and seed, and how well a cheap reward ranks them.

The *truth* of a rule is its mean reward over the seeds under the last (most expensive)
protocol. For every cheaper protocol, over the n reference rules:

* cost: the mean ``seconds`` of its evaluations (one candidate, one seed);
* seed std: :math:`\frac1n\sum_r \operatorname{std}_s R(r, s)` (population std over the seeds);
* Spearman ρ and Kendall τ (τ-b) between the *single-seed* reward :math:`R(\cdot, s)` — what
  a search sees — and the truth, for every seed s, and their mean over the seeds;
* precision@10 %: with :math:`k = \lceil 0.1\,n \rceil`, the fraction of the single-seed top k
  that is in the truth's top k. A top k is the first k rules sorted by reward, highest first,
  ties broken by the order of the reference set (presets first, then the sampled rules).

A statistic that is undefined (fewer than two rules, a constant reward) is ``None``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nos_sym.controller.space import SearchSpace, size, uniform_sample
from nos_sym.dsl import Rule, parse
from nos_sym.evaluation.baselines import BASELINES
from nos_sym.evaluation.memoized import evaluate_memoized
from nos_sym.evaluation.protocol import Protocol
from nos_sym.evaluation.store import RewardStore
from nos_sym.presets import PRESETS, TABLE1

if TYPE_CHECKING:
    from nos_sym.tasks.base import Task

__all__ = [
    "REFERENCE_PRESETS",
    "Measurements",
    "ProtocolStats",
    "markdown_table",
    "measure",
    "precision_at",
    "protocol_stats",
    "rank_correlations",
    "reference_rules",
    "report",
    "scatter_plot",
    "seed_std",
    "top_k",
    "truth",
]

REFERENCE_PRESETS: tuple[str, ...] = tuple(dict.fromkeys((*BASELINES, *TABLE1)))
"""The preset names of the reference set: the baselines in the DSL, then the paper's Table 1."""

TOP_FRACTION = 0.1
MAX_DRAWS_PER_RULE = 100
"""Sampling gives up after this many draws per wanted rule (a small space has few rules)."""


def reference_rules(
    presets: Sequence[str], space: SearchSpace, n_random: int, sample_seed: int
) -> list[tuple[str, Rule]]:
    """``(name, rule)`` for the ``presets`` then ``n_random`` rules drawn uniformly from
    ``space`` (named ``random-0``, ``random-1`` …), without degenerate rules and without two
    rules of one canonical key; deterministic given ``sample_seed``. Raises ValueError when
    the space has fewer token strings, or does not yield that many rules within
    ``MAX_DRAWS_PER_RULE · n_random`` draws."""
    rules: dict[str, tuple[str, Rule]] = {}
    for name in presets:
        rule = parse(PRESETS[name])
        rules.setdefault(rule.key, (name, rule))
    if n_random > size(space):
        raise ValueError(f"the space has only {size(space)} token strings, {n_random} wanted")
    generator = torch.Generator().manual_seed(sample_seed)
    drawn = 0
    for _ in range(MAX_DRAWS_PER_RULE * n_random):
        if drawn == n_random:
            break
        rule = parse(space.to_dsl(uniform_sample(space, generator)))
        if not rule.is_degenerate and rule.key not in rules:
            rules[rule.key] = (f"random-{drawn}", rule)
            drawn += 1
    if drawn < n_random:
        raise ValueError(
            f"found only {drawn} of {n_random} distinct non-degenerate rules in "
            f"{MAX_DRAWS_PER_RULE * n_random} draws from the space"
        )
    return list(rules.values())


def seed_std(rewards: Sequence[Sequence[float]]) -> float:
    """The mean over rules of the population std over seeds; ``rewards[rule][seed]``."""
    return statistics.fmean(statistics.pstdev(row) for row in rewards)


def top_k(scores: Sequence[float], k: int) -> set[int]:
    """The indices of the k highest scores, ties broken by the lower index."""
    return set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def precision_at(
    scores: Sequence[float], truth: Sequence[float], fraction: float = TOP_FRACTION
) -> float | None:
    """|top k of ``scores`` ∩ top k of ``truth``| / k, k = ⌈fraction · n⌉ (None if n = 0)."""
    if not scores:
        return None
    k = math.ceil(fraction * len(scores))
    return len(top_k(scores, k) & top_k(truth, k)) / k


def _defined(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def rank_correlations(
    scores: Sequence[float], truth: Sequence[float]
) -> tuple[float | None, float | None]:
    """(Spearman ρ, Kendall τ-b) of ``scores`` against ``truth``; None where undefined."""
    if len(scores) < 2 or len(set(scores)) < 2 or len(set(truth)) < 2:
        return None, None
    from scipy import stats

    return (
        _defined(stats.spearmanr(scores, truth).statistic),
        _defined(stats.kendalltau(scores, truth).statistic),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return statistics.fmean(defined) if defined else None


@dataclass(frozen=True)
class ProtocolStats:
    """One protocol's row of the calibration table (see the module docstring); the per-seed
    lists follow ``seeds``, the correlations are None for the truth's own protocol."""

    protocol: str
    seconds: float
    seed_std: float
    seeds: tuple[int, ...]
    spearman: tuple[float | None, ...]
    kendall: tuple[float | None, ...]
    precision: tuple[float | None, ...]

    @property
    def means(self) -> tuple[float | None, float | None, float | None]:
        """(ρ, τ, precision) averaged over the seeds where defined."""
        return _mean(self.spearman), _mean(self.kendall), _mean(self.precision)

    def to_json(self) -> dict:
        spearman, kendall, precision = self.means
        return {
            "protocol": self.protocol,
            "seconds": self.seconds,
            "seed_std": self.seed_std,
            "seeds": list(self.seeds),
            "spearman": list(self.spearman),
            "kendall": list(self.kendall),
            "precision": list(self.precision),
            "mean_spearman": spearman,
            "mean_kendall": kendall,
            "mean_precision": precision,
        }


def truth(rewards: Sequence[Sequence[float]]) -> list[float]:
    """Each rule's mean reward over the seeds; ``rewards[rule][seed]``."""
    return [statistics.fmean(row) for row in rewards]


def protocol_stats(
    protocol: str,
    rewards: Sequence[Sequence[float]],
    seconds: Sequence[float],
    seeds: Sequence[int],
    reference: Sequence[float] | None,
) -> ProtocolStats:
    """The statistics of one protocol's ``rewards[rule][seed]`` and ``seconds`` (of every
    evaluation) against the ``reference`` truth (None: this protocol is the truth)."""
    columns = [[row[s] for row in rewards] for s in range(len(seeds))]
    correlations = [
        rank_correlations(column, reference) if reference is not None else (None, None)
        for column in columns
    ]
    return ProtocolStats(
        protocol=protocol,
        seconds=statistics.fmean(seconds) if seconds else 0.0,
        seed_std=seed_std(rewards),
        seeds=tuple(seeds),
        spearman=tuple(rho for rho, _ in correlations),
        kendall=tuple(tau for _, tau in correlations),
        precision=tuple(
            precision_at(column, reference) if reference is not None else None for column in columns
        ),
    )


def _cell(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(stats: Sequence[ProtocolStats], truth_seconds: float) -> str:
    """The calibration table: one row per protocol, the truth's last."""
    lines = [
        "| protocol | s / candidate | cost vs truth | seed std | Spearman ρ (per seed) "
        "| Kendall τ (per seed) | precision@10 % (per seed) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in stats:
        spearman, kendall, precision = row.means

        def per_seed(mean: float | None, values: Sequence[float | None]) -> str:
            return f"{_cell(mean)} ({', '.join(map(_cell, values))})"

        ratio = row.seconds / truth_seconds if truth_seconds else math.nan
        lines.append(
            f"| {row.protocol} | {row.seconds:.2f} | {ratio:.3f} | {row.seed_std:.4f} "
            f"| {per_seed(spearman, row.spearman)} | {per_seed(kendall, row.kendall)} "
            f"| {per_seed(precision, row.precision)} |"
        )
    return "\n".join(lines) + "\n"


def scatter_plot(
    path: Path,
    protocol: str,
    truth_protocol: str,
    rewards: Sequence[Sequence[float]],
    reference: Sequence[float],
    seeds: Sequence[int],
) -> None:
    """A PNG of every rule's single-seed reward under ``protocol`` against its truth, one
    colour per seed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5))
    for index, seed in enumerate(seeds):
        axes.scatter(
            reference, [row[index] for row in rewards], s=14, alpha=0.7, label=f"seed {seed}"
        )
    axes.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    axes.set_xlabel(f"truth: {truth_protocol}, mean over seeds")
    axes.set_ylabel(f"{protocol}, single seed")
    axes.set_title(f"{protocol} vs {truth_protocol} ({len(reference)} rules)")
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@dataclass(frozen=True)
class Measurements:
    """Every reference rule's reward under every protocol and seed: ``rewards[protocol][rule]
    [seed]`` and ``seconds`` likewise; ``trained`` evaluations paid now, ``from_store`` answered
    by the store."""

    names: tuple[str, ...]
    rules: tuple[Rule, ...]
    protocols: tuple[Protocol, ...]
    seeds: tuple[int, ...]
    rewards: dict[str, list[list[float]]]
    seconds: dict[str, list[list[float]]]
    trained: int
    from_store: int


def measure(
    rules: Sequence[tuple[str, Rule]],
    protocols: Sequence[Protocol],
    seeds: Sequence[int],
    *,
    task: Task,
    store: RewardStore,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Measurements:
    """Evaluate every rule under every protocol (cheapest first, as given) and seed through the
    reward store (:func:`~nos_sym.evaluation.memoized.evaluate_memoized`): nothing is paid
    twice, and a killed run resumes where it stopped."""
    total = len(rules) * len(protocols) * len(seeds)
    rewards: dict[str, list[list[float]]] = {}
    seconds: dict[str, list[list[float]]] = {}
    trained = from_store = done = 0
    for protocol in protocols:
        rewards[protocol.name] = [[] for _ in rules]
        seconds[protocol.name] = [[] for _ in rules]
        for seed in seeds:
            for index, (_, rule) in enumerate(rules):
                record, cached = evaluate_memoized(
                    rule,
                    task=task,
                    protocol=protocol,
                    seed=seed,
                    store=store,
                    device=device,
                )
                rewards[protocol.name][index].append(record.result.reward)
                seconds[protocol.name][index].append(record.result.seconds)
                from_store += cached
                trained += not cached and record.result.status != "degenerate"
                done += 1
                if progress is not None:
                    progress(done, total)
    return Measurements(
        names=tuple(name for name, _ in rules),
        rules=tuple(rule for _, rule in rules),
        protocols=tuple(protocols),
        seeds=tuple(seeds),
        rewards=rewards,
        seconds=seconds,
        trained=trained,
        from_store=from_store,
    )


def report(measurements: Measurements, output: Path, command: str) -> list[ProtocolStats]:
    """Write ``calibration.md`` (the table, the command, the number of rules),
    ``calibration.json`` (every reward and the statistics) and ``scatter-<protocol>.png`` for
    every cheaper protocol into ``output``; returns the table's rows."""
    names = [protocol.name for protocol in measurements.protocols]
    *cheaper, last = names
    reference = truth(measurements.rewards[last])
    stats = [
        protocol_stats(
            name,
            measurements.rewards[name],
            [s for row in measurements.seconds[name] for s in row],
            measurements.seeds,
            None if name == last else reference,
        )
        for name in names
    ]
    output.mkdir(parents=True, exist_ok=True)
    n = len(measurements.rules)
    (output / "calibration.md").write_text(
        f"# Calibration against `{last}` ({n} rules, seeds "
        f"{', '.join(map(str, measurements.seeds))})\n\n"
        f"```\n{command}\n```\n\n"
        f"Truth: the `{last}` reward, mean over the seeds; correlations and precision@10 % "
        f"(k = {math.ceil(TOP_FRACTION * n)}) of a single-seed reward against it, mean "
        f"(per seed).\n\n" + markdown_table(stats, stats[-1].seconds)
    )
    (output / "calibration.json").write_text(
        json.dumps(
            {
                "command": command,
                "truth": last,
                "seeds": list(measurements.seeds),
                "protocols": {p.name: p.hash for p in measurements.protocols},
                "stats": [row.to_json() for row in stats],
                "rules": [
                    {
                        "name": name,
                        "dsl": rule.dsl,
                        "key": rule.key,
                        "truth": reference[index],
                        "rewards": {p: measurements.rewards[p][index] for p in names},
                        "seconds": {p: measurements.seconds[p][index] for p in names},
                    }
                    for index, (name, rule) in enumerate(
                        zip(measurements.names, measurements.rules, strict=True)
                    )
                ],
            },
            indent=1,
        )
        + "\n"
    )
    for name in cheaper:
        scatter_plot(
            output / f"scatter-{name}.png",
            name,
            last,
            measurements.rewards[name],
            reference,
            measurements.seeds,
        )
    return stats
