"""From a canonical SymPy expression to torch: a small straight-line program.

``lower(expr)`` turns Δ into a :class:`Program`: one instruction per distinct subexpression
(common subexpressions computed once, so a bank result read twice is one value and one draw).
The program runs on single tensors, on lists of tensors through ``torch._foreach_*`` (the same
instruction names), or under ``torch.compile``. Values are Python floats while they depend only
on per-step scalars (bias corrections, decays), tensors otherwise; a temporary is overwritten in
place at its last use. No ``lambdify``: Add, Mul and Pow are lowered here, every other SymPy
head as the primitives table says (:data:`nos_sym.primitives.LOWERING`: the instruction of each
function class), so a new primitive whose computation is an existing instruction needs nothing
here.

Random draws are made before the program runs, tensor by tensor and, within a tensor, in the
canonical label order, so every path sees the same numbers from the same generator.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import sympy as sp
import torch

from nos_sym import primitives as P

# Raw running averages: m̂ = c_m·m, v̂ = c_v·v, γ̂ = c_gamma·γ with c = 1/(1 − β^t) > 0, so that
# SymPy folds the bias corrections into scalar factors (sign(c·m) = sign(m), √(c·v) = √c·√v).
RAW_AVERAGE = {
    P.M: (sp.Symbol("m_raw", real=True), sp.Symbol("c_m", positive=True)),
    P.V: (sp.Symbol("v_raw", nonnegative=True), sp.Symbol("c_v", positive=True)),
    P.GAMMA: (sp.Symbol("gamma_raw", real=True), sp.Symbol("c_gamma", positive=True)),
}


@dataclass(frozen=True)
class Instruction:
    """``op`` applied to earlier values ``args``; ``param`` is its constant (leaf name, exponent,
    clip bound, draw index or constant value)."""

    op: str
    args: tuple[int, ...] = ()
    param: object = None


@dataclass(frozen=True)
class Draw:
    """A random tensor drawn before the program runs: a keep mask of drop rate ``rate``, or a
    normal of standard deviation ``std(step)``."""

    kind: str  # "mask" | "normal"
    rate: float = 0.0
    anneal: bool = False

    def std(self, step: int) -> float:
        return P.anneal_noise_std(step) if self.anneal else P.NOISE_STD

    def sample(self, like: torch.Tensor, step: int, generator) -> torch.Tensor:
        if self.kind == "mask":
            return P.keep_mask(like, self.rate, generator)
        return P.random_normal(like, self.std(step), generator)


@dataclass(frozen=True)
class Program:
    instructions: tuple[Instruction, ...]
    draws: tuple[Draw, ...]
    last_use: tuple[int, ...]  # index of the last instruction reading each value (-1: none)
    owned: tuple[bool, ...]  # whether the value is a temporary the program may overwrite

    @property
    def leaves(self) -> frozenset[str]:
        return frozenset(i.param for i in self.instructions if i.op == "leaf")


# --------------------------------------------------------------------------------------------
# Lowering
# --------------------------------------------------------------------------------------------
def _constant(expr: sp.Expr) -> float:
    """A real constant as a float; nan for zoo, nan and non-real values."""
    try:
        value = complex(expr.evalf())
    except TypeError:
        return math.nan
    return value.real if value.imag == 0 else math.nan


class _Lowering:
    def __init__(self):
        self.instructions: list[Instruction] = []
        self.memo: dict[sp.Expr, int] = {}
        self.draws: dict[int, Draw] = {}

    def emit(self, op: str, args: tuple[int, ...] = (), param: object = None) -> int:
        self.instructions.append(Instruction(op, args, param))
        return len(self.instructions) - 1

    def fold(self, op: str, indices: list[int]) -> int:
        result = indices[0]
        for index in indices[1:]:
            result = self.emit(op, (result, index))
        return result

    def visit(self, expr: sp.Expr) -> int:
        if expr not in self.memo:
            self.memo[expr] = self.lower(expr)
        return self.memo[expr]

    def lower(self, expr: sp.Expr) -> int:
        if expr == P.EPS:
            return self.emit("const", param=P.EPSILON)
        if expr.is_Symbol:
            return self.emit("leaf", param=expr.name)
        if not expr.free_symbols and not expr.atoms(P.Stochastic):
            return self.emit("const", param=_constant(expr))
        for head, lowering in _LOWERING:
            if isinstance(expr, head):
                return lowering(self, expr)
        raise NotImplementedError(f"no torch lowering for {type(expr).__name__}: {expr}")

    def add(self, expr: sp.Add) -> int:
        tensors, scalars = _split(expr.args)
        return self.fold("add", [self.visit(arg) for arg in tensors + scalars])

    def mul(self, expr: sp.Mul) -> int:
        """Tensor factors first, then one division, then the product of the scalar factors."""
        tensors, scalars = _split(expr.args)
        numerator = [self.visit(f) for f in tensors if not (f.is_Pow and f.exp == -1)]
        denominator = [self.visit(f.base) for f in tensors if f.is_Pow and f.exp == -1]
        scale = [self.visit(factor) for factor in scalars]
        if denominator:
            divisor = self.fold("mul", denominator)
            if numerator:
                numerator = [self.emit("div", (self.fold("mul", numerator), divisor))]
            else:
                numerator = [self.emit("pow", (divisor,), -1.0)]
        return self.fold("mul", numerator + ([self.fold("mul", scale)] if scale else []))

    def pow(self, expr: sp.Pow) -> int:
        if not expr.exp.is_Number:
            raise NotImplementedError(f"symbolic exponent in {expr}")
        return self.emit("pow", (self.visit(expr.base),), float(expr.exp))

    def clip(self, expr: P.Clip) -> int:
        return self.emit("clip", (self.visit(expr.args[0]),), float(expr.args[1]))

    def mask(self, expr: P.Stochastic) -> int:
        """x·mask for drop(x, rate, k): the keep mask is draw k."""
        self.draws[expr.label] = Draw("mask", rate=float(expr.args[1]))
        return self.emit("mul", (self.visit(expr.args[0]), self.emit("draw", param=expr.label)))

    def normal(self, expr: P.Stochastic, anneal: bool = False) -> int:
        """Draw k: N(0, 0.01²), or N(0, 1/(1+t)^0.55) when ``anneal``."""
        self.draws[expr.label] = Draw("normal", anneal=anneal)
        return self.emit("draw", param=expr.label)

    def annealed_normal(self, expr: P.Stochastic) -> int:
        return self.normal(expr, anneal=True)


TENSOR_SYMBOLS = frozenset({P.G, P.M, P.V, P.GAMMA, P.W} | {raw for raw, _ in RAW_AVERAGE.values()})
"""Leaves that are tensors in the optimizer; the other symbols are per-step scalars."""

KERNEL_LEAVES = {"g": "g", "w": "w", "m_raw": "m", "v_raw": "v", "gamma_raw": "gamma"}
"""Tensor leaves of an optimizer program → their variable in a generated kernel
(:mod:`nos_sym.triton_step`, :mod:`nos_sym.cpu_step`); every other leaf is a per-step scalar
read from the kernel's table."""


