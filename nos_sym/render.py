"""Pictures of rules: their trees drawn as PNG (matplotlib) or written as Graphviz DOT.

The trees and the LaTeX come from :mod:`nos_sym.notation` (re-exported here). This module
depends on :mod:`nos_sym.dsl` (to parse a rule given as text); ``dsl`` never imports it.
"""

from __future__ import annotations

import collections
from pathlib import Path

import networkx as nx

from nos_sym.dsl import Rule, as_rule
from nos_sym.notation import SYMBOL_LATEX, PaperLatexPrinter, dsl_tree, expression_tree, latex

# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------
_COLORS = {
    "operand": "#dbeafe",
    "constant": "#e5e7eb",
    "function": "#fef3c7",
    "unary": "#fef3c7",
    "operator": "#dcfce7",
    "binary": "#dcfce7",
}


def _layout(graph: nx.DiGraph) -> dict:
    """Layered top-down positions: layer 0 at the top; within a layer, nodes ordered by where
    their parents are (then by argument position), so that edges do not cross needlessly."""
    layers: dict[int, list] = {}
    for node, data in graph.nodes(data=True):
        layers.setdefault(data["layer"], []).append(node)
    positions: dict = {}
    for layer in sorted(layers):

        def order(node, layer=layer):
            parents = [p for p in graph.predecessors(node) if p in positions]
            if not parents:
                return (layers[layer].index(node), 0)
            first = min(parents, key=lambda p: positions[p][0])
            return (positions[first][0], graph.edges[first, node].get("position", 0))

        nodes = sorted(layers[layer], key=order)
        for i, node in enumerate(nodes):
            positions[node] = ((i + 1) / (len(nodes) + 1), -layer)
    return positions


def write_dot(graph: nx.DiGraph, path: Path, title: str) -> None:
    """Graphviz DOT text of a tree (labels as written, boxes coloured by kind)."""

    def quote(text: object) -> str:
        return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {quote(title)} {{", "  node [shape=box, style=filled];"]
    for node, data in graph.nodes(data=True):
        style = "" if data.get("live", True) else ", fontcolor=gray"
        lines.append(
            f"  {quote(node)} [label={quote(data['label'])}, "
            f"fillcolor={quote(_COLORS[data['kind']])}{style}];"
        )
    lines.extend(f"  {quote(a)} -> {quote(b)};" for a, b in graph.edges)
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def draw_graph(graph: nx.DiGraph, axes, title: str) -> None:
    """Draw a tree on matplotlib ``axes``: boxes coloured by kind, dead parts greyed out."""
    positions = _layout(graph)
    depth = max(data["layer"] for _, data in graph.nodes(data=True)) + 1
    for a, b in graph.edges:
        (xa, ya), (xb, yb) = positions[a], positions[b]
        axes.annotate(
            "",
            xy=(xb, yb + 0.18),
            xytext=(xa, ya - 0.18),
            arrowprops={"arrowstyle": "-", "color": "#6b7280"},
        )
    for node, data in graph.nodes(data=True):
        x, y = positions[node]
        live = data.get("live", True)
        axes.text(
            x,
            y,
            data["label"],
            ha="center",
            va="center",
            fontsize=13,
            color="black" if live else "#9ca3af",
            bbox={
                "boxstyle": "round,pad=0.4",
                "facecolor": _COLORS[data["kind"]],
                "edgecolor": "#374151" if live else "#d1d5db",
            },
        )
    axes.set_xlim(0, 1)
    axes.set_ylim(-depth + 0.5, 0.6)
    axes.set_title(title, fontsize=10)
    axes.axis("off")


def tree_size(graph: nx.DiGraph) -> tuple[int, int]:
    """(widest layer, number of layers) of a tree, to size its picture."""
    layers = collections.Counter(data["layer"] for _, data in graph.nodes(data=True))
    return max(layers.values()), len(layers)


def write_png(graph: nx.DiGraph, path: Path, title: str) -> None:
    """A PNG picture of a tree, drawn with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, depth = tree_size(graph)
    figure, axes = plt.subplots(figsize=(max(4.0, 1.6 * width), max(3.0, 1.1 * depth + 1)))
    draw_graph(graph, axes, title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def draw_tree(rule: Rule | str, path: str | Path, view: str = "expr") -> Path:
    """Write the tree of a rule to ``path``: PNG (matplotlib) or DOT, chosen by the extension."""
    rule = as_rule(rule)
    path = Path(path)
    graph = rule.tree(view)
    writers = {".png": write_png, ".dot": write_dot, ".gv": write_dot}
    if path.suffix.lower() not in writers:
        raise ValueError(f"cannot write a tree to {path.name!r}: use a .png or .dot file")
    writers[path.suffix.lower()](graph, path, rule.dsl)
    return path


__all__ = [
    "SYMBOL_LATEX",
    "PaperLatexPrinter",
    "draw_graph",
    "draw_tree",
    "dsl_tree",
    "expression_tree",
    "latex",
    "write_dot",
    "write_png",
]
