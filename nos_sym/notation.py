"""The paper's notation of a rule: LaTeX of Δ, and Δ and the DSL's groups as trees (graphs).

Pure functions of a SymPy expression or of a rule's groups; :mod:`nos_sym.dsl`'s ``Rule.latex``
and ``Rule.tree`` call them, and :mod:`nos_sym.render` draws the trees. Operands print as the
primitives table's ``latex`` column says (:data:`nos_sym.primitives.SYMBOL_LATEX`).
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import sympy as sp
from sympy.printing.latex import LatexPrinter

from nos_sym import primitives
from nos_sym.groups import is_bank_operand, live_groups, read_operands
from nos_sym.primitives import BY_TOKEN, SYMBOL_LATEX, Stochastic, power_of_ten


class PaperLatexPrinter(LatexPrinter):
    """SymPy's LaTeX printer with the paper's notation: hats on the averages, ``sign(x)``,
    ``10^{-3} w`` for weight-decay scales, and numbered draws when a rule has several."""

    def __init__(self, show_draws: bool = False):
        super().__init__({"symbol_names": SYMBOL_LATEX})
        self.show_draws = show_draws

    def _print_sign(self, expr, exp=None):
        text = BY_TOKEN["sign"].latex.format(x=self._print(expr.args[0]))
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
    live = set(live_groups(groups))
    for k, group in enumerate(groups, start=1):
        op1, op2, unary1, unary2, binary = group
        reads = len(read_operands(group)) if k - 1 in live else 0  # live sides: 0, 1 or 2
        graph.add_node(f"{k}.b", label=binary, kind="binary", group=k, live=reads > 0)
        for side, operand, unary in ((1, op1, unary1), (2, op2, unary2)):
            graph.add_node(f"{k}.u{side}", label=unary, kind="unary", group=k, live=side <= reads)
            graph.add_edge(f"{k}.b", f"{k}.u{side}", position=side - 1)
            target = f"{operand[1:]}.b" if is_bank_operand(operand) else f"{k}.op{side}"
            if not is_bank_operand(operand):
                label = _math(BY_TOKEN[operand].latex)
                graph.add_node(target, label=label, kind="operand", group=k, live=side <= reads)
            graph.add_edge(f"{k}.u{side}", target, position=0)
    for node, layer in _layers(graph).items():
        graph.nodes[node]["layer"] = layer
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


__all__ = ["PaperLatexPrinter", "dsl_tree", "expression_tree", "latex"]