def _split(args: Sequence[sp.Expr]) -> tuple[list[sp.Expr], list[sp.Expr]]:
    """(tensor-valued, scalar-valued) arguments, so scalars are combined before touching a
    tensor and then applied to it once."""
    tensors = [a for a in args if a.free_symbols & TENSOR_SYMBOLS or a.atoms(P.Stochastic)]
    return tensors, [a for a in args if a not in tensors]


def _elementwise(op: str) -> Callable[[_Lowering, sp.Expr], int]:
    return lambda lowering, expr: lowering.emit(op, (lowering.visit(expr.args[0]),))


_INSTRUCTIONS: dict[str, Callable[[_Lowering, sp.Expr], int]] = {
    "clip": _Lowering.clip,
    "mask": _Lowering.mask,
    "normal": _Lowering.normal,
    "annealed_normal": _Lowering.annealed_normal,
    **{op: _elementwise(op) for op in ("exp", "log", "abs", "sign")},
}
"""What each instruction name of the primitives table's ``lowering`` column emits."""


def _lowering_table() -> tuple[tuple[type, Callable], ...]:
    unknown = sorted(set(P.LOWERING.values()) - set(_INSTRUCTIONS))
    if unknown:
        raise ValueError(f"the primitives table names instructions the compiler lacks: {unknown}")
    return (
        (sp.Add, _Lowering.add),
        (sp.Mul, _Lowering.mul),
        (sp.Pow, _Lowering.pow),
        *((head, _INSTRUCTIONS[name]) for head, name in P.LOWERING.items()),
    )


