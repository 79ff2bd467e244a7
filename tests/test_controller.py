"""nos_sym.controller: search spaces (masks, sizes, uniform sampling), the LSTM policy, and the
TRPO / REINFORCE / random algorithms (toy rewards, state round trips)."""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nos_sym
from nos_sym import primitives
from nos_sym.controller import (
    SPACES,
    Policy,
    Samples,
    SearchSpace,
    get_space,
    make_algorithm,
    size,
    uniform_sample,
    uniform_sample_indices,
)
from nos_sym.controller.algorithms import EMABaseline, conjugate_gradient, single_threaded
from nos_sym.controller.policy import kl_divergence
from nos_sym.controller.space import Slot

SWITCHES = ("distinct_operands", "final_not_add", "must_use_bank")
PAPER_HASH = "b9e5eed8116c0247f1aeea5bfee9ab501e7279a38df6aba0ffac01a97ffd837a"


# --------------------------------------------------------------------------------------------
# An independent statement of the constraints (from docs/dsl.md and the paper, not from the masks)
# --------------------------------------------------------------------------------------------
def is_bank(token: str) -> bool:
    return token[0] == "o" and token[1:].isdigit()


def violations(space: SearchSpace, tokens: list[str]) -> list[str]:
    """Everything wrong with a token string for ``space``, checked group by group."""
    problems = []
    if len(tokens) != 5 * space.groups:
        return [f"length {len(tokens)}"]
    for k in range(1, space.groups + 1):
        op1, op2, u1, u2, b = tokens[5 * (k - 1) : 5 * k]
        readable = set(space.operands) | {f"o{j}" for j in range(1, k)}
        if op1 not in readable or op2 not in readable:
            problems.append(f"group {k}: operand outside {sorted(readable)}")
        if u1 not in space.unary or u2 not in space.unary or b not in space.binary:
            problems.append(f"group {k}: function outside the space")
        if space.distinct_operands and op1 == op2:
            problems.append(f"group {k}: equal operands")
        reads = (op1,) if b == "keep" else (op1, op2)  # keep drops its right side
        if space.must_use_bank and k >= 2 and not any(map(is_bank, reads)):
            problems.append(f"group {k}: reads no bank operand")
        if space.final_not_add and k == space.groups and b == "add":
            problems.append("final add")
    return problems


def closed_form_size(space: SearchSpace) -> int:
    n_operands, total = len(space.operands), 1
    for k in range(1, space.groups + 1):
        vocabulary = n_operands + k - 1
        op2 = vocabulary - 1 if space.distinct_operands else vocabulary
        binary = len(space.binary) - (
            k == space.groups and space.final_not_add and "add" in space.binary
        )
        if space.must_use_bank and k >= 2:
            # k − 1 bank op1s: free op2 and b; O other op1s: a bank op2 and b ≠ keep
            group = (k - 1) * op2 * binary + n_operands * (k - 1) * (
                binary - ("keep" in space.binary)
            )
        else:
            group = vocabulary * op2 * binary
        total *= group * len(space.unary) ** 2
    return total


def tiny_spaces() -> list[SearchSpace]:
    """Small enough to enumerate every string, every constraint combination, 1–3 groups."""
    spaces = []
    for groups, operands, binary in [
        (1, ("g", "m", "one"), ("add", "mul", "keep")),
        (2, ("g", "m", "one"), ("add", "sub", "keep")),
        (2, ("g", "sign_m"), ("sub", "div")),
        (3, ("g", "m"), ("add", "mul")),
    ]:
        for switches in itertools.product((False, True), repeat=3):
            spaces.append(
                SearchSpace(
                    operands, ("id",), binary, groups, **dict(zip(SWITCHES, switches, strict=True))
                )
            )
    return spaces


def every_string(space: SearchSpace):
    return itertools.product(*(where.vocabulary for where in space.positions))


