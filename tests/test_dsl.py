"""The DSL: grammar, canonical forms, keys, degenerate rules, errors (issue: nos_sym core)."""

from __future__ import annotations

import os
import re

import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nos_sym
from nos_sym import primitives as P
from nos_sym.dsl import CANONICAL_VERSION, DSLSyntaxError, grammar, parse
from nos_sym.groups import live_groups

LONG = os.environ.get("NOS_LONG") == "1"
FUZZ_EXAMPLES = 200_000 if LONG else 10_000

g, m, v, gamma, w, eps = P.G, P.M, P.V, P.GAMMA, P.W, P.EPS
sign, exp = sp.sign, sp.exp
POWERSIGN = g * exp(sign(g) * sign(m))

# ---------------------------------------------------------------------------------------------
# Table-driven: docs/dsl.md's examples and the paper's Table 1, each with Δ written independently
# ---------------------------------------------------------------------------------------------
DSL_EXAMPLES = [
    ("SGD", "g g id id keep", g),
    ("Adam, one group", "m v id sqrt div", m / (sp.sqrt(v) + eps)),
    ("Adam, two groups", "v g sqrt id keep ; m o1 id id div", m / (sp.sqrt(v) + eps)),
    ("Adam operand", "adam g id id keep", m / (sp.sqrt(v) + eps)),
    ("PowerSign", "sign_g sign_m id id mul ; o1 g exp id mul", POWERSIGN),
    (
        "PowerSign-ld",
        "sign_g sign_m id id mul ; o1 ld id id mul ; o2 g exp id mul",
        g * exp(P.LD * sign(g) * sign(m)),
    ),
    (
        "AddSign",
        "sign_g sign_m id id mul ; o1 one id id add ; o2 g id id mul",
        g * (1 + sign(g) * sign(m)),
    ),
]


def drop(x, rate, label=0):
    return P.Drop(x, sp.Rational(rate), sp.Symbol(f"k{label}", integer=True, nonnegative=True))


TABLE_1 = [
    (
        "sign_g sign_m id id mul ; o1 g exp clip_1e-4 add ; o2 g id id mul",
        (exp(sign(g) * sign(m)) + P.Clip(g, sp.Rational(1, 10**4))) * g,
    ),
    ("m v clip_1e-4 exp mul", P.Clip(m, sp.Rational(1, 10**4)) * exp(v)),
    ("m v id exp mul", m * exp(v)),
    ("sign_g sign_m id id mul ; o1 g exp id mul", POWERSIGN),
    ("sign_g sign_m id id mul ; o1 g exp drop_0.3 mul", drop(g, "0.3") * exp(sign(g) * sign(m))),
    ("m g2 id exp mul", m * exp(g**2)),
    ("m g2 drop_0.1 exp div", drop(m, "0.1") / (exp(g**2) + eps)),
    ("sign_g sign_m id id mul ; o1 g exp drop_0.1 mul", drop(g, "0.1") * exp(sign(g) * sign(m))),
    (
        "rmsprop m clip_1e-5 drop_0.3 add",
        P.Clip(g / (sp.sqrt(v) + eps), sp.Rational(1, 10**5)) + drop(m, "0.3"),
    ),
    (
        "sign_g sign_m id id mul ; o1 adam exp id mul",
        m / (sp.sqrt(v) + eps) * exp(sign(g) * sign(m)),
    ),
    ("adam m id exp mul", m / (sp.sqrt(v) + eps) * exp(m)),
    ("g m id drop_0.3 add", g + drop(m, "0.3")),
    ("m g3 drop_0.1 exp mul", drop(m, "0.1") * exp(g**3)),
    ("g g2 id clip_1e-4 sub", g - P.Clip(g**2, sp.Rational(1, 10**4))),
    ("g m exp exp sub", exp(g) - exp(m)),
    ("m w_1e-3 drop_0.3 exp mul", drop(m, "0.3") * exp(w / 1000)),
]