_LOWERING = _lowering_table()
"""SymPy head → its lowering, tried in order with ``isinstance``."""


def lower(expr: sp.Expr) -> Program:
    """The straight-line program computing ``expr``."""
    lowering = _Lowering()
    lowering.visit(expr)
    instructions = tuple(lowering.instructions)
    last_use = [-1] * len(instructions)
    for position, instruction in enumerate(instructions):
        for arg in instruction.args:
            last_use[arg] = position
    last_use[-1] = len(instructions)  # the result outlives the program
    labels = sorted(lowering.draws)
    if labels != list(range(len(labels))):
        raise AssertionError(f"stochastic labels are not canonical: {labels}")
    return Program(
        instructions=instructions,
        draws=tuple(lowering.draws[label] for label in labels),
        last_use=tuple(last_use),
        owned=tuple(i.op not in ("leaf", "const") for i in instructions),
    )


@cache
def optimizer_program(expr: sp.Expr) -> Program:
    """The program of Δ with the bias corrections folded into scalars (leaves ``m_raw``,
    ``v_raw``, ``gamma_raw`` and scalars ``c_m``, ``c_v``, ``c_gamma``); cached per expression."""
    raw = {symbol: scale * raw_symbol for symbol, (raw_symbol, scale) in RAW_AVERAGE.items()}
    return lower(expr.xreplace(raw))


# --------------------------------------------------------------------------------------------
# Running a program
# --------------------------------------------------------------------------------------------
def _scalar_sign(x: float) -> float:
    return 0.0 if x == 0 or math.isnan(x) else math.copysign(1.0, x)


def _scalar_log(x: float) -> float:
    return math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)


def _scalar_pow(x: float, exponent: float) -> float:
    try:
        return math.pow(x, exponent)
    except (ValueError, ZeroDivisionError):
        return math.inf if x == 0 else math.nan


def _scalar_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


_SCALAR = {
    "add": lambda a, b: a + b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b if b else math.copysign(math.inf, a) if a else math.nan,
    "exp": _scalar_exp,
    "log": _scalar_log,
    "abs": abs,
    "sign": _scalar_sign,
}


class SingleTensor:
    """Instruction implementations on one tensor (``inplace``: the first argument may be
    overwritten)."""

    @staticmethod
    def binary(op: str, a, b, inplace: bool):
        if op == "div" and not isinstance(a, torch.Tensor):
            return torch.reciprocal(b).mul_(a)
        return getattr(a, f"{op}_")(b) if inplace else getattr(torch, op)(a, b)

    @staticmethod
    def unary(op: str, a, inplace: bool):
        return getattr(a, f"{op}_")() if inplace else getattr(torch, op)(a)

    @staticmethod
    def pow(a, exponent: float, inplace: bool):
        named = {2.0: "square", 0.5: "sqrt", -0.5: "rsqrt", -1.0: "reciprocal", 1.0: None}
        if exponent in named:
            return a if named[exponent] is None else SingleTensor.unary(named[exponent], a, inplace)
        return a.pow_(exponent) if inplace else torch.pow(a, exponent)

    @staticmethod
    def clip(a, bound: float, inplace: bool):
        return a.clamp_(-bound, bound) if inplace else torch.clamp(a, -bound, bound)