def strings_through_masks(space: SearchSpace, prefix: tuple[str, ...] = ()):
    """Depth-first over the masks: every string the controller can emit."""
    if len(prefix) == space.length:
        yield prefix
        return
    allowed = space.mask(len(prefix), list(prefix))
    for token, ok in zip(space.positions[len(prefix)].vocabulary, allowed.tolist(), strict=True):
        if ok:
            yield from strings_through_masks(space, (*prefix, token))


@pytest.fixture(autouse=True)
def one_thread():
    """As the algorithms run the controller (tiny tensors: see ``single_threaded``)."""
    with single_threaded():
        yield


ALL_SPACES = [get_space(name, groups=groups) for name in SPACES for groups in (1, 2, 3)]
SPACE_IDS = [f"{name}-{groups}" for name in SPACES for groups in (1, 2, 3)]


# --------------------------------------------------------------------------------------------
# Search spaces
# --------------------------------------------------------------------------------------------
def test_presets_come_from_the_primitives_table():
    full = SPACES["full"]
    assert full.operands == primitives.OPERANDS
    assert full.unary == primitives.UNARY
    assert full.binary == primitives.BINARY
    decay = {p.token for p in primitives.PRIMITIVES if p.needs_total_steps}
    assert set(SPACES["paper"].operands) == set(primitives.OPERANDS) - decay
    assert {"ld", "cd", "rd"} <= set(SPACES["paper-decay"].operands)
    for name, space in SPACES.items():
        assert get_space(name) == space
        assert all(getattr(space, switch) for switch in SWITCHES), "paper defaults: all on"
    with pytest.raises(KeyError, match="unknown search space"):
        get_space("nope")


def test_preset_sizes():
    sizes = {name: size(space) for name, space in SPACES.items()}
    assert sizes == {
        "paper": 2_786_918_400,
        "paper-decay": 9_909_043_200,
        "full": 294_107_480_064_000,
        "small": 3_000,
    }
    for space in ALL_SPACES:
        assert size(space) == closed_form_size(space)


@pytest.mark.parametrize("space", tiny_spaces(), ids=str)
def test_size_matches_brute_force_enumeration(space):
    valid = {tokens for tokens in every_string(space) if not violations(space, list(tokens))}
    assert size(space) == len(valid) == closed_form_size(space)
    assert set(strings_through_masks(space)) == valid
    assert all(space.is_valid(list(tokens)) for tokens in valid)
    invalid = [tokens for tokens in every_string(space) if tokens not in valid]
    assert not any(space.is_valid(list(tokens)) for tokens in invalid)


def test_positions_vocabularies_and_hash():
    space = get_space("paper-decay")
    assert space.length == 15 == len(space.positions)
    group3 = space.positions[10:15]
    assert [where.slot for where in group3] == list(Slot)
    assert group3[0].vocabulary == space.operands + ("o1", "o2")
    assert group3[2].vocabulary == space.unary and group3[4].vocabulary == space.binary
    shuffled = SearchSpace(tuple(reversed(space.operands)), space.unary, space.binary, 3)
    assert shuffled == space and shuffled.hash == space.hash
    assert SearchSpace.from_dict(space.to_dict()) == space
    assert get_space("paper-decay", groups=2).hash != space.hash
    assert SPACES["paper"].hash == PAPER_HASH  # stable across runs and refactors


@pytest.mark.parametrize(
    ("second_group", "valid"),
    [
        ("o1 g id id keep", True),  # reads o1
        ("g o1 id id add", True),  # reads o1
        ("g o1 id id keep", False),  # keep drops o1: reads only g
        ("g m id id keep", False),
    ],
)
def test_must_use_bank_is_judged_on_what_a_group_reads(second_group, valid):
    space = SearchSpace(("g", "m"), ("id",), ("add", "mul", "keep"), groups=2, final_not_add=False)
    tokens = ["g", "m", "id", "id", "add", *second_group.split()]
    assert space.is_valid(tokens) is valid
    binary = space.mask(9, tokens[:9])
    assert bool(binary[space.positions[9].vocabulary.index("keep")]) is (tokens[5] == "o1")
    unconstrained = dataclasses.replace(space, must_use_bank=False)
    assert unconstrained.is_valid(tokens)


