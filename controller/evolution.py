"""Regularized (aging) evolution over a search space's token strings (Real et al. 2019).

With population size P (:data:`POPULATION` = 50) and tournament size S (:data:`TOURNAMENT` = 10):

* **Filling.** While fewer than P rewards have come back, a sample is drawn exactly uniformly
  over the space's valid strings, as :class:`~nos_sym.controller.algorithms.RandomSearch` does.
* **Tournament.** Then every sample is a child: S distinct members are drawn uniformly from the
  population, the one with the highest reward is the parent (the first drawn wins a tie), and
  the child is ``mutate(parent)``. The population does not change inside a batch.
* **Aging.** ``update(samples, rewards)`` appends each (rule, reward) to the population in the
  order ``update`` is called (an asynchronous runner may hand back batches sampled long ago) and
  removes the oldest members beyond P: a member dies of age, never of a low reward.

Mutation keeps a string valid (same masks as the controller, :meth:`SearchSpace.batch_mask`):

* with probability 1 − ρ (ρ = :data:`GROUP_RATE` = 0.2), **one token**: a position p uniform
  among those with another allowed token, the new token uniform among the tokens allowed at p
  after the prefix, except the current one. A later token the change forbids (only op2 reads
  another position, its group's op1) is redrawn uniformly over its mask.
* with probability ρ, **one group** k, uniform in 1 … n. A space has a fixed number of groups n
  (every string has 5·n tokens), so a rule of fewer groups is written with pass-through groups
  ``o_{k−1} x id id keep`` (= o_{k−1}: ``keep`` discards x). *Removing* group k makes it a
  pass-through (possible for k ≥ 2 when ``id`` and ``keep`` are in the space; chosen with
  probability 1/2 then); otherwise group k is redrawn uniformly over its valid completions,
  which *appends* a group when k was a pass-through and replaces it when not. Other groups
  stay valid: a position's vocabulary depends on its group, never on what earlier groups hold.

Dedup: while the child is ``known`` (a predicate on DSL text, e.g. "the store holds its reward
or it was proposed already") or has the parent's canonical key (a no-op mutation, e.g. a token
that ``keep`` discards), the child is mutated again, at most ``max_retries`` (:data:`MAX_RETRIES`
= 10) times; the last child is returned anyway (the runner answers it from its store).

Samples carry log-probabilities and entropies of 0: evolution has no sampling distribution to
correct for. ``state_dict()`` holds the population (tokens, DSL text and rewards, oldest first),
the hyperparameters, the torch generator's state and counters, so a restored algorithm samples
exactly what the saved one would; the ``known`` predicate is not state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import torch

from nos_sym.controller.algorithms import BATCH_SIZE, Algorithm
from nos_sym.controller.policy import Samples
from nos_sym.controller.space import GROUP_LENGTH, SearchSpace, Slot, uniform_sample_indices
from nos_sym.dsl import as_rule

POPULATION = 50
TOURNAMENT = 10
GROUP_RATE = 0.2
MAX_RETRIES = 10


class Member(NamedTuple):
    """A rule of the population with its reward."""

    tokens: torch.Tensor  # [length] long: per-position vocabulary indices
    dsl: str
    reward: float


class RegularizedEvolution(Algorithm):
    """Aging evolution (module docstring): tournaments of ``tournament`` in a population of
    ``population``; children are mutations of the winners, re-mutated while ``known``."""

    name = "evolution"

    def __init__(
        self,
        space: SearchSpace,
        seed: int,
        batch_size: int = BATCH_SIZE,
        population: int = POPULATION,
        tournament: int = TOURNAMENT,
        group_rate: float = GROUP_RATE,
        max_retries: int = MAX_RETRIES,
        known: Callable[[str], bool] | None = None,
    ):
        super().__init__(space, seed, batch_size)
        if not 1 <= tournament <= population:
            raise ValueError(
                f"evolution needs 1 ≤ tournament ≤ population, got tournament {tournament} "
                f"and population {population}"
            )
        if not 0.0 <= group_rate <= 1.0:
            raise ValueError(f"group_rate must be in [0, 1], got {group_rate}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be ≥ 0, got {max_retries}")
        self.tournament = tournament
        self.group_rate = group_rate
        self.max_retries = max_retries
        self.known = known
        self.members: deque[Member] = deque(maxlen=population)
        self.remutations = 0

    # ---- sampling -----------------------------------------------------------------------
    def _sample(self, batch: int) -> Samples:
        if len(self.members) < self.members.maxlen:
            tokens = uniform_sample_indices(self.space, batch, self.generator)
        else:
            tokens = torch.stack([self._child(self._select()) for _ in range(batch)])
        dsl = [self._dsl(row) for row in tokens]
        return Samples(tokens, dsl, torch.zeros(batch), torch.zeros(batch))

    def _dsl(self, tokens: torch.Tensor) -> str:
        return self.space.to_dsl(self.space.decode(tokens))

    def _select(self) -> Member:
        """The best of ``tournament`` distinct members drawn uniformly (first drawn wins ties)."""
        drawn = torch.randperm(len(self.members), generator=self.generator)[: self.tournament]
        return max((self.members[i] for i in drawn.tolist()), key=lambda m: m.reward)

    def _child(self, parent: Member) -> torch.Tensor:
        """``mutate(parent)``, mutated again while known or equal to the parent (up to
        ``max_retries`` times)."""
        parent_key = as_rule(parent.dsl).key
        child = self.mutate(parent.tokens)
        for _ in range(self.max_retries):
            dsl = self._dsl(child)
            if not (as_rule(dsl).key == parent_key or (self.known is not None and self.known(dsl))):
                break
            self.remutations += 1
            child = self.mutate(child)
        return child

    def _draw(self, weights: torch.Tensor) -> int:
        return int(torch.multinomial(weights.float(), 1, generator=self.generator))

    # ---- mutation -----------------------------------------------------------------------
    def mutate(self, tokens: torch.Tensor) -> torch.Tensor:
        """A valid string one token or one group away from the valid string ``tokens``."""
        tokens = tokens.clone()
        allowed = [self.space.batch_mask(p, tokens[None])[0] for p in range(self.space.length)]
        mutable = torch.tensor([int(mask.sum()) >= 2 for mask in allowed])
        if not mutable.any() or float(torch.rand((), generator=self.generator)) < self.group_rate:
            return self._mutate_group(tokens)
        position = self._draw(mutable)
        others = allowed[position].clone()
        others[tokens[position]] = False
        tokens[position] = self._draw(others)
        self._repair(tokens, position + 1)
        return tokens

    def _repair(self, tokens: torch.Tensor, start: int) -> None:
        """Redraw, uniformly over its mask, every token from ``start`` on that is not allowed."""
        for position in range(start, self.space.length):
            mask = self.space.batch_mask(position, tokens[None])[0]
            if not mask[tokens[position]]:
                tokens[position] = self._draw(mask)

    def _mutate_group(self, tokens: torch.Tensor) -> torch.Tensor:
        """Remove (make a pass-through) or redraw a uniformly chosen group (module docstring)."""
        group = int(torch.randint(self.space.groups, (), generator=self.generator)) + 1
        start = GROUP_LENGTH * (group - 1)
        removable = self._can_pass_through(group) and not self._is_pass_through(tokens, group)
        if removable and float(torch.rand((), generator=self.generator)) < 0.5:
            return self._pass_through(tokens, group)
        # Groups are independent, so group k of a uniform string is uniform over group k's
        # valid completions.
        drawn = uniform_sample_indices(self.space, 1, self.generator)[0]
        tokens[start : start + GROUP_LENGTH] = drawn[start : start + GROUP_LENGTH]
        return tokens

    def _can_pass_through(self, group: int) -> bool:
        return group >= 2 and "id" in self.space.unary and "keep" in self.space.binary

    def _is_pass_through(self, tokens: torch.Tensor, group: int) -> bool:
        op1, _, u1, _, binary = self.space.decode(tokens)[
            GROUP_LENGTH * (group - 1) : GROUP_LENGTH * group
        ]
        return (op1, u1, binary) == (f"o{group - 1}", "id", "keep")

    def _pass_through(self, tokens: torch.Tensor, group: int) -> torch.Tensor:
        """Group k becomes ``o_{k−1} x id id keep`` with x the first operand allowed after
        o_{k−1}: its value is o_{k−1}, as if group k were removed."""
        for where in self.space.positions[GROUP_LENGTH * (group - 1) : GROUP_LENGTH * group]:
            if where.slot is Slot.OPERAND1:
                tokens[where.index] = where.vocabulary.index(f"o{group - 1}")
            elif where.slot is Slot.OPERAND2:
                mask = self.space.batch_mask(where.index, tokens[None])[0]
                tokens[where.index] = int(mask.nonzero()[0])
            else:
                token = "keep" if where.slot is Slot.BINARY else "id"
                tokens[where.index] = where.vocabulary.index(token)
        return tokens

    # ---- learning -----------------------------------------------------------------------
    def _update(self, samples: Samples, rewards: torch.Tensor) -> dict:
        for tokens, dsl, reward in zip(samples.tokens, samples.dsl, rewards.tolist(), strict=True):
            self.members.append(Member(tokens.clone(), dsl, reward))  # the oldest drops out
        population_rewards = [member.reward for member in self.members]
        return {
            "population": len(self.members),
            "population_best": max(population_rewards),
            "population_mean": sum(population_rewards) / len(population_rewards),
            "remutations": self.remutations,
        }

    def state_dict(self) -> dict:
        members = list(self.members)
        return super().state_dict() | {
            "population": self.members.maxlen,
            "tournament": self.tournament,
            "group_rate": self.group_rate,
            "max_retries": self.max_retries,
            "remutations": self.remutations,
            "members": {
                "tokens": torch.stack([m.tokens for m in members])
                if members
                else torch.zeros(0, self.space.length, dtype=torch.long),
                "dsl": [m.dsl for m in members],
                "rewards": [m.reward for m in members],
            },
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.tournament = state["tournament"]
        self.group_rate = state["group_rate"]
        self.max_retries = state["max_retries"]
        self.remutations = state["remutations"]
        members = state["members"]
        self.members = deque(
            (
                Member(tokens.clone(), dsl, reward)
                for tokens, dsl, reward in zip(
                    members["tokens"], members["dsl"], members["rewards"], strict=True
                )
            ),
            maxlen=state["population"],
        )


__all__ = [
    "GROUP_RATE",
    "MAX_RETRIES",
    "POPULATION",
    "TOURNAMENT",
    "Member",
    "RegularizedEvolution",
]
