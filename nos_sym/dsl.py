"""Parsing the DSL and the canonical form of a rule.

``parse(text)`` reads a rule with the Lark grammar ``grammar/nos.lark``, whose Transformer
(:class:`_GroupBuilder`) builds the groups ``(op1, op2, u1, u2, b)`` from the grammar's own
structure; every bad input (characters, tokens, order, a bank operand ``oK`` naming a group not
yet computed, a rule nested too deeply for SymPy) is a :class:`DSLSyntaxError` with 1-based line
and column. From the groups it builds the update Δ (w ← w − lr·Δ) as a SymPy expression from the
primitives table. SymPy's automatic ordering of Add/Mul makes commuted copies identical;
building only from the last group makes dead code (``keep``'s right argument, unused groups)
vanish; stochastic occurrences carry labels that are renumbered in a canonical order, so every
draw stays independent and commuted copies still collide. The canonical expression's ``srepr``,
prefixed by :data:`CANONICAL_VERSION`, is hashed into :attr:`Rule.key`. ``Rule.minimal_dsl`` is
the rule without its dead code (:mod:`nos_sym.groups`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from functools import cache, cached_property, lru_cache

import lark
import sympy as sp

from nos_sym import notation, primitives
from nos_sym.errors import UserError
from nos_sym.groups import bank_index, is_bank_operand, minimal_groups, to_text
from nos_sym.primitives import BY_TOKEN, Stochastic

CANONICAL_VERSION = "nos_sym.canonical/1"
"""Bumped whenever the canonical form changes, so old cached rewards never mix with new keys."""

MAX_LABEL_PERMUTATIONS = 720
"""Tied stochastic occurrences are ordered by trying every permutation up to this many."""


class DSLSyntaxError(UserError, ValueError):
    """A rule that is not a sentence of the DSL. ``line`` and ``column`` are 1-based."""

    def __init__(self, message: str, *, line: int, column: int, text: str):
        super().__init__(f"line {line}, column {column}: {message}")
        self.message = message
        self.line = line
        self.column = column
        self.text = text


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
_ALLOWED_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-; \t\n\r\f\v"
)

_EXPECTED = {
    "OPERAND": ("an operand", primitives.OPERANDS),
    "BANK_OPERAND": ("an operand", primitives.OPERANDS),
    "UNARY": ("a unary function", primitives.UNARY),
    "BINARY": ("a binary function", primitives.BINARY),
}


@lark.v_args(inline=True)
class _GroupBuilder(lark.Transformer):
    """Builds a rule's groups from the grammar's own structure while the LALR parser reduces
    (as lark's calc example computes): ``operand``/``unary``/``binary`` become their token, a
    ``group`` the tuple of its five tokens, ``start`` the tuple of groups. Tokens keep their
    line and column for the bank check of :func:`_groups`."""

    def operand(self, token: lark.Token) -> lark.Token:
        return token

    unary = binary = operand

    def group(self, *tokens: lark.Token) -> tuple[lark.Token, ...]:
        return tokens

    def start(self, *groups: tuple[lark.Token, ...]) -> tuple[tuple[lark.Token, ...], ...]:
        return groups


@cache
def grammar() -> lark.Lark:
    """The LALR parser of ``nos.lark`` with :class:`_GroupBuilder` (built once); ``parse``
    returns the groups as tuples of tokens."""
    return lark.Lark.open_from_package(
        "nos_sym.grammar",
        "nos.lark",
        parser="lalr",
        propagate_positions=False,
        transformer=_GroupBuilder(),
    )


_SHOWN_CHARACTERS = 40
"""Longer words are cut in messages (a 5000-digit ``o999…`` must not fill the screen)."""


def _shown(word: str) -> str:
    return word if len(word) <= _SHOWN_CHARACTERS else word[:_SHOWN_CHARACTERS] + "…"


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


def _word_at(text: str, offset: int) -> str:
    if offset >= len(text):
        return "end of input"
    end = offset
    while end < len(text) and text[end] not in " \t\n\r\f\v;":
        end += 1
    return repr(_shown(text[offset : max(end, offset + 1)]))


def _describe_expected(terminals: set[str]) -> str:
    kinds = [_EXPECTED[name] for name in ("OPERAND", "UNARY", "BINARY") if name in terminals]
    if not kinds and "BANK_OPERAND" in terminals:
        kinds = [_EXPECTED["BANK_OPERAND"]]
    described = [f"{what} ({', '.join(names[:4])}, ...)" for what, names in kinds]
    if "_SEPARATOR" in terminals or "$END" in terminals:
        described.append("';', the next group or the end of the rule")
    return " or ".join(described) or "nothing more"


def _error(text: str, offset: int, message: str) -> DSLSyntaxError:
    line, column = _position(text, offset)
    return DSLSyntaxError(message, line=line, column=column, text=text)


def _check_characters(text: str) -> None:
    for offset, character in enumerate(text):
        if character not in _ALLOWED_CHARACTERS:
            raise _error(text, offset, f"unexpected character {character!r}")


def _parsed(text: str) -> tuple[tuple[lark.Token, ...], ...]:
    """The rule's groups of tokens, as the grammar reads them."""
    if not isinstance(text, str):
        raise DSLSyntaxError(
            f"a rule is a str, got {type(text).__name__}", line=1, column=1, text=repr(text)
        )
    _check_characters(text)
    try:
        return grammar().parse(text)
    except lark.exceptions.UnexpectedInput as error:
        offset = getattr(error, "pos_in_stream", None)
        token = getattr(error, "token", None)
        if token is not None and token.type == "$END" or offset is None:
            offset = len(text)
        interactive = getattr(error, "interactive_parser", None)
        if interactive is not None:  # exact, unlike the LALR state's merged lookahead sets
            expected = interactive.accepts()
        else:
            expected = getattr(error, "expected", None) or getattr(error, "allowed", None) or set()
        got = _word_at(text, offset)
        raise _error(
            text, offset, f"expected {_describe_expected(set(expected))}, got {got}"
        ) from None


def _reads_a_later_group(token: lark.Token, group: int) -> bool:
    """Whether bank operand ``oK`` in (1-based) group ``group`` names K ≥ group. Compared as
    digit strings first: ``int()`` refuses texts of more than 4300 digits."""
    digits = token[1:]
    return len(digits) > len(str(group)) or int(digits) >= group


def _groups(text: str) -> tuple[tuple[str, ...], ...]:
    """The validated groups: parsed, and every bank operand ``oK`` reads a group before its own."""
    groups = _parsed(text)
    for group, tokens in enumerate(groups, start=1):
        for token in tokens[:2]:
            if token.type == "BANK_OPERAND" and _reads_a_later_group(token, group):
                available = f"o1..o{group - 1}" if group > 2 else ("o1" if group == 2 else "none")
                raise DSLSyntaxError(
                    f"{_shown(token)} used in group {group}, before group {_shown(token[1:])} is"
                    f" computed (available here: {available})",
                    line=token.line,
                    column=token.column,
                    text=text,
                )
    return tuple(tuple(map(str, tokens)) for tokens in groups)


# --------------------------------------------------------------------------------------------
# The canonical expression
# --------------------------------------------------------------------------------------------
def _label_symbol(index: int, prefix: str = "k") -> sp.Symbol:
    return sp.Symbol(f"{prefix}{index}", integer=True, nonnegative=True)


def _build(groups: tuple[tuple[str, ...], ...]) -> sp.Expr:
    """Δ of the last group, built only from live code; stochastic draws get provisional labels."""
    counter = itertools.count()
    built: dict[int, sp.Expr] = {}

    def next_label() -> sp.Symbol:
        return _label_symbol(next(counter), prefix="_draw")

    def operand(token: str) -> sp.Expr:
        if is_bank_operand(token):
            return group(bank_index(token))
        return BY_TOKEN[token].sympy(next_label)

    def group(index: int) -> sp.Expr:
        if index not in built:
            op1, op2, unary1, unary2, binary = groups[index]
            left = BY_TOKEN[unary1].sympy(operand(op1), next_label)
            if binary == "keep":  # the right argument is dead: no draws happen there
                built[index] = left
            else:
                right = BY_TOKEN[unary2].sympy(operand(op2), next_label)
                built[index] = BY_TOKEN[binary].sympy(left, right)
        return built[index]

    return group(len(groups) - 1)


def _labels(expr: sp.Expr) -> list[sp.Symbol]:
    return sorted({node.args[-1] for node in expr.atoms(Stochastic)}, key=str)


def _relabel(expr: sp.Expr) -> sp.Expr:
    """Renumber the stochastic draws k0, k1, ... in an order that does not depend on the
    provisional (reading-order) labels: each draw is ordered by the expression seen from it
    (its own label marked, the others blanked); ties are broken by the smallest ``srepr`` over
    their permutations (up to :data:`MAX_LABEL_PERMUTATIONS`, else in provisional order)."""
    labels = _labels(expr)
    if not labels:
        return expr
    mark, blank = _label_symbol(0, "_mark"), _label_symbol(0, "_blank")

    def signature(label: sp.Symbol) -> str:
        view = {other: blank for other in labels}
        view[label] = mark
        return sp.srepr(expr.xreplace(view))

    by_signature: dict[str, list[sp.Symbol]] = {}
    for label in labels:
        by_signature.setdefault(signature(label), []).append(label)
    ties = [by_signature[key] for key in sorted(by_signature)]
    if math.prod(math.factorial(len(tie)) for tie in ties) > MAX_LABEL_PERMUTATIONS:
        orders = [ties]
    else:
        orders = (
            list(order)
            for order in itertools.product(*(itertools.permutations(tie) for tie in ties))
        )
    candidates = []
    for order in orders:
        flat = [label for tie in order for label in tie]
        candidate = expr.xreplace({label: _label_symbol(i) for i, label in enumerate(flat)})
        candidates.append((sp.srepr(candidate), candidate))
    return min(candidates, key=lambda pair: pair[0])[1]


def canonical_expression(groups: tuple[tuple[str, ...], ...]) -> sp.Expr:
    """The canonical SymPy form of Δ for already-validated groups."""
    return _relabel(_build(groups))


def canonical_key(expr: sp.Expr) -> str:
    """sha256 of the versioned ``srepr`` of a canonical expression."""
    return hashlib.sha256(f"{CANONICAL_VERSION}\n{sp.srepr(expr)}".encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Rule
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Rule:
    """A parsed update rule: Δ with w ← w − lr·Δ. The flags derived from Δ are computed once
    (the optimizer reads them every step).

    Two rules are equal (and hash alike) when their canonical keys are equal, whatever their text.
    """

    dsl: str
    groups: tuple[tuple[str, ...], ...]
    sympy: sp.Expr
    key: str = field(repr=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rule) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return self.dsl

    # ---- flags derived from the canonical form ---------------------------------------------
    @cached_property
    def is_degenerate(self) -> bool:
        """Δ is identically zero, not finite, or does not depend on the gradient at all."""
        expr = self.sympy
        return (
            expr.is_zero is True
            or not (expr.free_symbols & primitives.GRADIENT_SYMBOLS)
            or expr.has(sp.nan, sp.zoo, sp.oo, -sp.oo)
        )

    @cached_property
    def stochastic(self) -> bool:
        """Whether Δ contains random draws (drop, noise, anneal_noise)."""
        return bool(self.sympy.atoms(Stochastic))

    @cached_property
    def averages(self) -> tuple[str, ...]:
        """The running averages Δ reads (a subset of ``("m", "v", "gamma")``)."""
        used = {primitives.AVERAGE_OF_SYMBOL.get(symbol) for symbol in self.sympy.free_symbols}
        return tuple(name for name in ("m", "v", "gamma") if name in used)

    @cached_property
    def needs_total_steps(self) -> bool:
        """Whether Δ reads t/T (``ld``, ``cd``, ``rd``, ``anneal_noise``)."""
        return bool(self.sympy.free_symbols & primitives.DECAY_SYMBOLS) or self.sympy.has(
            primitives.AnnealNoise
        )

    @cached_property
    def decay_tokens(self) -> tuple[str, ...]:
        """The live tokens that need ``total_steps``, for error messages."""
        live = {str(s) for s in self.sympy.free_symbols & primitives.DECAY_SYMBOLS}
        if self.sympy.has(primitives.AnnealNoise):
            live.add("anneal_noise")
        return tuple(sorted(live))

    @cached_property
    def minimal_dsl(self) -> str:
        """The rule with only its live groups, renumbered, and the dead side of each ``keep``
        written as op1 repeated and ``id`` (:func:`nos_sym.groups.minimal_groups`):
        ``noise w_1e-1 drop_0.1 drop_0.1 keep ; m o1 sign id keep`` is ``m m sign id keep``.
        ``parse(rule.minimal_dsl).key == rule.key``, and the minimal form is its own."""
        return to_text(minimal_groups(self.groups))

    # ---- views ------------------------------------------------------------------------------
    def latex(self) -> str:
        """Δ in the paper's notation (:func:`nos_sym.notation.latex`)."""
        return notation.latex(self.sympy)

    def tree(self, view: str = "expr"):
        """A ``networkx.DiGraph`` of the canonical expression (``view="expr"``) or of the DSL's
        groups as the paper's Figure 2 draws them (``view="dsl"``)."""
        if view == "expr":
            return notation.expression_tree(self.sympy)
        if view == "dsl":
            return notation.dsl_tree(self.groups)
        raise ValueError(f"unknown tree view {view!r}: expected 'expr' or 'dsl'")

    def fingerprint(self, probes: int = 64, seed: int = 0, digits: int = 6) -> str:
        """A numeric digest of Δ: Δ evaluated on fixed random probe inputs, rounded to ``digits``
        significant digits and hashed (see :func:`nos_sym.compile.fingerprint`)."""
        from nos_sym.compile import fingerprint

        return fingerprint(self.sympy, probes=probes, seed=seed, digits=digits)


def parse(text: str) -> Rule:
    """Parse a DSL rule into its canonical :class:`Rule`.

    Raises :class:`DSLSyntaxError` (with 1-based ``line`` and ``column``) for every bad input.
    """
    groups = _groups(text)
    try:
        expr = canonical_expression(groups)
    except RecursionError:  # SymPy and the builder recurse: about 100 nested groups is the limit
        raise DSLSyntaxError(
            f"rule nested too deeply to canonicalize ({len(groups)} groups)",
            line=1,
            column=1,
            text=text,
        ) from None
    return Rule(dsl=to_text(groups), groups=groups, sympy=expr, key=canonical_key(expr))


@lru_cache(maxsize=65_536)
def _parse_cached(text: str) -> Rule:
    return parse(text)


def as_rule(rule: Rule | str) -> Rule:
    """A :class:`Rule` as it is, or DSL text parsed (remembered: searches and sweeps keep
    meeting the same strings). The one place where ``Rule | str`` is coerced."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str):
        return _parse_cached(rule)
    raise TypeError(f"rule must be a DSL string or a Rule, got {type(rule).__name__}")


__all__ = [
    "CANONICAL_VERSION",
    "DSLSyntaxError",
    "Rule",
    "as_rule",
    "canonical_key",
    "is_bank_operand",
    "parse",
]