def test_masks_on_examples():
    space = SearchSpace(("g", "m", "v"), ("id", "exp"), ("add", "mul"), groups=2)
    assert space.mask(1, ["g"]).tolist() == [False, True, True]
    assert space.mask(6, ["g", "m", "id", "id", "add", "o1"]).tolist() == [True, True, True, False]
    # must_use_bank: op1 is not o1, so op2 must be o1.
    assert space.mask(6, ["g", "m", "id", "id", "add", "g"]).tolist() == [False, False, False, True]
    assert space.mask(4, ["g", "m", "id", "id"]).tolist() == [True, True]  # add ok: not final
    final_binary = space.mask(9, ["g", "m", "id", "id", "add", "o1", "g", "id", "id"])
    assert final_binary.tolist() == [False, True]
    with pytest.raises(ValueError, match="prefix"):
        space.mask(2, ["g"])
    with pytest.raises(ValueError, match="not allowed at position 0"):
        space.mask(1, ["o1"])


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(operands=("g",), unary=("id",), binary=("mul",)), "two operands"),
        (dict(operands=("g", "m"), unary=("id",), binary=("add",)), "other than add"),
        (dict(operands=("g", "m"), unary=("id",), binary=("mul",), groups=4), "groups"),
        (dict(operands=("g", "exp"), unary=("id",), binary=("mul",)), "not operand"),
        (dict(operands=("g", "o1"), unary=("id",), binary=("mul",)), "not operand"),
        (dict(operands=("g", "g"), unary=("id",), binary=("mul",)), "duplicate"),
        (dict(operands=("g", "m"), unary=(), binary=("mul",)), "at least one"),
        (dict(operands=("g", "m"), unary=("id",), binary=("keep",), groups=2), "other than keep"),
        (
            dict(operands=("g", "m"), unary=("id",), binary=("add", "keep"), groups=2),
            "other than keep and add",
        ),
    ],
)
def test_invalid_spaces_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace(**fields)


@st.composite
def search_spaces(draw):
    def subset(tokens):
        return tuple(draw(st.lists(st.sampled_from(tokens), min_size=1, unique=True)))

    fields = dict(
        operands=subset(primitives.OPERANDS),
        unary=subset(primitives.UNARY),
        binary=subset(primitives.BINARY),
        groups=draw(st.integers(1, 3)),
        **{switch: draw(st.booleans()) for switch in SWITCHES},
    )
    try:
        return SearchSpace(**fields)
    except ValueError:
        # Refused exactly when a constraint could empty a mask.
        final_forbidden = {"keep"} | ({"add"} if fields["final_not_add"] else set())
        assert (
            (fields["distinct_operands"] and len(fields["operands"]) < 2)
            or (fields["final_not_add"] and fields["binary"] == ("add",))
            or (
                fields["must_use_bank"]
                and fields["groups"] >= 2
                and set(fields["binary"]) <= final_forbidden
            )
        )
        return None


@settings(max_examples=150, deadline=None)
@given(search_spaces())
def test_no_mask_is_ever_empty(space):
    """Every accepted space: for every op1 of every group, op2 and b have a choice, and every
    other position has one whatever the prefix (only op2 and b read the prefix: op1)."""
    if space is None:
        return
    for where in space.positions:
        prefixes = torch.zeros(1, where.index, dtype=torch.long)
        if where.slot in (Slot.OPERAND2, Slot.BINARY):
            first = where.index - (1 if where.slot is Slot.OPERAND2 else 4)
            n = len(space.positions[first].vocabulary)
            prefixes = torch.zeros(n, where.index, dtype=torch.long)
            prefixes[:, first] = torch.arange(n)
        assert space.batch_mask(where.index, prefixes).any(dim=1).all()
    assert size(space) == closed_form_size(space) > 0


