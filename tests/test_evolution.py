"""nos_sym.controller.evolution: regularized evolution's samples stay in the space, its state
round-trips, it beats random search on toy rewards, and its dedup re-mutates known children."""

from __future__ import annotations

import io

import pytest
import torch

from nos_sym.controller import SPACES, Samples, get_space, make_algorithm
from nos_sym.controller.evolution import POPULATION, TOURNAMENT, RegularizedEvolution
from nos_sym.controller.space import Slot
from nos_sym.dsl import as_rule, parse

POWERSIGN = "sign_g sign_m id id mul ; o1 g exp id mul"


def rule_samples(space, rules: list[str]) -> Samples:
    """Samples of given DSL rules (as an algorithm would have returned them)."""
    tokens = torch.stack([space.encode(rule.replace(";", " ").split()) for rule in rules])
    return Samples(tokens, list(rules), torch.zeros(len(rules)), torch.zeros(len(rules)))


def evolution_of(space, parent: str, **hyperparameters) -> RegularizedEvolution:
    """An algorithm whose whole population is ``parent``: every sample is a child of it."""
    algorithm = make_algorithm("evolution", space, 0, population=1, tournament=1, **hyperparameters)
    algorithm.update(rule_samples(space, [parent]), [1.0])
    return algorithm


def matches(target: torch.Tensor):
    """Toy reward: the fraction of positions whose token is the target's."""
    return lambda samples: (samples.tokens == target).float().mean(dim=1)


def first_hit(name: str, space, target: str, threshold: float, budget: int, seed: int):
    """How many samples ``name`` needs until one scores ≥ threshold (None: not within budget)."""
    reward = matches(space.encode(target.replace(";", " ").split()))
    hyperparameters = {"population": 20, "tournament": 5} if name == "evolution" else {}
    algorithm = make_algorithm(name, space, seed, batch_size=5, **hyperparameters)
    for step in range(1, budget // 5 + 1):
        samples = algorithm.sample()
        rewards = reward(samples)
        algorithm.update(samples, rewards)
        if float(rewards.max()) >= threshold:
            return 5 * step
    return None


# --------------------------------------------------------------------------------------------
# Validity and mutations
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPACES))
def test_every_sample_is_valid(name):
    space = get_space(name)
    algorithm = make_algorithm(
        "evolution", space, seed=3, population=8, tournament=3, group_rate=0.5
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):  # 2 batches fill the population, 10 are children
        samples = algorithm.sample(4)
        for tokens, dsl in zip(samples.tokens, samples.dsl, strict=True):
            assert space.is_valid(space.decode(tokens)), dsl
            assert dsl == space.to_dsl(space.decode(tokens)) == parse(dsl).dsl
        assert not samples.log_probs.any() and not samples.entropies.any()
        algorithm.update(samples, torch.rand(4, generator=generator))
    assert len(algorithm.members) == 8


@pytest.mark.parametrize("name", list(SPACES))
def test_a_token_mutation_changes_one_token_and_repairs_only_its_own_group(name):
    space = get_space(name)
    algorithm = make_algorithm("evolution", space, seed=1, group_rate=0.0)
    for parent in algorithm.sample(40).tokens:
        child = algorithm.mutate(parent)
        assert space.is_valid(space.decode(child))
        changed = (child != parent).nonzero()[:, 0].tolist()
        assert 1 <= len(changed) <= 3, changed
        if len(changed) > 1:  # op1 changed and forbade op2 and/or the binary, which were redrawn
            first, *repaired = (space.positions[p] for p in changed)
            assert first.slot == Slot.OPERAND1
            assert {p.slot for p in repaired} <= {Slot.OPERAND2, Slot.BINARY}
            assert all(p.group == first.group for p in repaired)


def test_a_group_mutation_removes_or_redraws_one_group():
    space = get_space("paper")
    algorithm = make_algorithm("evolution", space, seed=0, group_rate=1.0)
    parent = space.encode(POWERSIGN.replace(";", " ").split())
    removed = 0
    for _ in range(60):
        child = algorithm.mutate(parent)
        assert space.is_valid(space.decode(child))
        groups = {space.positions[p].group for p in (child != parent).nonzero()[:, 0].tolist()}
        assert len(groups) <= 1
        op1, _, u1, _, binary = space.decode(child)[5:]
        if (op1, u1, binary) == ("o1", "id", "keep"):  # group 2 removed: group 1 alone is left
            removed += 1
            dsl = space.to_dsl(space.decode(child))
            assert as_rule(dsl).key == parse("sign_g sign_m id id mul").key
            appended = algorithm.mutate(child)  # a pass-through can only be redrawn
            assert space.is_valid(space.decode(appended))
    assert 10 < removed < 50


# --------------------------------------------------------------------------------------------
# Population, tournaments, aging
# --------------------------------------------------------------------------------------------
def test_defaults_and_bad_hyperparameters():
    algorithm = make_algorithm("evolution", "paper", seed=0, population=50, tournament=10)
    assert isinstance(algorithm, RegularizedEvolution) and algorithm.name == "evolution"
    assert (algorithm.members.maxlen, algorithm.tournament) == (POPULATION, TOURNAMENT) == (50, 10)
    for hyperparameters, message in (
        ({"population": 5, "tournament": 6}, "tournament ≤ population"),
        ({"tournament": 0}, "tournament ≤ population"),
        ({"group_rate": 1.5}, "group_rate"),
        ({"max_retries": -1}, "max_retries"),
    ):
        with pytest.raises(ValueError, match=message):
            make_algorithm("evolution", "paper", seed=0, **hyperparameters)


