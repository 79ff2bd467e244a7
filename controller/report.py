"""``nos-sym report``: the paper's Figure 4 for a run, the trees of its best rules, a summary;
as a PNG with a Markdown summary, or as one self-contained HTML page."""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence
from pathlib import Path

from nos_sym.controller.rundir import (
    leaderboard,
    leaderboard_markdown,
    load_config,
    reward_text,
    status,
    status_rows,
    steps,
)
from nos_sym.dsl import Rule, as_rule
from nos_sym.html_report import (
    Html,
    Section,
    escape,
    figure_html,
    figure_svg,
    math_html,
    table_html,
    write_html,
)
from nos_sym.render import draw_graph, tree_size


def draw_rewards(axes, history: Sequence[tuple[int, Sequence[float]]], title: str) -> None:
    """Reward of the sampled rules per controller step on matplotlib ``axes``: the mean and the
    max of each step's samples, and the best so far."""
    if history:
        xs = [step for step, _ in history]
        means = [sum(r) / len(r) for _, r in history]
        maxima = [max(r) for _, r in history]
        best_so_far = [max(maxima[: i + 1]) for i in range(len(maxima))]
        axes.plot(xs, means, label="mean reward of the step's samples", color="#2563eb")
        axes.plot(xs, maxima, label="max reward of the step's samples", color="#16a34a", alpha=0.7)
        axes.plot(xs, best_so_far, label="best so far", color="#dc2626", linestyle="--")
        axes.legend(loc="lower right")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("controller step")
    axes.set_ylabel("reward (held-out accuracy)")
    axes.set_title(title)
    axes.grid(alpha=0.3)


def write_report(run_dir: str | Path, output: str | Path, top: int = 3) -> tuple[Path, Path]:
    """Write ``output`` (PNG: reward of the sampled rules per controller step — mean, max and
    best so far — over the expression trees of the ``top`` best rules) and a markdown summary
    beside it (same name, ``.md``). Returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    board = leaderboard(run_dir, n=max(top, 10))  # read once: the trees and the summary
    best_rules = board[:top]
    figure = plt.figure(figsize=(12, 8.5))
    grid = figure.add_gridspec(2, max(1, len(best_rules)), height_ratios=(1, 1.3))
    draw_rewards(figure.add_subplot(grid[0, :]), list(steps(run_dir)), _title(run_dir))
    for column, entry in enumerate(best_rules):
        axes = figure.add_subplot(grid[1, column])
        title = f"#{column + 1}  reward {entry['reward']:.4f}\n" + textwrap.fill(
            entry["minimal_dsl"], 40
        )
        draw_graph(as_rule(entry["dsl"]).tree(), axes, title)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)

    summary = status(run_dir)
    rows = leaderboard_markdown(board[:10])
    counts = "\n".join(f"| {name} | {value} |" for name, value in status_rows(summary))
    markdown = output.with_suffix(".md")
    markdown.write_text(
        f"# Search run `{Path(run_dir).name}`\n\n![reward curves and best trees]({output.name})\n\n"
        f"| count | value |\n| --- | --- |\n{counts}\n\n"
        f"## Leaderboard\n\n{rows}\n"
    )
    return output, markdown


def _title(run_dir: str | Path) -> str:
    return f"search run {Path(run_dir).name}"


def _tree_svg(rule: Rule, caption: str) -> Html:
    """The expression tree of ``rule`` as an inline SVG figure."""
    from matplotlib.figure import Figure

    graph = rule.tree("expr")
    width, depth = tree_size(graph)
    figure = Figure(figsize=(max(4.0, 1.6 * width), max(3.0, 1.1 * depth + 1)))
    draw_graph(graph, figure.subplots(), textwrap.fill(rule.minimal_dsl, 48))
    figure.tight_layout()
    return figure_html(figure_svg(figure), caption, css_class="tree")


def run_sections(run_dir: str | Path, top: int = 3, n: int = 10) -> list[Section]:
    """The sections of a run's page: accounting, reward curve, leaderboard of the ``n`` best
    rules (Δ typeset, minimal DSL, key), expression trees of the ``top`` best, config."""
    from matplotlib.figure import Figure

    config, run_id = load_config(run_dir)
    counts = status(run_dir)
    history = list(steps(run_dir))
    ranked = [(entry, as_rule(entry["dsl"])) for entry in leaderboard(run_dir, n=max(n, top))]

    identity = (
        "samples = evaluated + from_store + degenerate: {samples} = {evaluated} + "
        "{from_store} + {degenerate}".format(**counts)
    )
    accounting = table_html(["count", "value"], status_rows(counts), numeric=[1])
    curve = Figure(figsize=(10, 4))
    draw_rewards(curve.subplots(), history, _title(run_dir))
    curve.tight_layout()
    rows = [
        (
            i,
            reward_text(entry),
            entry["status"],
            math_html(rule.latex()),
            Html(f"<code>{escape(rule.minimal_dsl)}</code>"),
            Html(f'<code class="key">{escape(rule.key)}</code>'),
        )
        for i, (entry, rule) in enumerate(ranked[:n], start=1)
    ]
    board = (
        table_html(["#", "reward", "status", "Δ", "minimal DSL", "key"], rows, numeric=[0, 1])
        if rows
        else Html('<p class="note">no rule evaluated yet</p>')
    )
    trees = Html(
        "\n".join(
            _tree_svg(rule, f"#{i}  reward {entry['reward']:.4f}")
            for i, (entry, rule) in enumerate(ranked[:top], start=1)
        )
        or '<p class="note">no rule evaluated yet</p>'
    )
    settings = [*dataclasses.asdict(config).items(), ("run_id", run_id)]
    return [
        Section("Accounting", Html(f"<p>{escape(identity)}</p>\n{accounting}")),
        Section("Reward per controller step", figure_svg(curve)),
        Section("Leaderboard", board),
        Section("Best rules' trees", trees),
        Section("Config", table_html(["setting", "value"], settings)),
    ]


def write_report_html(run_dir: str | Path, path: str | Path, top: int = 3, n: int = 10) -> Path:
    """Write a run's report as one self-contained HTML page (:func:`run_sections`) to ``path``."""
    return write_html(path, _title(run_dir), run_sections(run_dir, top, n), intro=str(run_dir))
