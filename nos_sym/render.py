"""Showing rules: LaTeX in the paper's notation, expression and DSL trees, pictures of them."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path

import networkx as nx
import sympy as sp
from sympy.printing.latex import LatexPrinter

from nos_sym import primitives
from nos_sym.dsl import Rule, is_bank_operand
from nos_sym.primitives import BY_TOKEN, Stochastic, power_of_ten

SYMBOL_LATEX = {
    primitives.M: r"\hat{m}",
    primitives.V: r"\hat{v}",
    primitives.GAMMA: r"\hat{\gamma}",
    primitives.EPS: r"\epsilon",
    primitives.LD: r"\operatorname{ld}",
    primitives.CD: r"\operatorname{cd}",
    primitives.RD: r"\operatorname{rd}",
}


class PaperLatexPrinter(LatexPrinter):
    """SymPy's LaTeX printer with the paper's notation: hats on the averages, ``sign(x)``,
    ``10^{-3} w`` for weight-decay scales, and numbered draws when a rule has several."""

    def __init__(self, show_draws: bool = False):
        super().__init__({"symbol_names": SYMBOL_LATEX})
        self.show_draws = show_draws

    def _print_sign(self, expr, exp=None):
        text = rf"\operatorname{{sign}}({self._print(expr.args[0])})"
        return f"{text}^{{{exp}}}" if exp else text

    def _print_Mul(self, expr):
        coefficient, rest = expr.as_coeff_Mul()
        exponent = power_of_ten(abs(coefficient))
        if exponent is not None and exponent != 0 and rest != 1:
            sign = "-" if coefficient < 0 else ""
            return f"{sign}10^{{{exponent}}} {self._print(rest)}"
        return super()._print_Mul(expr)


def latex(expr: sp.Expr) -> str:
    """Δ in the paper's notation; draws are numbered when there are several."""
    draws = {node.args[-1] for node in expr.atoms(Stochastic)}
    return PaperLatexPrinter(show_draws=len(draws) > 1).doprint(expr)


# --------------------------------------------------------------------------------------------
# Trees
# --------------------------------------------------------------------------------------------
def _math(text: str) -> str:
    return f"${text}$"


def _node_view(expr: sp.Expr) -> tuple[str, str, Sequence[sp.Expr]]:
    """(label, kind, children) of one node of the expression tree."""
    if expr.is_Symbol:
        return _math(SYMBOL_LATEX.get(expr, sp.latex(expr))), "operand", ()
    if expr.is_Number or not expr.free_symbols and not expr.atoms(Stochastic):
        return _math(sp.latex(expr)), "constant", ()
    if expr.is_Add:
        return "+", "operator", expr.args
    if expr.is_Mul:
        numerator, denominator = expr.as_numer_denom()
        if denominator != 1:
            return "÷", "operator", (numerator, denominator)
        return "×", "operator", expr.args
    if expr.is_Pow:
        base, exponent = expr.args
        if exponent == sp.S.Half:
            return "√", "function", (base,)
        return _math(f"(\\cdot)^{{{sp.latex(exponent)}}}"), "function", (base,)
    if isinstance(expr, primitives.Clip):
        bound = f"10^{{{power_of_ten(expr.args[1])}}}"
        return _math(rf"\operatorname{{clip}}_{{{bound}}}"), "function", expr.args[:1]
    if isinstance(expr, sp.Abs):
        return "|·|", "function", expr.args
    if isinstance(expr, primitives.Drop):
        return (
            _math(rf"\operatorname{{drop}}_{{{float(expr.args[1]):g}}}"),
            "function",
            expr.args[:1],
        )
    if isinstance(expr, Stochastic):
        return _math(PaperLatexPrinter().doprint(expr)), "operand", ()
    if isinstance(expr, sp.exp):
        return _math("e^{x}"), "function", expr.args
    return expr.func.__name__, "function", expr.args


def expression_tree(expr: sp.Expr) -> nx.DiGraph:
    """The canonical expression as a tree: edges point from a node to its arguments; node
    attributes ``label`` (paper notation, matplotlib mathtext), ``kind`` (operand, constant,
    function, operator) and ``layer`` (depth from the root, node 0)."""
    graph = nx.DiGraph()

    def add(node_expr: sp.Expr, layer: int) -> int:
        node = graph.number_of_nodes()
        label, kind, children = _node_view(node_expr)
        graph.add_node(node, label=label, kind=kind, layer=layer)
        for position, child in enumerate(children):
            graph.add_edge(node, add(child, layer + 1), position=position)
        return node

    add(expr, 0)
    return graph


def dsl_tree(groups: Sequence[Sequence[str]]) -> nx.DiGraph:
    """The rule's groups as the paper's Figure 2 draws them: each group's binary box over its two
    unary boxes over its two operands; an operand ``oK`` is group K's binary box. Nodes are
    named ``"k.b"``, ``"k.u1"``, ``"k.op1"``...; attributes ``label``, ``kind`` (operand, unary,
    binary), ``group``, ``live`` (whether Δ reads it) and ``layer``."""
    graph = nx.DiGraph()
    for k, (op1, op2, unary1, unary2, binary) in enumerate(groups, start=1):
        graph.add_node(f"{k}.b", label=binary, kind="binary", group=k)
        for side, operand, unary in ((1, op1, unary1), (2, op2, unary2)):
            graph.add_node(f"{k}.u{side}", label=unary, kind="unary", group=k)
            graph.add_edge(f"{k}.b", f"{k}.u{side}", position=side - 1)
            target = f"{operand[1:]}.b" if is_bank_operand(operand) else f"{k}.op{side}"
            if not is_bank_operand(operand):
                latex_of = BY_TOKEN[operand].latex
                graph.add_node(target, label=_math(latex_of), kind="operand", group=k)
            graph.add_edge(f"{k}.u{side}", target, position=0)
    root = f"{len(groups)}.b"
    dead_edges = {(f"{k}.b", f"{k}.u2") for k, group in enumerate(groups, 1) if group[4] == "keep"}
    live_graph = graph.edge_subgraph(edge for edge in graph.edges if edge not in dead_edges)
    live = {root} | (nx.descendants(live_graph, root) if root in live_graph else set())
    layers = _layers(graph)
    for node in graph:
        graph.nodes[node]["live"] = node in live
        graph.nodes[node]["layer"] = layers[node]
    return graph


def _layers(graph: nx.DiGraph) -> dict:
    """Layer of each node: its longest distance from a node nobody points to, so that a shared
    bank result sits below every box that reads it."""
    layers: dict = {}
    for node in nx.topological_sort(graph):
        layers.setdefault(node, 0)
        for child in graph.successors(node):
            layers[child] = max(layers.get(child, 0), layers[node] + 1)
    return layers


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
    from nos_sym.dsl import as_rule

    rule = as_rule(rule)
    path = Path(path)
    graph = rule.tree(view)
    writers = {".png": write_png, ".dot": write_dot, ".gv": write_dot}
    if path.suffix.lower() not in writers:
        raise ValueError(f"cannot write a tree to {path.name!r}: use a .png or .dot file")
    writers[path.suffix.lower()](graph, path, rule.dsl)
    return path


__all__ = ["PaperLatexPrinter", "draw_tree", "dsl_tree", "expression_tree", "latex"]
