"""The one table of DSL primitives.

Every token of the update-rule language (``docs/dsl.md``) is one row of :data:`PRIMITIVES`:
its kind (operand, unary or binary function), how it builds a SymPy expression, how the compiler
computes the SymPy functions that expression introduces (``lowering``), its literal meaning on
torch tensors, its LaTeX, and its flags. The grammar's terminals (a test checks they agree), the
canonicalizer (:mod:`nos_sym.dsl`), the compiler (:mod:`nos_sym.compile`, through
:data:`LOWERING`), the LaTeX printer and the trees (:mod:`nos_sym.notation`, through
:data:`SYMBOL_LATEX` and the ``latex`` column) and the controller's vocabulary
(:mod:`nos_sym.controller.space`) all read this table.

Adding a primitive is one row here, its token in the matching terminal of
``grammar/nos.lark``, and, only where the row needs something that does not exist yet:

* a SymPy function class for it, when SymPy has none (as :class:`Clip`, :class:`Drop`,
  :class:`Noise`): ``nargs``, ``is_real``, an ``eval`` with its exact simplifications (e.g.
  f(0) = 0), ``_latex``; a random one subclasses :class:`Stochastic` (last argument: its label);
* an instruction of :mod:`nos_sym.compile` (``_INSTRUCTIONS`` and the engine's ops), when the
  row's ``lowering`` names one the compiler lacks (it refuses to import otherwise);
* a new symbol of the canonical form (a new kind of leaf, as ``ld``): its value in
  :mod:`nos_sym.symbolic_optim` (a tensor leaf, or a per-step scalar as the decays),
  ``compile.TENSOR_SYMBOLS`` if it is a tensor, a probe in ``compile.probe_values``; a new
  running average also ``AVERAGE_OF_SYMBOL`` and ``compile.RAW_AVERAGE``.

A new row changes no existing key (keys hash canonical expressions, not the table); the "full"
search space grows by it.

Symbols of the canonical form (all real; ``g2``-like quantities are built from them):

=========  ==========================================  =============================
symbol     meaning                                     assumptions
=========  ==========================================  =============================
``g``      gradient g                                  real
``m``      m̂, bias-corrected EMA of g (β1 = 0.9)       real
``v``      v̂, bias-corrected EMA of g² (β2 = 0.999)    nonnegative
``gamma``  γ̂, bias-corrected EMA of g³ (β3 = 0.999)    real
``w``      the parameter w                             real
``ld``     1 − t/T                                     nonnegative
``cd``     0.5·(1 + cos(π·t/T))                        nonnegative
``rd``     0.5·(1 + cos(π·((20·t) mod T)/T))           nonnegative
``ε``      1e-8, kept symbolic so x/(y+ε) stays exact  positive
=========  ==========================================  =============================
"""

from __future__ import annotations

import importlib
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import sympy as sp

from nos_sym import sign_decay

if TYPE_CHECKING:
    import torch
else:

    class _Torch:
        """``torch``, imported at its first use: parsing and canonicalizing read this table but
        never run its torch column, so ``nos-sym parse`` starts without torch (~1.7 s)."""

        def __getattr__(self, name: str):
            return getattr(importlib.import_module("torch"), name)

    torch = _Torch()

# --------------------------------------------------------------------------------------------
# Constants of the language (docs/dsl.md)
# --------------------------------------------------------------------------------------------
EPSILON = 1e-8
BETA1, BETA2, BETA3 = 0.9, 0.999, 0.999
NOISE_STD = 0.01
ANNEAL_NOISE_DECAY = 0.55  # anneal_noise ~ N(0, 1/(1+t)^0.55): a variance, as in TF's noisy decays
RESTART_PERIODS = 20

# --------------------------------------------------------------------------------------------
# Symbols of the canonical form
# --------------------------------------------------------------------------------------------
G = sp.Symbol("g", real=True)
M = sp.Symbol("m", real=True)
V = sp.Symbol("v", nonnegative=True)
GAMMA = sp.Symbol("gamma", real=True)
W = sp.Symbol("w", real=True)
LD = sp.Symbol("ld", nonnegative=True)
CD = sp.Symbol("cd", nonnegative=True)
RD = sp.Symbol("rd", nonnegative=True)
EPS = sp.Symbol("epsilon", positive=True)