def test_uniform_until_full_then_rewards_join_in_update_order_and_the_oldest_dies():
    space = get_space("small")
    algorithm = make_algorithm("evolution", space, seed=0, population=3, tournament=3)
    random = make_algorithm("random", space, seed=0)
    early, late = algorithm.sample(2), algorithm.sample(2)  # both drawn while filling
    assert early.dsl + late.dsl == random.sample(2).dsl + random.sample(2).dsl
    algorithm.update(late, [0.1, 0.2])  # the later batch comes back first
    stats = algorithm.update(early, [0.3, 0.4])
    assert [m.dsl for m in algorithm.members] == late.dsl[1:] + early.dsl
    assert [m.reward for m in algorithm.members] == pytest.approx([0.2, 0.3, 0.4])
    assert stats["population"] == 3 and stats["population_best"] == pytest.approx(0.4)


def test_the_tournament_winner_is_the_parent():
    space = get_space("small")
    rules = ["m v id sqrt div", "g m id id add", "sign_g sign_m id id mul", "g one id id mul"]
    algorithm = make_algorithm(
        "evolution", space, seed=0, population=4, tournament=4, group_rate=0.0, max_retries=0
    )
    algorithm.update(rule_samples(space, rules), [0.1, 0.9, 0.5, 0.9])  # a tie: first drawn
    best = {rule_samples(space, [rules[1]]).tokens[0], rule_samples(space, [rules[3]]).tokens[0]}
    for child in algorithm.sample(30).tokens:
        assert min(int((child != parent).sum()) for parent in best) in (1, 2)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup", [1, 6])  # still filling; population full (children)
def test_state_dict_round_trip_reproduces_the_next_samples(warmup):
    space = get_space("paper")
    reward = matches(space.encode(POWERSIGN.replace(";", " ").split()))

    def make(seed):
        return make_algorithm("evolution", space, seed, population=10, tournament=4)

    algorithm = make(7)
    algorithm.known = lambda dsl: dsl.startswith("g")  # not state: set again after loading
    for _ in range(warmup):
        samples = algorithm.sample()
        algorithm.update(samples, reward(samples))
    buffer = io.BytesIO()
    torch.save(algorithm.state_dict(), buffer)
    buffer.seek(0)
    restored = make(123)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    restored.known = algorithm.known
    for _ in range(4):
        expected, got = algorithm.sample(), restored.sample()
        assert torch.equal(expected.tokens, got.tokens) and expected.dsl == got.dsl
        assert algorithm.update(expected, reward(expected)) == restored.update(got, reward(got))
    for a, b in zip(algorithm.members, restored.members, strict=True):
        assert torch.equal(a.tokens, b.tokens) and (a.dsl, a.reward) == (b.dsl, b.reward)


# --------------------------------------------------------------------------------------------
# Search quality: a seeded comparison with random search
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("space", "target", "threshold", "budget"),
    [
        ("paper", POWERSIGN, 0.8, 500),  # 8 of 10 tokens right
        ("small", "m v id sqrt div", 1.0, 200),  # Adam itself, among 3000 strings
    ],
)
@pytest.mark.parametrize("seed", range(5))
def test_evolution_reaches_the_target_before_random_search(space, target, threshold, budget, seed):
    space = get_space(space)
    evolution = first_hit("evolution", space, target, threshold, budget, seed)
    random = first_hit("random", space, target, threshold, budget, seed)
    assert evolution is not None and (random is None or evolution < random), (evolution, random)


# --------------------------------------------------------------------------------------------
# Dedup
# --------------------------------------------------------------------------------------------
class Recorder:
    """A ``known`` predicate that answers True ``known`` times, then False; records its calls."""

    def __init__(self, known: int):
        self.known, self.calls = known, []

    def __call__(self, dsl: str) -> bool:
        self.calls.append(dsl)
        return len(self.calls) <= self.known


@pytest.mark.parametrize(
    ("answers_known", "max_retries", "calls", "remutations"),
    [
        (0, 10, 1, 0),  # a new child is kept at once
        (2, 10, 3, 2),  # two known children, the third is new
        (100, 3, 3, 3),  # always known: 3 re-mutations, the last child is returned anyway
        (100, 0, 0, 0),  # no retries: the predicate is not even asked
    ],
)
def test_known_children_are_mutated_again_up_to_the_limit(
    answers_known, max_retries, calls, remutations
):
    space = get_space("paper")
    known = Recorder(answers_known)
    algorithm = evolution_of(space, POWERSIGN, known=known, max_retries=max_retries)
    child = algorithm.sample(1)
    assert len(known.calls) == calls and algorithm.remutations == remutations
    if known.calls and answers_known < max_retries:
        assert known.calls[-1] == child.dsl[0]  # the first child not known is returned
    assert "known" not in algorithm.state_dict()


def test_children_equal_to_their_parent_are_mutated_again():
    space = get_space("paper")
    parent = "m g id id keep ; o1 sign_g exp id keep"  # op2, u2 are dead: many no-op mutations
    key = as_rule(parent).key
    retried = evolution_of(space, parent, max_retries=10)
    assert all(as_rule(dsl).key != key for dsl in retried.sample(40).dsl)
    assert retried.remutations > 0
    unchecked = evolution_of(space, parent, max_retries=0)
    assert any(as_rule(dsl).key == key for dsl in unchecked.sample(40).dsl)