@pytest.mark.parametrize(
    ("name", "text", "expected"), DSL_EXAMPLES, ids=[e[0] for e in DSL_EXAMPLES]
)
def test_dsl_examples(name, text, expected):
    rule = parse(text)
    assert rule.sympy == expected
    assert not rule.is_degenerate
    assert parse(rule.dsl).key == rule.key


def test_the_three_adam_strings_share_one_key():
    keys = {parse(text).key for _, text, _ in DSL_EXAMPLES[1:4]}
    assert len(keys) == 1


@pytest.mark.parametrize(("text", "expected"), TABLE_1)
def test_table_1_rules(text, expected):
    rule = parse(text)
    assert rule.sympy == expected
    assert not rule.is_degenerate
    assert rule.latex()


# ---------------------------------------------------------------------------------------------
# Canonical meaning (docs/dsl.md, "The canonical form and the key", "Random draws")
# ---------------------------------------------------------------------------------------------
SAME_KEY = [
    ("g m id id add", "m g id id add"),
    ("g m exp id mul", "m g id exp mul"),
    ("g g id id keep", "g noise id drop_0.5 keep"),  # keep's right argument is dead
    ("g g id id keep", "g g id id keep ; o1 noise id id keep"),
    ("g g id id keep", "m v id id div ; g g id id keep"),  # an unused group is dead
    ("g g2 id id mul", "g3 one id id keep"),
    ("g g drop_0.1 drop_0.1 mul", "g g drop_0.1 drop_0.1 mul ; o1 g id id keep"),
    ("g m drop_0.1 drop_0.3 add", "m g drop_0.3 drop_0.1 add"),
    ("noise g id id mul ; o1 noise id id add", "g noise id id mul ; noise o1 id id add"),
    ("g noise id id add ; o1 noise id id mul", "noise g id id add ; noise o1 id id mul"),
    (
        "noise noise id drop_0.1 mul ; o1 g id id add",
        "noise noise drop_0.1 id mul ; g o1 id id add",
    ),
    ("g g drop_0.1 id sub ; o1 noise id id mul", "g g drop_0.1 id sub ; noise o1 id id mul"),
]

DIFFERENT_KEY = [
    ("g g clip_1e-5 id keep", "g g clip_1e-4 id keep"),
    ("g g drop_0.1 id keep", "g g drop_0.3 id keep"),
    ("w_1e-4 g id id add", "w_1e-3 g id id add"),
    ("ld g id id mul", "cd g id id mul"),
    ("cd g id id mul", "rd g id id mul"),
    ("g g drop_0.1 drop_0.1 mul", "g g drop_0.1 id keep ; o1 o1 id id mul"),  # two draws vs one
    ("g g drop_0.1 drop_0.1 add", "g g drop_0.1 id keep ; o1 o1 id id add"),
    ("m g id id sub", "g m id id sub"),
    ("noise noise id id add", "noise one id id keep ; o1 o1 id id add"),
]


@pytest.mark.parametrize(("a", "b"), SAME_KEY)
def test_equal_rules_share_a_key(a, b):
    assert parse(a).key == parse(b).key
    assert parse(a) == parse(b)


@pytest.mark.parametrize(("a", "b"), DIFFERENT_KEY)
def test_different_rules_do_not_share_a_key(a, b):
    assert parse(a).key != parse(b).key


def test_stochastic_occurrences_are_independent_draws():
    difference = parse("g g drop_0.1 drop_0.1 sub")
    assert difference.sympy != 0 and not difference.is_degenerate
    product = parse("g g drop_0.1 drop_0.1 mul").sympy
    assert not product.is_Pow  # drop(g)·drop(g) is not drop(g)²
    assert len(product.atoms(P.Drop)) == 2
    assert not parse("noise noise id id sub ; o1 g id id mul").is_degenerate


def test_a_bank_result_read_twice_is_one_draw():
    rule = parse("g g drop_0.1 id keep ; o1 o1 id id sub")
    assert rule.sympy == 0 and rule.is_degenerate


def test_draws_in_dead_code_do_not_exist():
    assert not parse("g noise id drop_0.1 keep").stochastic
    assert parse("g g drop_0.1 id keep").stochastic