GRADIENT_SYMBOLS = frozenset({G, M, V, GAMMA})
"""A rule whose update contains none of these does not depend on the gradient (degenerate)."""

AVERAGE_OF_SYMBOL = {M: "m", V: "v", GAMMA: "gamma"}
"""Symbols that need a running average kept in optimizer state, and that average's name."""

DECAY_SYMBOLS = frozenset({LD, CD, RD})


# --------------------------------------------------------------------------------------------
# Custom SymPy functions for the primitives SymPy does not have
# --------------------------------------------------------------------------------------------
def power_of_ten(value: sp.Expr) -> int | None:
    """k when value = 10^k exactly, else None."""
    if not value.is_Rational or value <= 0:
        return None
    exponent = round(math.log10(float(value)))
    return exponent if sp.Rational(10) ** exponent == value else None


def _latex_power_of_ten(value: sp.Rational) -> str:
    exponent = power_of_ten(value)
    return sp.latex(value) if exponent is None else f"10^{{{exponent}}}"


def _with_exponent(text: str, exp: str | None) -> str:
    """``text`` raised to a printed exponent, as SymPy's printer asks for powers of a call."""
    return rf"\left({text}\right)^{{{exp}}}" if exp else text


class Clip(sp.Function):
    """clip(x, l): x clamped to [−l, l]."""

    nargs = 2
    is_real = True

    @classmethod
    def eval(cls, x, bound):
        if x.is_zero:
            return sp.S.Zero
        if x.is_Number:
            return sp.Max(sp.Min(x, bound), -bound)
        return None

    def _latex(self, printer, exp=None):
        x, bound = self.args
        bound_text = _latex_power_of_ten(bound)
        return _with_exponent(
            rf"\operatorname{{clip}}\left({printer._print(x)}, {bound_text}\right)", exp
        )


class Stochastic(sp.Function):
    """Base of the random primitives. The last argument is the occurrence label: every
    occurrence is an independent draw, so two occurrences differ by label and never merge."""

    is_real = True

    @property
    def label(self) -> int:
        """The draw's canonical number k (its last argument is the symbol ``k<k>``)."""
        return int(self.args[-1].name[1:])

    def _latex_body(self, printer) -> str:
        raise NotImplementedError

    def _latex(self, printer, exp=None):
        """The primitive's notation; numbered (``_{[k]}``) when the printer's ``show_draws`` is set,
        so that a rule with several draws shows which are the same draw."""
        text = self._latex_body(printer)
        if getattr(printer, "show_draws", False):
            text = rf"{{{text}}}_{{[{self.label}]}}"
        return _with_exponent(text, exp)


class Drop(Stochastic):
    """drop(x, p, k): each element of x set to 0 with probability p (no rescaling); draw k."""

    nargs = 3

    @classmethod
    def eval(cls, x, rate, label):
        return sp.S.Zero if x.is_zero else None

    def _latex_body(self, printer) -> str:
        x, rate, _ = self.args
        return rf"\operatorname{{drop}}\left({printer._print(x)}, {float(rate):g}\right)"


class Noise(Stochastic):
    """noise(k): N(0, 0.01²), fresh every step and element; draw k."""

    nargs = 1

    def _latex_body(self, printer) -> str:
        return r"\operatorname{noise}"


class AnnealNoise(Stochastic):
    """anneal_noise(k): N(0, 1/(1+t)^0.55), fresh every step and element; draw k."""

    nargs = 1

    def _latex_body(self, printer) -> str:
        return r"\operatorname{noise}_{t}"


# --------------------------------------------------------------------------------------------
# torch implementations
# --------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What operands read on one tensor at one step: t counts from 1 (the step being taken)."""

    grad: torch.Tensor
    param: torch.Tensor
    averages: dict[str, torch.Tensor]  # bias-corrected m̂, v̂, γ̂ (only those the rule uses)
    step: int
    total_steps: int | None = None
    generator: torch.Generator | None = None


def _decay_at(schedule, step: int, total_steps: int | None) -> float:
    """A TF sign-decay schedule over T = total_steps at t = step − 1 (t counts from 0; the
    schedules clamp it at T)."""
    if total_steps is None:
        raise ValueError("decay operands need total_steps")
    return schedule(total_steps)(step - 1)


def linear_decay(step: int, total_steps: int | None) -> float:
    """ld = 1 − t/T (TF's linear sign decay)."""
    return _decay_at(sign_decay.linear, step, total_steps)