class Foreach:
    """The same instructions on lists of tensors, through ``torch._foreach_*``."""

    @staticmethod
    def _call(op: str, inplace: bool, *args):
        function = getattr(torch, f"_foreach_{op}_" if inplace else f"_foreach_{op}")
        result = function(*args)
        return args[0] if inplace else list(result)

    @staticmethod
    def binary(op: str, a, b, inplace: bool):
        if op == "div" and not isinstance(a, list):
            return Foreach._call("mul", True, torch._foreach_reciprocal(b), a)
        return Foreach._call(op, inplace, a, b)

    @staticmethod
    def unary(op: str, a, inplace: bool):
        return Foreach._call(op, inplace, a)

    @staticmethod
    def pow(a, exponent: float, inplace: bool):
        named = {2.0: None, 0.5: "sqrt", -1.0: "reciprocal", 1.0: None}
        if exponent == 2.0:
            return Foreach._call("mul", inplace, a, a)
        if exponent in named:
            return a if named[exponent] is None else Foreach._call(named[exponent], inplace, a)
        return Foreach._call("pow", inplace, a, exponent)

    @staticmethod
    def clip(a, bound: float, inplace: bool):
        clamped = Foreach._call("clamp_max", inplace, a, bound)
        return Foreach._call("clamp_min", True, clamped, -bound)


def _is_scalar(value) -> bool:
    return isinstance(value, float | int)


def _broadcasts(a, b) -> bool:
    """Whether ``b`` has more dimensions than ``a`` (then ``a`` cannot hold the result)."""
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and b.dim() > a.dim()


def run(program: Program, values: dict[str, object], draws: Sequence, backend=SingleTensor):
    """Evaluate a program. ``values`` maps leaf names to tensors (or lists of tensors for
    :class:`Foreach`) or floats; ``draws`` are the pre-drawn random values in label order."""
    return bind(program, values, backend)(values, draws)


def bind(
    program: Program, values: dict[str, object], backend=SingleTensor
) -> Callable[[dict[str, object], Sequence], object]:
    """``program`` with its scalar part evaluated once: every instruction whose inputs are all
    floats (the float ``values``: bias corrections, decays) is computed here, and the function
    returned runs the rest on the leaves missing from ``values`` and on the draws it is given,
    which may be any equally shaped pieces of the tensors (:mod:`nos_sym.symbolic_optim` runs
    one cache-sized chunk at a time). ``bind(p, v)(v, d)`` is ``run(p, v, d)``."""
    results: list = [None] * len(program.instructions)
    leaves: list[tuple[int, str]] = []
    drawn: list[tuple[int, int]] = []
    calls: list[tuple[int, str, tuple[int, ...], object, bool]] = []
    scalar = [False] * len(program.instructions)

    def writable(arg: int, position: int) -> bool:
        """Whether instruction ``position`` may overwrite value ``arg`` (its last reader)."""
        return program.owned[arg] and program.last_use[arg] == position and not scalar[arg]

    for position, value in fold_scalars(program, values).items():
        results[position], scalar[position] = value, True
    for position, instruction in enumerate(program.instructions):
        op, args = instruction.op, instruction.args
        if scalar[position]:
            continue
        if op == "leaf" and instruction.param in values:
            results[position] = values[instruction.param]
        elif op == "leaf":
            leaves.append((position, instruction.param))
        elif op == "draw":
            drawn.append((position, instruction.param))
        else:
            # a + b = b + a and a·b = b·a exactly: the scalar goes second, and a temporary
            # first when only it may be overwritten
            if op in ("add", "mul") and (scalar[args[0]] or not writable(args[0], position)):
                args = args[::-1] if scalar[args[0]] or writable(args[1], position) else args
            inplace = writable(args[0], position) and (len(args) == 1 or args[0] != args[1])
            calls.append((position, op, args, instruction.param, inplace))

    def evaluate(tensors: dict[str, object], draws: Sequence):
        values = results.copy()
        for position, name in leaves:
            values[position] = tensors[name]
        for position, label in drawn:
            values[position] = draws[label]
        for position, op, args, param, inplace in calls:
            inputs = [values[arg] for arg in args]
            if inplace and len(inputs) == 2 and _broadcasts(*inputs):
                inplace = False
            if op in ("add", "mul", "div"):
                values[position] = backend.binary(op, inputs[0], inputs[1], inplace)
            elif op == "pow":
                values[position] = backend.pow(inputs[0], param, inplace)
            elif op == "clip":
                values[position] = backend.clip(inputs[0], param, inplace)
            else:
                values[position] = backend.unary(op, inputs[0], inplace)
        return values[-1]

    return evaluate