def test_uniform_sampler_is_exactly_uniform_over_rules():
    # 72 strings; op1 = o1 leaves 3 choices of op2, op1 ∈ {g, m, one} only 1 (must_use_bank),
    # so a per-position uniform sampler would be far from uniform here.
    space = SearchSpace(("g", "m", "one"), ("id",), ("add", "mul"), groups=2)
    assert size(space) == 72
    draws = uniform_sample_indices(space, 36_000, torch.Generator().manual_seed(0))
    counts = collections.Counter(map(tuple, draws.tolist()))
    assert len(counts) == 72
    expected = 36_000 / 72
    chi_square = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi_square < 125  # 71 degrees of freedom: P(χ² > 125) ≈ 1e-4


@pytest.mark.parametrize("space", ALL_SPACES, ids=SPACE_IDS)
def test_uniform_sampler_reaches_every_allowed_token(space):
    tokens = uniform_sample_indices(space, 3000, torch.Generator().manual_seed(1))
    for where in space.positions:
        seen = set(tokens[:, where.index].tolist())
        never_allowed = where.slot is Slot.BINARY and where.group == space.groups
        expected = {
            i
            for i, token in enumerate(where.vocabulary)
            if not (never_allowed and space.final_not_add and token == "add")
        }
        assert seen == expected, (where, seen ^ expected)
    for row in tokens[:300]:
        assert not violations(space, space.decode(row))


def test_uniform_sample_one_rule():
    space = get_space("paper")
    rule = uniform_sample(space, torch.Generator().manual_seed(3))
    assert len(rule) == 10 and space.is_valid(rule) and not violations(space, rule)
    again = uniform_sample(space, torch.Generator().manual_seed(3))
    assert rule == again


@pytest.mark.parametrize("space", ALL_SPACES, ids=SPACE_IDS)
def test_sampled_strings_parse_and_obey_the_constraints(space):
    generator = torch.Generator().manual_seed(2)
    policy = Policy(space, generator)
    samples = policy.sample(800, generator)
    uniform = uniform_sample_indices(space, 800, generator)
    dsl = samples.dsl + [space.to_dsl(space.decode(row)) for row in uniform]
    for text, row in zip(dsl, torch.cat([samples.tokens, uniform]), strict=True):
        tokens = space.decode(row)
        assert text == space.to_dsl(tokens)
        assert not violations(space, tokens), (text, violations(space, tokens))
    for text in dsl[::8]:  # the grammar and the canonicalizer (200 per space)
        assert nos_sym.parse(text).dsl == text


# --------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------
def test_policy_shape_and_initialisation():
    space = get_space("paper")
    policy = Policy(space, torch.Generator().manual_seed(0))
    assert policy.lstm.hidden_size == 150 and policy.lstm.num_layers == 1
    assert [head.out_features for head in policy.heads] == [16, 16, 12, 12, 5, 17, 17, 12, 12, 5]
    for parameter in policy.parameters():
        assert parameter.abs().max() <= 0.08
        assert parameter.std() > 0.03  # U(−0.08, 0.08) has std 0.046


def test_policy_log_probs_entropies_and_determinism():
    space = get_space("paper-decay")
    policy = Policy(space, torch.Generator().manual_seed(0))
    samples = policy.sample(64, torch.Generator().manual_seed(1))
    assert samples.tokens.shape == (64, 15) and len(samples) == 64
    torch.testing.assert_close(policy.log_prob(samples.tokens), samples.log_probs)
    torch.testing.assert_close(policy.entropy(samples.tokens), samples.entropies)
    assert (samples.log_probs < 0).all() and (samples.entropies > 0).all()
    again = Policy(space, torch.Generator().manual_seed(0)).sample(
        64, torch.Generator().manual_seed(1)
    )
    assert torch.equal(again.tokens, samples.tokens) and again.dsl == samples.dsl
    # −∞ logits of forbidden tokens give no NaN gradient.
    (policy.log_prob(samples.tokens).sum() + policy.entropy(samples.tokens).sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters())