DEGENERATE = [
    "g g id id sub",
    "one one id id add",
    "w_1e-4 one id id mul",
    "noise one id id add",
    "ld cd id id mul",
    "g g id id sub ; o1 g log id mul",  # log|0|: not finite
    "g m id id keep ; one o1 id id keep",
]


@pytest.mark.parametrize("text", DEGENERATE)
def test_degenerate_rules(text):
    assert parse(text).is_degenerate


@pytest.mark.parametrize(
    "text", ["sign_g one id id keep", "rmsprop one id id keep", "v one id id keep"]
)
def test_rules_reading_only_gradient_statistics_are_not_degenerate(text):
    assert not parse(text).is_degenerate


def test_rule_flags():
    rule = parse("sign_g sign_m id id mul ; o1 ld id id mul ; o2 g exp drop_0.1 mul")
    assert rule.averages == ("m",)
    assert rule.needs_total_steps and rule.decay_tokens == ("ld",)
    assert rule.stochastic
    assert parse("adam gamma id id add").averages == ("m", "v", "gamma")
    assert parse("anneal_noise g id id add").decay_tokens == ("anneal_noise",)


def test_key_is_a_versioned_digest():
    rule = parse("g g id id keep")
    assert re.fullmatch(r"[0-9a-f]{64}", rule.key)
    assert CANONICAL_VERSION.startswith("nos_sym.canonical/")


def test_rule_is_immutable():
    rule = parse("g g id id keep")
    with pytest.raises(AttributeError):
        rule.dsl = "m m id id keep"


def test_normalized_text():
    rule = parse("  sign_g\tsign_m id id mul\n o1 g exp id\r\nmul ")
    assert rule.dsl == "sign_g sign_m id id mul ; o1 g exp id mul"
    assert rule.groups == (("sign_g", "sign_m", "id", "id", "mul"), ("o1", "g", "exp", "id", "mul"))


def test_three_hundred_groups_parse():
    text = "g m id id add" + "".join(f" ; o{k} g id id mul" for k in range(1, 300))
    rule = parse(text)
    assert len(rule.groups) == 300


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
BAD = [
    ("", 1, 1, "expected an operand"),
    ("   ", 1, 4, "got end of input"),
    ("g g id id kep", 1, 11, "expected a binary function (add, sub, mul, div, ...), got 'kep'"),
    ("g g id kep id", 1, 8, "expected a unary function"),
    ("g g id id", 1, 10, "got end of input"),
    ("g g id id keep m", 1, 17, "got end of input"),
    ("G g id id keep", 1, 1, "got 'G'"),
    ("gg g id id keep", 1, 1, "got 'gg'"),
    ("g g ID id keep", 1, 5, "got 'ID'"),
    ("o1 g id id keep", 1, 1, "o1 used in group 1"),
    ("o0 g id id keep", 1, 1, "got 'o0'"),
    ("g g id id keep ;\n o2 g id id add", 2, 2, "o2 used in group 2"),
    ("g g id id keep ;", 1, 17, "got end of input"),
    ("g g id id keep ; ; g g id id keep", 1, 18, "got ';'"),
    ("g g id id keep # comment", 1, 16, "unexpected character '#'"),
    ("g\x00 g id id keep", 1, 2, "unexpected character '\\x00'"),
    ("g g id id kéép", 1, 12, "unexpected character 'é'"),
    ("__import__('os').system('true')", 1, 11, "unexpected character '('"),
    ("g g id id keep\ng g id id kep", 2, 11, "got 'kep'"),
    ("g\u00a0g id id keep", 1, 2, "unexpected character"),
    # bank operands beyond Python's int-conversion limit (4300 digits), found by fuzzing
    ("o" + "9" * 5000 + " g id id keep", 1, 1, "used in group 1, before group 9999"),
    ("g g id id keep ;\n g o" + "1" * 5000 + " id id add", 2, 4, "used in group 2"),
    # SymPy's recursion limit: a chain of 1,000 groups, each reading the one before (~89 groups
    # reach Python's default limit of 1,000 frames; 1,000 groups stay too deep at the 2,000 that
    # torch.compile sets, so the test does not depend on what ran before it)
    (
        "g m id id add" + "".join(f" ; o{k} noise drop_0.1 id div" for k in range(1, 1000)),
        1,
        1,
        "nested too deeply to canonicalize (1000 groups)",
    ),
]