def cosine_decay(step: int, total_steps: int | None) -> float:
    """cd = 0.5·(1 + cos(π·t/T)) (TF's cosine sign decay, half a period)."""
    return _decay_at(sign_decay.cosine, step, total_steps)


def restart_decay(step: int, total_steps: int | None) -> float:
    """rd = 0.5·(1 + cos(π·((n·t) mod T)/T)), n = 20 (TF's restart sign decay, 20 periods)."""
    return _decay_at(
        lambda total: sign_decay.restart(total, num_periods=RESTART_PERIODS), step, total_steps
    )


def anneal_noise_std(step: int) -> float:
    """Standard deviation of anneal_noise at step t (counted from 0): (1+t)^(−0.55/2)."""
    return (1.0 + (step - 1)) ** (-ANNEAL_NOISE_DECAY / 2)


def random_normal(like: torch.Tensor, std: float, generator: torch.Generator | None):
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator).mul_(
        std
    )


def keep_mask(like: torch.Tensor, rate: float, generator: torch.Generator | None):
    """1 where an element survives drop(·, rate), 0 where it is dropped."""
    uniform = torch.rand(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    return (uniform >= rate).to(like.dtype)


def safe_div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x / (y + EPSILON)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
class Kind(str, Enum):
    OPERAND = "operand"
    UNARY = "unary"
    BINARY = "binary"


@dataclass(frozen=True)
class Primitive:
    """One token of the DSL.

    ``sympy`` builds the canonical expression (read by :mod:`nos_sym.dsl`): operands take the
    next free stochastic label (``label()``), unary functions take (x, label), binary functions
    take (x, y).

    ``lowering`` names, for each SymPy function class that expression introduces, the
    instruction of :mod:`nos_sym.compile` that computes it (read through :data:`LOWERING`):
    an elementwise op (``"exp"``, ``"log"``, ``"abs"``, ``"sign"``), ``"clip"`` (bound: the
    second argument), or a draw made before the program runs: ``"mask"`` (x times a keep mask,
    rate: the second argument), ``"normal"`` (N(0, 0.01²)), ``"annealed_normal"``
    (N(0, 1/(1+t)^0.55)). Add, Mul, Pow, numbers and symbols need no entry: the compiler lowers
    them itself.

    ``torch`` is the literal meaning on tensors, token by token: operands take a
    :class:`Context`, unary functions (x, ctx), binary functions (x, y). Nothing at run time
    calls it (optimizers run the compiled canonical form); it is the reference the tests check
    the canonical form and its compiled program against (``tests/test_dsl.py``).

    ``latex`` is the paper's notation: for operands, how the operand prints (its symbol in
    :data:`SYMBOL_LATEX`, its box in the DSL tree); for functions, a template in ``{x}``/``{y}``
    (``sign``'s prints sp.sign; SymPy prints the other heads of the canonical form itself).
    """

    token: str
    kind: Kind
    sympy: Callable
    torch: Callable
    latex: str
    description: str
    stochastic: bool = False
    averages: tuple[str, ...] = ()
    needs_total_steps: bool = False
    lowering: tuple[tuple[type[sp.Basic], str], ...] = ()


def _operand(token, expr, torch_fn, latex, description, **flags) -> Primitive:
    return Primitive(token, Kind.OPERAND, lambda label: expr, torch_fn, latex, description, **flags)


def _weight_decay(exponent: int) -> Primitive:
    scale = sp.Rational(1, 10**exponent)
    return _operand(
        f"w_1e-{exponent}",
        scale * W,
        lambda ctx: ctx.param * 10.0**-exponent,
        f"10^{{-{exponent}}} w",
        f"10^-{exponent}·w (w: current parameter)",
    )


def _clip(exponent: int) -> Primitive:
    bound = sp.Rational(1, 10**exponent)
    return Primitive(
        f"clip_1e-{exponent}",
        Kind.UNARY,
        lambda x, label: Clip(x, bound),
        lambda x, ctx: x.clamp(-(10.0**-exponent), 10.0**-exponent),
        rf"\operatorname{{clip}}({{x}}, 10^{{{-exponent}}})",
        f"clamp to [-1e-{exponent}, 1e-{exponent}]",
        lowering=((Clip, "clip"),),
    )


def _drop(rate: str) -> Primitive:
    exact = sp.Rational(rate)
    return Primitive(
        f"drop_{rate}",
        Kind.UNARY,
        lambda x, label: Drop(x, exact, label()),
        lambda x, ctx: x * keep_mask(x, float(rate), ctx.generator),
        rf"\operatorname{{drop}}({{x}}, {rate})",
        f"each element set to 0 with probability {rate}, no rescaling",
        stochastic=True,
        lowering=((Drop, "mask"),),
    )


_SQRT_V_PLUS_EPS = sp.sqrt(V) + EPS

PRIMITIVES: tuple[Primitive, ...] = (
    # ---- operands ------------------------------------------------------------------------
    _operand("g", G, lambda ctx: ctx.grad, "g", "gradient g"),
    _operand("g2", G**2, lambda ctx: ctx.grad * ctx.grad, "g^{2}", "g²"),
    _operand("g3", G**3, lambda ctx: ctx.grad**3, "g^{3}", "g³"),
    _operand(
        "m",
        M,
        lambda ctx: ctx.averages["m"],
        r"\hat{m}",
        "bias-corrected EMA of g",
        averages=("m",),
    ),
    _operand(
        "v",
        V,
        lambda ctx: ctx.averages["v"],
        r"\hat{v}",
        "bias-corrected EMA of g²",
        averages=("v",),
    ),
    _operand(
        "gamma",
        GAMMA,
        lambda ctx: ctx.averages["gamma"],
        r"\hat{\gamma}",
        "bias-corrected EMA of g³",
        averages=("gamma",),
    ),
    _operand(
        "sign_g",
        sp.sign(G),
        lambda ctx: torch.sign(ctx.grad),
        r"\operatorname{sign}(g)",
        "sign(g)",
        lowering=((sp.sign, "sign"),),
    ),
    _operand(
        "sign_m",
        sp.sign(M),
        lambda ctx: torch.sign(ctx.averages["m"]),
        r"\operatorname{sign}(\hat{m})",
        "sign(m̂)",
        averages=("m",),
        lowering=((sp.sign, "sign"),),
    ),
    _operand("one", sp.S.One, lambda ctx: torch.ones_like(ctx.grad), "1", "the constant 1"),
    Primitive(
        "noise",
        Kind.OPERAND,
        lambda label: Noise(label()),
        lambda ctx: random_normal(ctx.grad, NOISE_STD, ctx.generator),
        r"\operatorname{noise}",
        "N(0, 0.01²), fresh every step and element",
        stochastic=True,
        lowering=((Noise, "normal"),),
    ),
    *(_weight_decay(exponent) for exponent in (4, 3, 2, 1)),
    _operand(
        "adam",
        M / _SQRT_V_PLUS_EPS,
        lambda ctx: ctx.averages["m"] / (ctx.averages["v"].sqrt() + EPSILON),
        r"\operatorname{adam}",
        "m̂ / (√v̂ + ε)",
        averages=("m", "v"),
    ),
    _operand(
        "rmsprop",
        G / _SQRT_V_PLUS_EPS,
        lambda ctx: ctx.grad / (ctx.averages["v"].sqrt() + EPSILON),
        r"\operatorname{rmsprop}",
        "g / (√v̂ + ε)",
        averages=("v",),
    ),
    _operand(
        "ld",
        LD,
        lambda ctx: torch.full_like(ctx.grad, linear_decay(ctx.step, ctx.total_steps)),
        r"\operatorname{ld}",
        "linear decay 1 − t/T",
        needs_total_steps=True,
    ),
    _operand(
        "cd",
        CD,
        lambda ctx: torch.full_like(ctx.grad, cosine_decay(ctx.step, ctx.total_steps)),
        r"\operatorname{cd}",
        "cosine decay 0.5·(1 + cos(π·t/T))",
        needs_total_steps=True,
    ),
    _operand(
        "rd",
        RD,
        lambda ctx: torch.full_like(ctx.grad, restart_decay(ctx.step, ctx.total_steps)),
        r"\operatorname{rd}",
        "restart decay 0.5·(1 + cos(π·((20·t) mod T)/T))",
        needs_total_steps=True,
    ),
    Primitive(
        "anneal_noise",
        Kind.OPERAND,
        lambda label: AnnealNoise(label()),
        lambda ctx: random_normal(ctx.grad, anneal_noise_std(ctx.step), ctx.generator),
        r"\operatorname{noise}_{t}",
        "N(0, 1/(1+t)^0.55), fresh every step and element",
        stochastic=True,
        needs_total_steps=True,
        lowering=((AnnealNoise, "annealed_normal"),),
    ),
    # ---- unary functions -----------------------------------------------------------------
    Primitive("id", Kind.UNARY, lambda x, label: x, lambda x, ctx: x, "{x}", "x"),
    Primitive("neg", Kind.UNARY, lambda x, label: -x, lambda x, ctx: -x, "-{x}", "−x"),
    Primitive(
        "exp",
        Kind.UNARY,
        lambda x, label: sp.exp(x),
        lambda x, ctx: torch.exp(x),
        "e^{{{x}}}",
        "eˣ",
        lowering=((sp.exp, "exp"),),
    ),
    Primitive(
        "log",
        Kind.UNARY,
        lambda x, label: sp.log(sp.Abs(x)),
        lambda x, ctx: torch.log(torch.abs(x)),
        r"\log\left|{x}\right|",
        "log|x|",
        lowering=((sp.log, "log"), (sp.Abs, "abs")),
    ),
    Primitive(
        "sqrt",
        Kind.UNARY,
        lambda x, label: sp.sqrt(sp.Abs(x)),
        lambda x, ctx: torch.sqrt(torch.abs(x)),
        r"\sqrt{{\left|{x}\right|}}",
        "√|x|",
        lowering=((sp.Abs, "abs"),),
    ),
    *(_clip(exponent) for exponent in (5, 4, 3)),
    *(_drop(rate) for rate in ("0.1", "0.3", "0.5")),
    Primitive(
        "sign",
        Kind.UNARY,
        lambda x, label: sp.sign(x),
        lambda x, ctx: torch.sign(x),
        r"\operatorname{{sign}}({x})",
        "sign(x), sign(0) = 0",
        lowering=((sp.sign, "sign"),),
    ),
    # ---- binary functions ----------------------------------------------------------------
    Primitive("add", Kind.BINARY, lambda x, y: x + y, operator.add, "{x} + {y}", "x + y"),
    Primitive("sub", Kind.BINARY, lambda x, y: x - y, operator.sub, "{x} - {y}", "x − y"),
    Primitive("mul", Kind.BINARY, lambda x, y: x * y, operator.mul, "{x} \\cdot {y}", "x · y"),
    Primitive(
        "div",
        Kind.BINARY,
        lambda x, y: x / (y + EPS),
        safe_div,
        r"\frac{{{x}}}{{{y} + \epsilon}}",
        "x / (y + ε)",
    ),
    Primitive("keep", Kind.BINARY, lambda x, y: x, lambda x, y: x, "{x}", "x (keep left)"),
)

BY_TOKEN: dict[str, Primitive] = {primitive.token: primitive for primitive in PRIMITIVES}


def tokens(kind: Kind) -> tuple[str, ...]:
    """The tokens of one kind, in table order (the controller's vocabulary order)."""
    return tuple(primitive.token for primitive in PRIMITIVES if primitive.kind is kind)


OPERANDS = tokens(Kind.OPERAND)
UNARY = tokens(Kind.UNARY)
BINARY = tokens(Kind.BINARY)


def _lowering() -> dict[type[sp.Basic], str]:
    lowering: dict[type[sp.Basic], str] = {}
    for primitive in PRIMITIVES:
        for head, instruction in primitive.lowering:
            if lowering.setdefault(head, instruction) != instruction:
                raise ValueError(
                    f"{primitive.token}: {head.__name__} lowers to {instruction!r}, "
                    f"another row says {lowering[head]!r}"
                )
    return lowering


LOWERING: dict[type[sp.Basic], str] = _lowering()
"""The compiler instruction of each SymPy function class of the canonical form, gathered from
the rows' ``lowering`` (in table order; rows sharing a class agree)."""

SYMBOL_LATEX: dict[sp.Symbol, str] = {
    EPS: r"\epsilon",
    **{
        expression: primitive.latex
        for primitive in PRIMITIVES
        if primitive.kind is Kind.OPERAND and (expression := primitive.sympy(sp.Dummy)).is_Symbol
    },
}
"""How each symbol of the canonical form prints: the ``latex`` of the operand that is that
symbol (``m`` → ``\\hat{m}``), and ε."""