def test_policy_distributions_sum_to_one_and_respect_masks():
    space = get_space("small", groups=2)
    policy = Policy(space, torch.Generator().manual_seed(0))
    tokens = policy.sample(32, torch.Generator().manual_seed(0)).tokens
    log_pi = policy.distributions(tokens).detach()
    torch.testing.assert_close(log_pi.exp().sum(dim=2), torch.ones(32, space.length))
    for where in space.positions:
        allowed = space.batch_mask(where.index, tokens)
        forbidden = ~allowed
        assert torch.isneginf(log_pi[:, where.index, : allowed.shape[1]][forbidden]).all()
        assert torch.isfinite(log_pi[:, where.index, : allowed.shape[1]][allowed]).all()
    assert float(kl_divergence(log_pi, log_pi).abs().max()) == 0.0


def test_samples_subset_cat_and_state():
    space = get_space("small")
    policy = Policy(space, torch.Generator().manual_seed(0))
    samples = policy.sample(6, torch.Generator().manual_seed(0))
    part = samples.subset([4, 1])
    assert part.dsl == [samples.dsl[4], samples.dsl[1]]
    assert torch.equal(part.log_probs, samples.log_probs[[4, 1]])
    whole = Samples.cat([samples.subset([0, 1, 2]), samples.subset([3, 4, 5])])
    assert whole.dsl == samples.dsl and torch.equal(whole.tokens, samples.tokens)
    buffer = io.BytesIO()
    torch.save(samples.state_dict(), buffer)
    buffer.seek(0)
    loaded = Samples.from_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.dsl == samples.dsl and torch.equal(loaded.entropies, samples.entropies)


# --------------------------------------------------------------------------------------------
# Algorithms
# --------------------------------------------------------------------------------------------
def first_token_is_g(samples: Samples) -> torch.Tensor:
    return torch.tensor([float(text.split()[0] == "g") for text in samples.dsl])


def probability_of_first_g(policy: Policy) -> float:
    """π(a_0 = g): exact, from the first head (position 0 reads no previous token)."""
    tokens = torch.zeros(1, policy.space.length, dtype=torch.long)
    assert policy.space.positions[0].vocabulary[0] == "g"
    with torch.no_grad():
        return float(policy.distributions(tokens)[0, 0, 0].exp())


def test_ema_baseline():
    baseline = EMABaseline(decay=0.5)
    torch.testing.assert_close(
        baseline.advantages(torch.tensor([1.0, 3.0])), torch.tensor([-1.0, 1.0])
    )
    assert baseline.value == pytest.approx(0.5 * (0.5 * 2 + 0.5 * 1) + 0.5 * 3)
    assert baseline.advantages(torch.tensor([0.0])).item() == pytest.approx(-2.25)


def test_conjugate_gradient_solves_a_spd_system():
    a = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(conjugate_gradient(lambda v: a @ v, b, 10), torch.linalg.solve(a, b))


def test_trpo_step_stays_in_the_trust_region_and_improves_the_surrogate():
    algorithm = make_algorithm("trpo", "paper", seed=0, batch_size=20)
    stale = algorithm.sample()  # folded in last, after two newer batches: ratios ≠ 1
    for samples in [algorithm.sample(), algorithm.sample(), stale]:
        rewards = first_token_is_g(samples)
        before_log_pi = algorithm.policy.distributions(samples.tokens).detach()
        baseline = algorithm.baseline.value
        advantages = rewards - (rewards.mean() if baseline is None else baseline)
        with torch.no_grad():
            before, _ = algorithm.surrogate(samples, advantages)
        stats = algorithm.update(samples, rewards)
        with torch.no_grad():
            after, after_log_pi = algorithm.surrogate(samples, advantages)
        kl = float(kl_divergence(before_log_pi, after_log_pi).sum(dim=1).mean())
        assert stats["step_fraction"] > 0, stats
        assert 0 < kl <= algorithm.max_kl
        assert kl == pytest.approx(stats["kl"], rel=1e-4)
        assert float(after) > float(before)
        assert stats["surrogate"] == pytest.approx(float(after), rel=1e-5)