@pytest.mark.parametrize(("text", "line", "column", "message"), BAD)
def test_bad_rules_name_line_column_and_what_was_expected(text, line, column, message):
    with pytest.raises(DSLSyntaxError) as caught:
        parse(text)
    error = caught.value
    assert (error.line, error.column) == (line, column)
    assert message in str(error)
    assert str(error).startswith(f"line {line}, column {column}: ")
    assert error.text == text
    assert isinstance(error, ValueError)


@pytest.mark.parametrize("value", [None, 3, b"g g id id keep", ["g"]])
def test_non_text_is_a_syntax_error(value):
    with pytest.raises(DSLSyntaxError):
        parse(value)


# ---------------------------------------------------------------------------------------------
# The grammar and the primitives table name the same tokens
# ---------------------------------------------------------------------------------------------
def _grammar_alternatives(name: str) -> set[str]:
    pattern = grammar().get_terminal(name).pattern.value
    body = re.match(r"\(\?:(.*)\)\(\?!", pattern).group(1)
    return {alternative.replace("\\.", ".") for alternative in body.split("|")}


@pytest.mark.parametrize(
    ("terminal", "kind"),
    [("OPERAND", P.Kind.OPERAND), ("UNARY", P.Kind.UNARY), ("BINARY", P.Kind.BINARY)],
)
def test_grammar_and_table_name_the_same_tokens(terminal, kind):
    assert _grammar_alternatives(terminal) == set(P.tokens(kind))


def test_table_rows_are_unique_and_complete():
    assert len(P.BY_TOKEN) == len(P.PRIMITIVES)
    for primitive in P.PRIMITIVES:
        assert primitive.latex and primitive.description


def _row_expression(primitive: P.Primitive) -> sp.Expr:
    def label():
        return sp.Symbol("k0", integer=True, nonnegative=True)

    if primitive.kind is P.Kind.OPERAND:
        return primitive.sympy(label)
    if primitive.kind is P.Kind.UNARY:
        return primitive.sympy(g, label)
    return primitive.sympy(g, m)


@pytest.mark.parametrize("primitive", P.PRIMITIVES, ids=lambda p: p.token)
def test_every_row_declares_how_its_functions_compile(primitive):
    """The rows' ``lowering`` covers every SymPy function class their expressions introduce,
    and the compiler lowers each row alone."""
    from nos_sym.compile import lower

    expr = _row_expression(primitive)
    functions = {
        type(node) for node in sp.preorder_traversal(expr) if isinstance(node, sp.Function)
    }
    declared = {head for head, _ in primitive.lowering}
    assert functions == declared
    assert all(P.LOWERING[head] == name for head, name in primitive.lowering)
    lower(expr)


# ---------------------------------------------------------------------------------------------
# Properties over random valid rules
# ---------------------------------------------------------------------------------------------
@st.composite
def groups(draw, max_groups: int = 3, deterministic: bool = False):
    unary = [u for u in P.UNARY if not (deterministic and P.BY_TOKEN[u].stochastic)]
    operands = [o for o in P.OPERANDS if not (deterministic and P.BY_TOKEN[o].stochastic)]
    result = []
    for k in range(draw(st.integers(1, max_groups))):
        bank = [f"o{i}" for i in range(1, k + 1)]
        result.append(
            (
                draw(st.sampled_from(operands + bank)),
                draw(st.sampled_from(operands + bank)),
                draw(st.sampled_from(unary)),
                draw(st.sampled_from(unary)),
                draw(st.sampled_from(P.BINARY)),
            )
        )
    return result


