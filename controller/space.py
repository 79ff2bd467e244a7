"""Search spaces: which token strings the controller may emit.

A rule with n groups is a string of 5·n tokens ``op1 op2 u1 u2 b`` per group (docs/dsl.md). Position
p = 5·(k−1) + j belongs to group k and slot j; its vocabulary is

* operand slots: the space's operands followed by the bank ``o1 … o_{k−1}`` (grammar: only
  groups already computed can be read),
* unary slots: the space's unary functions,
* binary slot: the space's binary functions,

always in the primitives table's order, so a vocabulary index means the same token for every
space with the same tokens. Tokens are stored as per-position vocabulary indices.

Constraints (section 4.1 of the paper; the controller sets forbidden logits to −∞):

* ``distinct_operands``: op2 ≠ op1 within a group.
* ``final_not_add``: the last group's binary function is not ``add``.
* ``must_use_bank``: every group k ≥ 2 reads at least one bank operand, judged on what the
  group really reads (:func:`nos_sym.groups.read_operands`: ``keep`` drops op2): op1 is a bank
  operand, or op2 is one and b is not ``keep``. So when op1 is not a bank operand, op2 must be
  one and b must not be ``keep`` (``g o1 id id keep`` reads only ``g``).

Only op2 and the binary slots are ever constrained, each only by op1 of its own group (and the
last binary slot by its position), so groups are independent and the number of valid strings
factorises (:func:`size`).

No mask is ever empty (checked by :meth:`SearchSpace.__post_init__`'s requirements):

* op1, unary slots: nothing is forbidden, and the vocabularies are non-empty.
* op2 of group k: if ``must_use_bank``, k ≥ 2 and op1 is not a bank operand, the allowed set is
  the whole bank o1 … o_{k−1} (k − 1 ≥ 1 tokens, none equal to op1). Otherwise at most op1 is
  forbidden, from a vocabulary of ≥ 2 tokens (group 1: ≥ 2 operands are required when
  ``distinct_operands``; group k ≥ 2: ≥ 1 operand plus ≥ 1 bank operand).
* binary slots: ``final_not_add`` requires a binary function other than ``add``; with
  ``must_use_bank`` and k ≥ 2 groups, one other than ``keep`` (and, in the last group with
  ``final_not_add``, other than both).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import torch

from nos_sym.groups import to_text
from nos_sym.primitives import BINARY, BY_TOKEN, OPERANDS, PRIMITIVES, UNARY, Kind

SPACE_VERSION = "nos_sym.space/1"
"""Part of :attr:`SearchSpace.hash`; bumped if the meaning of a field or of a position changes."""

GROUP_LENGTH = 5
MAX_GROUPS = 3

_TABLE_ORDER = {primitive.token: index for index, primitive in enumerate(PRIMITIVES)}


class Slot(str, Enum):
    """The role of a position inside its group ``op1 op2 u1 u2 b``."""

    OPERAND1 = "operand1"
    OPERAND2 = "operand2"
    UNARY1 = "unary1"
    UNARY2 = "unary2"
    BINARY = "binary"


SLOTS = tuple(Slot)


@dataclass(frozen=True)
class Position:
    """One token position of a rule: its index in the string, group k (1-based), slot and
    vocabulary (what the softmax head of this position chooses from)."""

    index: int
    group: int
    slot: Slot
    vocabulary: tuple[str, ...]


def bank_tokens(group: int) -> tuple[str, ...]:
    """The bank operands readable in group k: ``o1 … o_{k−1}``."""
    return tuple(f"o{j}" for j in range(1, group))


@dataclass(frozen=True)
class SearchSpace:
    """The enabled tokens, the number of groups and the constraint switches (paper defaults: all
    on). Token tuples are stored in the primitives table's order, whatever order they are given
    in, so equal spaces have equal :attr:`hash`."""

    operands: tuple[str, ...]
    unary: tuple[str, ...]
    binary: tuple[str, ...]
    groups: int = 2
    distinct_operands: bool = True
    final_not_add: bool = True
    must_use_bank: bool = True

    def __post_init__(self) -> None:
        for field_name, kind in (
            ("operands", Kind.OPERAND),
            ("unary", Kind.UNARY),
            ("binary", Kind.BINARY),
        ):
            given = tuple(getattr(self, field_name))
            unknown = [t for t in given if t not in BY_TOKEN or BY_TOKEN[t].kind is not kind]
            if unknown:
                raise ValueError(f"{field_name}: not {kind.value} tokens of the table: {unknown}")
            if len(set(given)) != len(given):
                raise ValueError(f"{field_name}: duplicate tokens in {given}")
            if not given:
                raise ValueError(f"{field_name}: at least one token is needed")
            object.__setattr__(self, field_name, tuple(sorted(given, key=_TABLE_ORDER.get)))
        if not 1 <= self.groups <= MAX_GROUPS:
            raise ValueError(f"groups must be in 1..{MAX_GROUPS}, got {self.groups}")
        if self.distinct_operands and len(self.operands) < 2:
            raise ValueError("distinct_operands needs at least two operands")
        if self.final_not_add and self.binary == ("add",):
            raise ValueError("final_not_add needs a binary function other than add")
        final_forbidden = {"keep"} | ({"add"} if self.final_not_add else set())
        if self.must_use_bank and self.groups >= 2 and set(self.binary) <= final_forbidden:
            raise ValueError(
                "must_use_bank needs a binary function other than keep"
                + (" and add (final_not_add)" if self.final_not_add else "")
            )

    # ---- identity -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-able fields (lists for the token tuples)."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, fields: dict) -> SearchSpace:
        """The inverse of :meth:`to_dict`."""
        return cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in fields.items()})

    @cached_property
    def hash(self) -> str:
        """sha256 of :data:`SPACE_VERSION` and the sorted-key JSON of :meth:`to_dict`."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(f"{SPACE_VERSION}\n{text}".encode()).hexdigest()

    # ---- positions ----------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens in a rule: 5·groups."""
        return GROUP_LENGTH * self.groups

    @cached_property
    def positions(self) -> tuple[Position, ...]:
        """Every position of the string, in sampling order."""
        vocabulary = {Slot.UNARY1: self.unary, Slot.UNARY2: self.unary, Slot.BINARY: self.binary}
        return tuple(
            Position(
                index=GROUP_LENGTH * (group - 1) + j,
                group=group,
                slot=slot,
                vocabulary=vocabulary.get(slot, self.operands + bank_tokens(group)),
            )
            for group in range(1, self.groups + 1)
            for j, slot in enumerate(SLOTS)
        )

    # ---- masks --------------------------------------------------------------------------
    @property
    def forbids_final_add(self) -> bool:
        """Whether ``final_not_add`` removes a token (only when ``add`` is enabled)."""
        return self.final_not_add and "add" in self.binary

    def batch_mask(self, position: int, prefixes: torch.Tensor) -> torch.Tensor:
        """Allowed tokens at ``position`` for each row of ``prefixes``: a bool tensor
        ``[batch, len(vocabulary)]``. ``prefixes`` is a ``[batch, ≥ position]`` long tensor of
        the vocabulary indices already chosen (only columns < ``position`` are read)."""
        where = self.positions[position]
        allowed = torch.ones(prefixes.shape[0], len(where.vocabulary), dtype=torch.bool)
        if where.slot is Slot.OPERAND2:
            # op1 and op2 of a group share the vocabulary, so op1's index is op2's index too.
            first = prefixes[:, position - 1]
            if self.distinct_operands:
                allowed[torch.arange(len(first)), first] = False
            if self.must_use_bank and where.group >= 2:
                first_is_bank = first >= len(self.operands)
                allowed[:, : len(self.operands)] &= first_is_bank[:, None]
        elif where.slot is Slot.BINARY:
            if where.group == self.groups and self.forbids_final_add:
                allowed[:, where.vocabulary.index("add")] = False
            if self.must_use_bank and where.group >= 2 and "keep" in self.binary:
                # keep drops op2: when op1 is not a bank operand the group would read none.
                first_is_bank = prefixes[:, position - 4] >= len(self.operands)
                allowed[:, where.vocabulary.index("keep")] &= first_is_bank
        return allowed

    def mask(self, position: int, prefix: Sequence[str]) -> torch.Tensor:
        """Allowed tokens at ``position`` after the token strings ``prefix`` (positions
        0 … position − 1): a bool tensor over the position's vocabulary."""
        if len(prefix) != position:
            raise ValueError(f"position {position} needs a prefix of {position} tokens")
        return self.batch_mask(position, self.encode(prefix)[None])[0]

    @cached_property
    def op1_completions(self) -> tuple[torch.Tensor, ...]:
        """For each group, the number of allowed (op2, b) pairs after each op1 (a long tensor
        over op1's vocabulary): op2 and b are constrained by op1 only, independently of each
        other; the unary slots are never constrained."""
        counts = []
        for group in range(1, self.groups + 1):
            first = GROUP_LENGTH * (group - 1)
            size = len(self.positions[first].vocabulary)
            prefixes = torch.zeros(size, first + GROUP_LENGTH - 1, dtype=torch.long)
            prefixes[:, first] = torch.arange(size)
            operand2 = self.batch_mask(first + 1, prefixes).sum(dim=1)
            binary = self.batch_mask(first + GROUP_LENGTH - 1, prefixes).sum(dim=1)
            counts.append(operand2 * binary)
        return tuple(counts)

    # ---- tokens ---------------------------------------------------------------------------
    def encode(self, tokens: Sequence[str]) -> torch.Tensor:
        """Token strings (a prefix or a whole rule) to their per-position vocabulary indices."""
        if len(tokens) > self.length:
            raise ValueError(f"{len(tokens)} tokens for a {self.length}-token space")
        indices = []
        for where, token in zip(self.positions, tokens, strict=False):
            if token not in where.vocabulary:
                raise ValueError(
                    f"{token!r} is not allowed at position {where.index} ({where.slot.value} of "
                    f"group {where.group}); vocabulary: {' '.join(where.vocabulary)}"
                )
            indices.append(where.vocabulary.index(token))
        return torch.tensor(indices, dtype=torch.long)

    def decode(self, indices: Sequence[int] | torch.Tensor) -> list[str]:
        """Per-position vocabulary indices to token strings."""
        return [where.vocabulary[int(i)] for where, i in zip(self.positions, indices, strict=True)]

    def to_dsl(self, tokens: Sequence[str]) -> str:
        """The DSL text of a whole rule, groups joined by ``" ; "`` (as ``Rule.dsl`` prints)."""
        return to_text(
            tokens[start : start + GROUP_LENGTH] for start in range(0, self.length, GROUP_LENGTH)
        )

    def is_valid(self, tokens: Sequence[str]) -> bool:
        """Whether a whole token string is in the space (vocabularies and constraints)."""
        if len(tokens) != self.length:
            return False
        try:
            indices = self.encode(tokens)
        except ValueError:
            return False
        return all(
            bool(self.batch_mask(p, indices[None])[0, indices[p]]) for p in range(self.length)
        )