def test_trpo_learns_a_toy_reward():
    algorithm = make_algorithm("trpo", "small", seed=0, batch_size=10)
    start = probability_of_first_g(algorithm.policy)
    for _ in range(15):
        samples = algorithm.sample()
        algorithm.update(samples, first_token_is_g(samples))
    assert probability_of_first_g(algorithm.policy) > max(0.5, 3 * start)


def test_reinforce_increases_the_probability_of_a_rewarded_token():
    algorithm = make_algorithm("reinforce", "small", seed=0)  # the paper's lr 1e-5, batch 5
    assert algorithm.optimizer.param_groups[0]["lr"] == 1e-5 and algorithm.batch_size == 5
    probabilities = [probability_of_first_g(algorithm.policy)]
    for update in range(1, 301):
        samples = algorithm.sample()
        algorithm.update(samples, first_token_is_g(samples))
        if update % 100 == 0:
            probabilities.append(probability_of_first_g(algorithm.policy))
    assert probabilities == sorted(probabilities)
    assert probabilities[-1] > probabilities[0] + 0.003


@pytest.mark.parametrize("name", ["trpo", "reinforce", "random", "evolution"])
def test_state_dict_round_trip_reproduces_the_next_samples(name):
    threads = torch.get_num_threads()
    algorithm = make_algorithm(name, "paper", seed=7)
    for _ in range(2):
        samples = algorithm.sample()
        algorithm.update(samples, first_token_is_g(samples))
    buffer = io.BytesIO()
    torch.save(algorithm.state_dict(), buffer)
    buffer.seek(0)
    restored = make_algorithm(name, "paper", seed=123)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(2):
        expected, got = algorithm.sample(), restored.sample()
        assert torch.equal(expected.tokens, got.tokens) and expected.dsl == got.dsl
        torch.testing.assert_close(expected.log_probs, got.log_probs, rtol=0, atol=0)
        assert algorithm.update(expected, first_token_is_g(expected)) == restored.update(
            got, first_token_is_g(got)
        )
    assert torch.get_num_threads() == threads  # single_threaded restores the count


def test_update_refuses_bad_rewards_and_foreign_state():
    algorithm = make_algorithm("trpo", "small", seed=0)
    samples = algorithm.sample(3)
    with pytest.raises(ValueError, match="finite"):
        algorithm.update(samples, torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="3 samples"):
        algorithm.update(samples, [1.0, 0.0])
    with pytest.raises(ValueError, match="cannot be loaded"):
        algorithm.load_state_dict(make_algorithm("reinforce", "small", seed=0).state_dict())
    with pytest.raises(ValueError, match="cannot be loaded"):
        algorithm.load_state_dict(make_algorithm("trpo", "paper", seed=0).state_dict())
    with pytest.raises(ValueError, match="at least one sample"):
        algorithm.sample(0)
    with pytest.raises(KeyError, match="unknown algorithm"):
        make_algorithm("ppo", "small", seed=0)


def test_random_search_samples_uniformly_and_does_not_learn():
    algorithm = make_algorithm("random", "small", seed=0)
    samples = algorithm.sample(1000)
    assert (samples.log_probs == -math.log(3000)).all()
    assert len(set(samples.dsl)) > 800  # 1000 draws from 3000 strings: ≈ 850 distinct
    stats = algorithm.update(samples, torch.rand(1000))
    assert stats["updates"] == 1 and 0 <= stats["reward_mean"] <= 1