def _text(rule_groups) -> str:
    return " ; ".join(" ".join(group) for group in rule_groups)


PROPERTY = settings(
    max_examples=300 if not LONG else 3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROPERTY
@given(groups())
def test_dsl_round_trips(rule_groups):
    rule = parse(_text(rule_groups))
    again = parse(rule.dsl)
    assert (again.dsl, again.key) == (rule.dsl, rule.key)
    assert rule.latex()


@PROPERTY
@given(groups(), st.data())
def test_swapping_a_commutative_group_keeps_the_key(rule_groups, data):
    commutative = [i for i, group in enumerate(rule_groups) if group[4] in ("add", "mul")]
    if not commutative:
        return
    index = data.draw(st.sampled_from(commutative))
    op1, op2, unary1, unary2, binary = rule_groups[index]
    swapped = list(rule_groups)
    swapped[index] = (op2, op1, unary2, unary1, binary)
    a, b = parse(_text(rule_groups)), parse(_text(swapped))
    assert a.key == b.key
    assert a.fingerprint() == b.fingerprint()


@PROPERTY
@given(groups(), st.sampled_from(P.OPERANDS))
def test_appending_a_dead_group_keeps_the_key(rule_groups, dead_operand):
    rule = parse(_text(rule_groups))
    extended = parse(f"{rule.dsl} ; o{len(rule_groups)} {dead_operand} id id keep")
    assert extended.key == rule.key


@PROPERTY
@given(groups(deterministic=True))
def test_canonical_form_computes_what_the_groups_say(rule_groups):
    """Soundness: the canonical program equals a literal evaluation of the groups through the
    primitives table's torch column, wherever the literal evaluation stays finite."""
    import torch

    from nos_sym.compile import lower, probe_values, run

    rule = parse(_text(rule_groups))
    values = probe_values(64, seed=1)
    context = P.Context(
        grad=values["g"],
        param=values["w"],
        step=5,
        total_steps=10,
        averages={"m": values["m"], "v": values["v"], "gamma": values["gamma"]},
    )
    context_values = {
        "ld": P.linear_decay(5, 10),
        "cd": P.cosine_decay(5, 10),
        "rd": P.restart_decay(5, 10),
    }
    bank, largest = [], torch.zeros(64, dtype=torch.float64)

    def operand(token):
        if token[0] == "o" and token[1:].isdigit():
            return bank[int(token[1:]) - 1]
        return P.BY_TOKEN[token].torch(context)

    for op1, op2, unary1, unary2, binary in rule_groups:
        left = P.BY_TOKEN[unary1].torch(operand(op1), context)
        right = P.BY_TOKEN[unary2].torch(operand(op2), context)
        bank.append(P.BY_TOKEN[binary].torch(left, right))
        for value in (left, right, bank[-1]):
            largest = torch.maximum(largest, value.abs().nan_to_num(0, 0, 0))
    literal = bank[-1]
    canonical = run(lower(rule.sympy), {**values, **context_values}, [])
    canonical = torch.as_tensor(canonical, dtype=torch.float64).expand(64)
    finite = literal.isfinite() & canonical.isfinite() & (largest < 1e12)
    tolerance = 1e-9 * (1 + largest[finite]) + 1e-7 * literal[finite].abs()
    assert ((canonical[finite] - literal[finite]).abs() <= tolerance).all(), rule.dsl


# ---------------------------------------------------------------------------------------------
# The minimal form: live groups only, renumbered, keep's dead side as op1 repeated and id
# ---------------------------------------------------------------------------------------------
MINIMAL = [
    ("noise w_1e-1 drop_0.1 drop_0.1 keep ; m o1 sign id keep", "m m sign id keep"),
    ("g g id id keep", "g g id id keep"),
    ("g noise id drop_0.5 keep", "g g id id keep"),
    ("v g sqrt id keep ; m o1 id id div", "v v sqrt id keep ; m o1 id id div"),
    ("m v id id div ; g g id id keep", "g g id id keep"),
    ("g m id id add ; m v id id div ; o1 o1 exp id mul", "g m id id add ; o1 o1 exp id mul"),
    ("g g id id keep ; o1 o1 neg id add ; o1 o2 id exp keep", "g g id id keep ; o1 o1 id id keep"),
    (
        "m v id id add ; g g id id keep ; o2 o1 exp id mul",
        "m v id id add ; g g id id keep ; o2 o1 exp id mul",
    ),
]


@pytest.mark.parametrize(("text", "minimal"), MINIMAL)
def test_minimal_dsl_examples(text, minimal):
    rule = parse(text)
    assert rule.minimal_dsl == minimal
    assert parse(minimal).key == rule.key


def _assert_minimal_form(rule) -> None:
    minimal = parse(rule.minimal_dsl)
    assert minimal.key == rule.key, (rule.dsl, rule.minimal_dsl)
    assert minimal.minimal_dsl == rule.minimal_dsl  # idempotent
    assert live_groups(minimal.groups) == tuple(range(len(minimal.groups)))  # nothing dead
    assert len(minimal.groups) <= len(rule.groups)


@PROPERTY
@given(groups(max_groups=5))
def test_minimal_dsl_keeps_the_key_and_is_its_own_minimal_form(rule_groups):
    _assert_minimal_form(parse(_text(rule_groups)))


@PROPERTY
@given(st.sampled_from(["paper", "paper-decay", "full"]), st.integers(0, 2**32 - 1))
def test_minimal_dsl_of_rules_the_controller_samples(space_name, seed):
    import torch

    from nos_sym.controller.space import get_space, uniform_sample

    space = get_space(space_name, groups=3)
    tokens = uniform_sample(space, torch.Generator().manual_seed(seed))
    _assert_minimal_form(parse(space.to_dsl(tokens)))


# ---------------------------------------------------------------------------------------------
# Fuzz: nothing but DSLSyntaxError escapes parse
# ---------------------------------------------------------------------------------------------
SOUP = list(P.BY_TOKEN) + [
    "o0",
    "o1",
    "o2",
    "o9",
    ";",
    "kep",
    "G",
    "#",
    "(",
    ")",
    "é",
    "\x00",
    "1e-4",
    "drop_0.2",
    " ",
    "\n",
    "\t",
]


def _parses_or_raises_syntax_error(text) -> None:
    try:
        rule = nos_sym.parse(text)
    except DSLSyntaxError as error:
        assert error.line >= 1 and error.column >= 1
    else:
        assert parse(rule.dsl).key == rule.key


FUZZ = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@given(st.lists(st.sampled_from(SOUP), max_size=20).map(" ".join))
def test_fuzz_token_soups(text):
    _parses_or_raises_syntax_error(text)


@FUZZ
@given(st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_fuzz_random_text(text):
    _parses_or_raises_syntax_error(text)


_DSL_CHARACTERS = "abcdeilmnopqrstuvwxyz0123456789_.-; \n"
_BANK_OPERANDS = st.builds(
    lambda digits, repeat: "o" + digits * repeat,
    st.text("0123456789", min_size=1, max_size=3),
    st.sampled_from([1, 2, 1500, 3000]),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(st.sampled_from(SOUP), _BANK_OPERANDS, st.text(_DSL_CHARACTERS, max_size=12)),
        max_size=40,
    ).map(" ".join)
)
def test_fuzz_any_text_is_a_rule_or_a_syntax_error(text):
    """Nothing but a Rule or a DSLSyntaxError: the DSL's characters in any order, token soups
    and bank operands of any size (``int()`` refuses more than 4300 digits)."""
    _parses_or_raises_syntax_error(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups(), st.data())
def test_fuzz_bank_operands_of_any_size(rule_groups, data):
    """Valid rules with operands replaced by bank operands of any size, in range or not."""
    replaced = [
        tuple(
            data.draw(st.one_of(st.just(t), _BANK_OPERANDS)) if i < 2 else t
            for i, t in enumerate(g)
        )
        for g in rule_groups
    ]
    _parses_or_raises_syntax_error(_text(replaced))