def fold_scalars(program: Program, values: dict[str, object]) -> dict[int, float]:
    """The value of every instruction computable from floats alone: the constants, the leaves
    whose value in ``values`` is a float (bias corrections, decays), and every instruction whose
    arguments are all such values (e.g. √c_v), by position."""
    folded: dict[int, float] = {}
    for position, instruction in enumerate(program.instructions):
        op, args = instruction.op, instruction.args
        if op == "const":
            folded[position] = instruction.param
        elif op == "leaf":
            if _is_scalar(values.get(instruction.param)):
                folded[position] = values[instruction.param]
        elif op != "draw" and all(arg in folded for arg in args):
            folded[position] = _scalar_op(op, [folded[arg] for arg in args], instruction.param)
    return folded


def table_scalars(
    program: Program, folded: dict[int, float], sources: Sequence[tuple[str, int]]
) -> list[float]:
    """The scalars a generated kernel reads from its table (:mod:`nos_sym.triton_step`,
    :mod:`nos_sym.cpu_step`): for ``("folded", i)`` value i of :func:`fold_scalars`
    (``folded``), for ``("param", i)`` instruction i's param (a clip bound, an exponent)."""
    return [
        folded[index] if source == "folded" else float(program.instructions[index].param)
        for source, index in sources
    ]


def _scalar_op(op: str, inputs: list[float], param) -> float:
    if op == "pow":
        return _scalar_pow(inputs[0], param)
    if op == "clip":
        return min(max(inputs[0], -param), param)
    return _SCALAR[op](*inputs)


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------
def probe_values(probes: int, seed: int) -> dict[str, torch.Tensor]:
    """Fixed random float64 inputs for every leaf symbol of the canonical form."""
    generator = torch.Generator().manual_seed(seed)

    def normal():
        return torch.randn(probes, dtype=torch.float64, generator=generator)

    def uniform():
        return torch.rand(probes, dtype=torch.float64, generator=generator)

    return {
        "g": normal(),
        "m": normal(),
        "v": normal().abs(),
        "gamma": normal(),
        "w": normal(),
        "ld": uniform(),
        "cd": uniform(),
        "rd": uniform(),
    }


def fingerprint(expr: sp.Expr, probes: int = 64, seed: int = 0, digits: int = 6) -> str:
    """sha256 of Δ evaluated on :func:`probe_values`, each value rounded to ``digits``
    significant digits; draw k of the canonical form uses its own generator seeded (seed, k).

    Equal keys always give equal fingerprints (the fingerprint is a function of the canonical
    expression). Different keys may share one: rules equal as functions but not in SymPy's
    canonical form (e.g. ``sign(g)·|g|`` and ``g``), and, rarely, rules that agree on every probe
    or whose values differ by less than the rounding.
    """
    program = lower(expr)
    values = probe_values(probes, seed)
    like = values["g"]
    draws = [
        draw.sample(like, 1, torch.Generator().manual_seed(seed * 1_000_003 + k))
        for k, draw in enumerate(program.draws)
    ]
    result = run(program, {**values}, draws)
    result = torch.as_tensor(result, dtype=torch.float64).expand(probes) + 0.0  # no -0.0
    text = ",".join(f"{value:.{digits - 1}e}" for value in result.tolist())
    return hashlib.sha256(text.encode()).hexdigest()