# --------------------------------------------------------------------------------------------
# Counting and uniform sampling
# --------------------------------------------------------------------------------------------
def size(space: SearchSpace) -> int:
    """The exact number of valid token strings (not of distinct canonical rules).

    Groups are independent, and inside group k only op2 and b depend on op1, so

        size = Π_k  |U|² · Σ_{op1} |allowed op2 | op1| · |allowed b | op1|

    In closed form, with O = |operands|, V_k = O + k − 1 and B_k = |binary| − [k = n,
    final_not_add, add enabled]: without ``must_use_bank`` (or k = 1) the sum is P_k · B_k
    with P_k = V_k² (V_k(V_k − 1) with ``distinct_operands``); with it (k ≥ 2), the k − 1 bank
    op1s allow V_k (V_k − 1) op2s and B_k binaries, the O other op1s allow the k − 1 bank op2s
    and B_k − [keep enabled] binaries.
    """
    total = 1
    for completions in space.op1_completions:
        total *= int(completions.sum()) * len(space.unary) ** 2
    return total


def uniform_sample_indices(
    space: SearchSpace, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """``[batch, length]`` vocabulary indices drawn exactly uniformly over the valid strings.

    Position by position with weights proportional to the number of valid completions: op1 of
    each group is weighted by its number of allowed (op2, b) pairs (:attr:`op1_completions`),
    every other position is uniform over its mask (given op1, nothing else in the group
    constrains it or is constrained by it).
    """
    tokens = torch.zeros(batch, space.length, dtype=torch.long)
    for where in space.positions:
        if where.slot is Slot.OPERAND1:
            weights = space.op1_completions[where.group - 1].expand(batch, -1)
        else:
            weights = space.batch_mask(where.index, tokens)
        tokens[:, where.index] = torch.multinomial(weights.float(), 1, generator=generator)[:, 0]
    return tokens


def uniform_sample(space: SearchSpace, generator: torch.Generator) -> list[str]:
    """One rule's tokens, drawn exactly uniformly over the valid strings of ``space``."""
    return space.decode(uniform_sample_indices(space, 1, generator)[0])


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
_DECAY = tuple(p.token for p in PRIMITIVES if p.needs_total_steps)

SPACES: dict[str, SearchSpace] = {
    # Section 4.1's lists (the arXiv version's, which adds √|x| to the unary functions), without
    # the decay operands; two groups, enough for g·e^{sign(g)·sign(m̂)}.
    "paper": SearchSpace(
        operands=tuple(t for t in OPERANDS if t not in _DECAY), unary=UNARY, binary=BINARY
    ),
    # PowerSign/AddSign (arXiv version): a small operand subset with the decays, three groups,
    # enough for sign_g sign_m id id mul ; o1 ld id id mul ; o2 g exp id mul.
    "paper-decay": SearchSpace(
        operands=("g", "m", "sign_g", "sign_m", "one", "ld", "cd", "rd"),
        unary=("id", "neg", "exp", "sign"),
        binary=BINARY,
        groups=3,
    ),
    # Every token of the table, three groups.
    "full": SearchSpace(operands=OPERANDS, unary=UNARY, binary=BINARY, groups=3),
    # One group over a handful of tokens: enumerable, for demos and tests (Adam: m v id sqrt div).
    "small": SearchSpace(
        operands=("g", "m", "v", "sign_g", "sign_m", "one"),
        unary=("id", "neg", "exp", "sqrt", "sign"),
        binary=BINARY,
        groups=1,
    ),
}


def get_space(name: str, **overrides) -> SearchSpace:
    """A preset of :data:`SPACES`, with fields optionally replaced (e.g. ``groups=3``)."""
    if name not in SPACES:
        raise KeyError(f"unknown search space {name!r}: expected one of {', '.join(SPACES)}")
    return dataclasses.replace(SPACES[name], **overrides)


__all__ = [
    "GROUP_LENGTH",
    "MAX_GROUPS",
    "SPACES",
    "Position",
    "SearchSpace",
    "Slot",
    "bank_tokens",
    "get_space",
    "size",
    "uniform_sample",
    "uniform_sample_indices",
]
