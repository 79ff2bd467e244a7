"""What a rule's groups read: bank operands, live groups, and the minimal form of a rule.

A group ``op1 op2 u1 u2 b`` computes b(u1(op1), u2(op2)) and appends it to the bank as ``oK``;
the last group is Δ. A group *reads* op1, and op2 unless b is ``keep`` (keep(x, y) = x drops its
right side). A group is *live* when Δ reads it: the last group, and every group a live group's
read operands name. Nothing else changes Δ, so the canonical form (:mod:`nos_sym.dsl`) is built
from live code only, the DSL tree (:mod:`nos_sym.notation`) greys the rest out, and the
controller's ``must_use_bank`` asks whether a group reads the bank.

The minimal form of a rule keeps only the live groups, renumbered ``o1, o2, …`` in their order,
and writes the dead side of each ``keep`` group in one normal form: op2 is op1 repeated and u2
is ``id`` (``x y u1 u2 keep`` → ``x x u1 id keep``). It has the same canonical key as the rule
(same live code, read in the same order), and is its own minimal form.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Group = tuple[str, str, str, str, str]
"""One group's tokens: ``(op1, op2, u1, u2, b)``."""

DEAD_UNARY = "id"
"""u2 of a ``keep`` group in the minimal form (op2 there is op1 repeated)."""


def is_bank_operand(token: str) -> bool:
    """Whether a token is a bank operand ``oK`` (the result of group K), not a row of the table."""
    return token[0] == "o" and token[1:].isdigit()


def bank_index(token: str) -> int:
    """0-based index of the group a bank operand ``oK`` names (K − 1)."""
    return int(token[1:]) - 1


def read_operands(group: Sequence[str]) -> tuple[str, ...]:
    """The operands a group's value depends on: (op1,) for ``keep``, else (op1, op2)."""
    op1, op2, _, _, binary = group
    return (op1,) if binary == "keep" else (op1, op2)


def live_groups(groups: Sequence[Sequence[str]]) -> tuple[int, ...]:
    """0-based indices of the groups Δ reads, ascending (the last group is always live)."""
    live, pending = set(), [len(groups) - 1]
    while pending:
        index = pending.pop()
        if index not in live:
            live.add(index)
            pending.extend(
                bank_index(token)
                for token in read_operands(groups[index])
                if is_bank_operand(token)
            )
    return tuple(sorted(live))


def minimal_groups(groups: Sequence[Sequence[str]]) -> tuple[Group, ...]:
    """The live groups, renumbered, with keep's dead side as op1 repeated and ``id``."""
    live = live_groups(groups)
    number = {old: new for new, old in enumerate(live, start=1)}

    def renumbered(token: str) -> str:
        return f"o{number[bank_index(token)]}" if is_bank_operand(token) else token

    minimal = []
    for index in live:
        op1, op2, unary1, unary2, binary = groups[index]
        op1 = renumbered(op1)
        if binary == "keep":
            op2, unary2 = op1, DEAD_UNARY
        else:
            op2 = renumbered(op2)
        minimal.append((op1, op2, unary1, unary2, binary))
    return tuple(minimal)


def to_text(groups: Iterable[Sequence[str]]) -> str:
    """DSL text of groups: tokens joined by spaces, groups by ``" ; "`` (as ``Rule.dsl``)."""
    return " ; ".join(" ".join(group) for group in groups)


__all__ = [
    "DEAD_UNARY",
    "Group",
    "bank_index",
    "is_bank_operand",
    "live_groups",
    "minimal_groups",
    "read_operands",
    "to_text",
]
