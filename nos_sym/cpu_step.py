r"""One generated C kernel per rule: the CPU per-tensor step in one pass over memory.

The per-tensor path of :mod:`nos_sym.symbolic_optim` runs a rule's program one torch operator
at a time, so every temporary crosses memory. For a program and a dtype (float32 or float64),
:func:`kernel` writes one C function that does, element by element and in one pass, what those
operators do:

.. math::

    m \leftarrow \mathrm{lerp}(m, g, 1-β_1),\quad v \leftarrow β_2 v + (1-β_2) g^2,\quad
    γ \leftarrow β_3 γ + (1-β_3) g^3,\quad
    w \leftarrow \mathrm{fma}(Δ(g, m, v, γ, w, \text{draws}),\ -\mathrm{lr},\ d\cdot w)

(d = 1 − lr·λ), every operation rounded as torch's CPU kernel of that operator rounds it, so
that the result is bit-identical to the per-tensor path:

- ``lerp``, ``addcmul`` and ``add(·, alpha=)`` are the fused multiply-adds torch's build makes
  of them, everything else is compiled without contraction (``-ffp-contract=off``);
  :data:`EXPRESSIONS` holds the exact C form of each instruction (x², x³, 1/√x, 1/x, 1/x² as
  torch's ``pow`` special cases);
- ``exp``, ``log`` and √x are, in torch, MKL's vector math (``vm?Exp``, ``vm?Ln``,
  ``vm?Sqrt``, not correctly rounded): the kernel calls the same functions, in torch's library,
  on blocks of :data:`BLOCK` elements (:data:`VML`), between the element loops before and after;
- an instruction with no exact C form whose argument takes finitely many values (a product of
  signs, as PowerSign's :math:`e^{\mathrm{sign}(g)\,\mathrm{sign}(m)}`, times per-step scalars)
  is a look-up of torch's own results for those values instead (:func:`lookups`), cheaper
  than a call;
- anything else (another power of a tensor, bfloat16, a Δ that is a scalar): no kernel.

:mod:`nos_sym.symbolic_optim` also runs each new kernel once against the torch path on probe
tensors and keeps it only if every element agrees bit for bit; else the torch path runs.

Every number — lr, d, the betas, the step's folded scalars (:func:`nos_sym.compile.fold_scalars`)
and the look-ups — comes from a table of float64 at each call, so one compile serves every step
and hyper-parameter. The source is built from instruction names and positions alone (no user
text reaches it), compiled once by the system C compiler (``$CC``, else ``cc``; about 0.1 s) into
a cache directory (``$NOS_SYM_CACHE``, else ``$XDG_CACHE_HOME/nos_sym``, else
``~/.cache/nos_sym``; each file named by the sha256 of its source, the compiler, the flags and
the CPU, and written atomically, so concurrent processes may share it) and loaded with ctypes.
One call covers a list of tensors, its elements split over ``torch.get_num_threads()`` threads
of torch's own OpenMP team (the kernel links the ``libgomp.so.1`` torch has loaded), MKL held
to one thread within each. No compiler, a failed compile or ``NOS_SYM_CPU_KERNELS=0``: no
kernel, the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nos_sym.compile import KERNEL_LEAVES, Program, SingleTensor, fold_scalars, table_scalars

if TYPE_CHECKING:  # symbolic_optim imports this module
    from nos_sym.symbolic_optim import GroupStep

DTYPES = {torch.float32: ("float", "f"), torch.float64: ("double", "")}
"""Parameter dtype → its C type and the suffix of its ``math.h`` functions."""

_STEP_SCALARS = ("neg_lr", "decay", "w1", "b2", "c2", "b3", "c3")
"""The table's first scalars: −lr, 1 − lr·λ, the lerp weight 1 − β1, β2, 1 − β2, β3, 1 − β3."""

POWERS = {
    1.0: "{x}",
    2.0: "({x} * {x})",
    3.0: "({x} * {x} * {x})",
    -0.5: "((T)1 / SQRT({x}))",
    -1.0: "((T)1 / {x})",
    -2.0: "((T)1 / ({x} * {x}))",
}
"""The exponents whose torch ``pow`` is exact arithmetic (its special cases), as C. Not 0.5:
torch's ``sqrt`` is not correctly rounded on the CPU (MKL's vector math: about 1 float32 result
in 7 differs from the C library's), while its ``rsqrt`` is 1/√x correctly rounded."""

MAX_VALUES = 64
"""The most values an argument may take for a look-up."""

EXPRESSIONS: dict[str, Callable[[Sequence[str], object, Callable[[], str]], str | None]] = {
    "add": lambda a, param, scalar: f"({a[0]} + {a[1]})",
    "mul": lambda a, param, scalar: f"({a[0]} * {a[1]})",
    "div": lambda a, param, scalar: f"({a[0]} / {a[1]})",
    "pow": lambda a, param, scalar: POWERS[param].format(x=a[0]) if param in POWERS else None,
    "clip": lambda a, param, scalar: f"CLIP({a[0]}, {scalar()})",
    "abs": lambda a, param, scalar: f"ABS({a[0]})",
    "sign": lambda a, param, scalar: f"(T)((0 < {a[0]}) - ({a[0]} < 0))",
    "exp": lambda a, param, scalar: None,
    "log": lambda a, param, scalar: None,
}
"""Instruction name → its exact C expression from the argument expressions, the instruction's
``param`` and ``scalar()`` (reserves a table scalar for the param and names it); ``None``: no
exact form (a look-up when the argument is discrete). A scalar numerator of ``div`` is torch's
``reciprocal(b)·a`` (see :func:`_source`)."""


PAD = 64
"""Copies of each value when torch computes a look-up: whole SIMD vectors, as in a big tensor."""

MIN_PER_THREAD = 1 << 15
"""The fewest elements a thread of a launch gets (torch's ``GRAIN_SIZE``)."""


def tensor_positions(program: Program) -> set[int]:
    """Instructions whose value is a tensor (they read a tensor leaf or a draw)."""
    tensors: set[int] = set()
    for position, instruction in enumerate(program.instructions):
        leaf = instruction.op == "leaf" and instruction.param in KERNEL_LEAVES
        if leaf or instruction.op == "draw" or set(instruction.args) & tensors:
            tensors.add(position)
    return tensors


def discrete(program: Program) -> dict[int, int]:
    """Tensor instructions that take finitely many values, with a bound on how many (at most
    :data:`MAX_VALUES`): a ``sign`` takes −1, 0, 1, and products and absolute values of signs
    take −1, −0, +0 and 1; any other instruction whose tensor arguments are all discrete takes
    at most the product of their counts (scalar arguments do not count)."""
    tensors = tensor_positions(program)
    counts: dict[int, int] = {}
    signs: set[int] = set()  # values in {−1, 0, 1}
    for position, instruction in enumerate(program.instructions):
        op, args = instruction.op, [arg for arg in instruction.args if arg in tensors]
        if op == "sign" or (
            op in ("mul", "abs") and len(args) == len(instruction.args) and set(args) <= signs
        ):
            counts[position] = 4
            signs.add(position)
        elif position in tensors and args and all(arg in counts for arg in args):
            count = math.prod(counts[arg] for arg in args)
            if count <= MAX_VALUES:
                counts[position] = count
    return counts


def _apply(op: str, inputs: list, param) -> torch.Tensor:
    """Instruction ``op`` by the per-tensor path's own operators (:class:`SingleTensor`)."""
    if op == "div" and not isinstance(inputs[0], torch.Tensor):
        return torch.reciprocal(inputs[1]).mul_(inputs[0])
    if op in ("add", "mul", "div"):
        return SingleTensor.binary(op, inputs[0], inputs[1], False)
    if op == "pow":
        return SingleTensor.pow(inputs[0], param, False)
    if op == "clip":
        return SingleTensor.clip(inputs[0], param, False)
    return SingleTensor.unary(op, inputs[0], False)


def _torch_values(instruction, inputs: list) -> torch.Tensor:
    """``instruction`` on ``inputs`` (1-D tensors of equal length, or floats) by torch, each
    value repeated :data:`PAD` times so that torch's vector loop computes it, as in a big
    tensor."""
    padded = [x.repeat_interleave(PAD) if isinstance(x, torch.Tensor) else x for x in inputs]
    return _apply(instruction.op, padded, instruction.param)[::PAD].clone()


def _zero_sign_matters(instruction, dtype: torch.dtype) -> bool:
    """Whether torch gives ``instruction`` different results on +0 and −0 (a look-up compares
    with ``==``, which does not tell them apart)."""
    results = _torch_values(instruction, [torch.tensor([0.0, -0.0], dtype=dtype)])
    first, second = results.tolist()
    return (first, math.copysign(1.0, first)) != (second, math.copysign(1.0, second)) and not (
        first != first and second != second
    )


@cache
def looked_up(program: Program, dtype: torch.dtype) -> dict[int, int]:
    """The instructions a kernel computes by look-up, with their number of keys: those without
    an exact C form whose one argument is discrete, unless torch tells +0 from −0 there (a
    look-up compares with ``==``, which does not)."""
    counts = discrete(program)
    return {
        position: counts[instruction.args[0]]
        for position, instruction in enumerate(program.instructions)
        if _expression(instruction, ["x"] * len(instruction.args)) is None
        and len(instruction.args) == 1
        and instruction.args[0] in counts
        and not _zero_sign_matters(instruction, dtype)
    }


def lookups(
    program: Program, folded: dict[int, float], dtype: torch.dtype
) -> list[tuple[list[float], list[float]]]:
    """For each instruction of :func:`looked_up`, in program order: its argument's possible
    values (keys: distinct, NaN left out, padded to the count by repeating the last) and
    torch's results on them, at the step whose scalars are ``folded``. Values are computed by
    the per-tensor path's operators on tensors of ``dtype``, over every combination of the
    arguments' values (a superset of what occurs)."""
    counts, table = discrete(program), looked_up(program, dtype)
    tensors = tensor_positions(program)
    values: dict[int, torch.Tensor] = {}
    found = []
    for position, instruction in enumerate(program.instructions):
        if position not in counts:
            continue
        op, args = instruction.op, instruction.args
        if op == "sign" and args[0] not in counts:
            values[position] = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype)
            continue
        sizes = [len(values[arg]) for arg in args if arg in tensors]
        total = inner = math.prod(sizes)
        inputs: list[object] = []
        for arg in args:  # every combination, the first tensor argument varying slowest
            if arg in tensors:
                inner //= len(values[arg])
                column = values[arg].repeat_interleave(inner)
                inputs.append(column.repeat(total // len(column)))
            else:
                inputs.append(folded[arg])
        result = _torch_values(instruction, inputs)
        # distinct (+0 and −0 apart: an exact op after may tell them apart), NaN left out
        keys = list({(k, math.copysign(1.0, k)): k for k in result.tolist() if k == k}.values())
        if counts[position] < len(keys):
            raise AssertionError(f"instruction {position} takes more values than counted")
        values[position] = torch.tensor(keys or [math.nan], dtype=dtype)
        if position in table:
            keys = values[args[0]].tolist()
            results = _torch_values(instruction, [values[args[0]]]).tolist()
            pad = table[position] - len(keys)
            found.append((keys + keys[-1:] * pad, results + results[-1:] * pad))
    return found


def _expression(instruction, arguments: list[str], scalar: Callable[[], str] = lambda: "s"):
    """The exact C form of ``instruction`` (:data:`EXPRESSIONS`), or ``None``."""
    row = EXPRESSIONS.get(instruction.op)
    return None if row is None else row(arguments, instruction.param, scalar)


@dataclass(frozen=True, eq=False)
class Kernel:
    """A compiled step: its C function, dtype, the averages and draws it streams, and where each
    table scalar after :data:`_STEP_SCALARS` comes from (``("folded", i)``: value i of
    :func:`~nos_sym.compile.fold_scalars`; ``("param", i)``: instruction i's param), the
    :func:`lookups` following them; ``vector_math``: the addresses of the MKL functions it
    calls, in order."""

    function: object
    dtype: torch.dtype
    averages: tuple[str, ...]
    draws: int
    scalars: tuple[tuple[str, int], ...]
    vector_math: object

    def table(self, program: Program, per_step: dict[str, float]) -> list[float]:
        """The step's table after :data:`_STEP_SCALARS`: the scalars, then every look-up's keys
        and results."""
        folded = fold_scalars(program, per_step)
        values = table_scalars(program, folded, self.scalars)
        discrete_scalars = tuple(folded[arg] for arg in _discrete_scalars(program))
        for keys, results in _lookups(program, discrete_scalars, self.dtype):
            values += keys + results
        return values


@cache
def _discrete_scalars(program: Program) -> tuple[int, ...]:
    """The scalar arguments of discrete instructions: what a step's look-ups depend on."""
    tensors = tensor_positions(program)
    return tuple(
        arg
        for position in discrete(program)
        for arg in program.instructions[position].args
        if arg not in tensors
    )


@lru_cache(maxsize=256)
def _lookups(program: Program, values: tuple[float, ...], dtype: torch.dtype) -> list:
    """:func:`lookups` at a step whose :func:`_discrete_scalars` are ``values`` (most rules'
    look-ups depend on no scalar, or on one decay: computed once, or once per step)."""
    return lookups(program, dict(zip(_discrete_scalars(program), values, strict=True)), dtype)


_HEADER = """\
#include <math.h>
#include <omp.h>
#include <stdint.h>
#define T {ctype}
#define SQRT sqrt{suffix}
#define ABS fabs{suffix}
#define FMA fma{suffix}
/* torch.clamp(x, -b, b): min(max(x, -b), b), NaN kept */
#define CLIP(x, b) ((((x) < -(b)) ? -(b) : (x)) > (b) ? (b) : (((x) < -(b)) ? -(b) : (x)))
#define BLOCK {block}
/* MKL's vector math as torch calls it: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE */
typedef void (*vml_t)(int, const T *, T *, long long);
typedef int (*mkl_threads_t)(int);
#define VML_MODE 0x140102LL

static void run(int64_t n, const int64_t *numel, void *const *streams, const double *table,
                int64_t begin, int64_t end, void *const *vml)
{{
    const T neg_lr = (T)table[0], decay = (T)table[1], w1 = (T)table[2];
    const T b2 = (T)table[3], c2 = (T)table[4], b3 = (T)table[5], c3 = (T)table[6];
    const int small = ABS(w1) < (T)0.5;
    const T coeff = small ? w1 : w1 - (T)1;
"""

_BLOCKS = """\
    int64_t offset = 0;
    for (int64_t t = 0; t < n; ++t) {{
        const int64_t lo = begin > offset ? begin - offset : 0;
        const int64_t hi = end - offset < numel[t] ? end - offset : numel[t];
        offset += numel[t];
{pointers}
        for (int64_t b = lo; b < hi; b += BLOCK) {{
            const int64_t e = hi - b < BLOCK ? hi : b + BLOCK;
{stages}
        }}
    }}
}}
"""

_PARALLEL = """
/* the elements [begin, end) split over `threads` threads of torch's OpenMP team */
void step(int64_t n, const int64_t *numel, void *const *streams, const double *table,
          int64_t begin, int64_t end, void *const *vml, int threads)
{
    #pragma omp parallel num_threads(threads)
    {
        const int64_t k = omp_get_num_threads(), id = omp_get_thread_num(), size = end - begin;
        run(n, numel, streams, table, begin + size * id / k / 64 * 64,
            id + 1 == k ? end : begin + size * (id + 1) / k / 64 * 64, vml);
    }
}
"""

_UPDATES = {
    # torch's lerp_ (a fused multiply-add from the nearer end); mul_ then addcmul_, whose
    # self + value·t1·t2 torch's build contracts to fma(value·t1, t2, self)
    "m": ["const T m = FMA(coeff, g - m_[i], small ? m_[i] : g);", "m_[i] = m;"],
    "v": ["const T v = FMA(c2 * g, g, v_[i] * b2);", "v_[i] = v;"],
    "gamma": ["const T gamma = FMA(c3 * (g * g), g, gamma_[i] * b3);", "gamma_[i] = gamma;"],
}

VML = {"exp": "Exp", "log": "Ln", "sqrt": "Sqrt"}
"""Instructions torch computes with MKL's vector math on the CPU (``vm?Exp``, ``vm?Ln``,
``vm?Sqrt``; x^0.5 is ``sqrt``): the kernel calls the same functions on blocks of
:data:`BLOCK` elements, so its results are torch's."""

BLOCK = 1024
"""Elements per block: the kernel runs each stage (the loop between two vector-math calls) on a
block, its arrays in L1/L2."""


def _vml_name(instruction) -> str | None:
    if instruction.op == "pow" and instruction.param == 0.5:
        return VML["sqrt"]
    return VML.get(instruction.op)


class _Stages:
    """The element loops of a kernel: stage j runs between vector-math calls j − 1 and j. A
    value is a leaf (loaded from its stream in each stage that reads it), a register of the
    stage that computed it, or an array of the block when a later stage reads it."""

    def __init__(self, averages: tuple[str, ...]):
        self.bodies: list[list[str]] = [[]]
        self.loaded: list[set[str]] = [set()]
        self.home: dict[str, int] = {}  # value name → the stage computing it
        self.arrays: set[str] = set()
        self.calls: list[tuple[str, str]] = []  # per call: (its input array, its output array)
        self.averages = averages

    def use(self, name: str) -> str:
        """``name`` readable in the current stage: loaded, or kept in an array by its stage."""
        stage, body = len(self.bodies) - 1, self.bodies[-1]
        if name in self.loaded[stage] or self.home.get(name) == stage:
            return name
        self.loaded[stage].add(name)
        if name in ("g", "w", *self.averages) or name.startswith("d"):  # a stream (draw d<k>)
            body.append(f"const T {name} = {name}_[i];")  # an average: as stage 0 wrote it
        else:
            if name not in self.arrays:
                self.arrays.add(name)
                self.bodies[self.home[name]].append(f"{name}_k[i - b] = {name};")
            body.append(f"const T {name} = {name}_k[i - b];")
        return name

    def define(self, name: str, lines: list[str]) -> None:
        self.bodies[-1] += lines
        self.home[name] = len(self.bodies) - 1

    def call(self, name: str, argument: str) -> None:
        """Vector-math call ``len(calls)`` on ``argument``: ``name`` is its result, an array."""
        index = len(self.calls)
        self.bodies[-1].append(f"in{index}[i - b] = {self.use(argument)};")
        self.calls.append((f"in{index}", f"{name}_k"))
        self.bodies.append([])
        self.loaded.append(set())
        self.home[name] = -1  # only in its array
        self.arrays.add(name)

    def source(self) -> tuple[list[str], str]:
        """The arrays' declarations and the block's loops and calls."""
        arrays = [f"    T {name}_k[BLOCK];" for name in sorted(self.arrays)]
        arrays += [f"    T in{j}[BLOCK];" for j in range(len(self.calls))]
        loops = []
        for j, body in enumerate(self.bodies):
            lines = "\n".join(f"                {line}" for line in body)
            loops.append(f"            for (int64_t i = b; i < e; ++i) {{\n{lines}\n            }}")
            if j < len(self.calls):
                given, result = self.calls[j]
                loops.append(
                    f"            ((vml_t)vml[{j + 1}])((int)(e - b), {given}, {result}, VML_MODE);"
                )
        return arrays, "\n".join(loops)


def _source(program: Program, averages: tuple[str, ...], dtype: torch.dtype):
    """The kernel's C source, its table scalars (see :class:`Kernel`) and the vector-math
    functions it calls (names without the ``vms``/``vmd`` prefix), or ``None`` when an
    instruction has no exact C form, no look-up and no vector-math function, or Δ is a
    scalar."""
    ctype, suffix = DTYPES[dtype]
    tensors = tensor_positions(program)
    if len(program.instructions) - 1 not in tensors:
        return None
    scalars: list[tuple[str, int]] = []
    names: dict[int, str] = {}
    stages = _Stages(averages)
    functions: list[str] = []

    def table_scalar(source: str, index: int) -> str:
        scalars.append((source, index))
        return f"s{len(scalars) - 1}"

    stages.use("g")
    for name in averages:
        stages.define(name, _UPDATES[name])
    for position, instruction in enumerate(program.instructions):
        op, args = instruction.op, instruction.args
        if op == "leaf" and instruction.param in KERNEL_LEAVES:
            names[position] = KERNEL_LEAVES[instruction.param]
            continue
        if op == "draw":
            names[position] = f"d{instruction.param}"
            continue
        if position not in tensors:
            continue
        for arg in args:
            if arg not in names:
                names[arg] = table_scalar("folded", arg)
        arguments = [stages.use(names[a]) if a in tensors else names[a] for a in args]
        name = names[position] = f"v{position}"
        if op == "div" and args[0] not in tensors:
            expression = f"(((T)1 / {arguments[1]}) * {arguments[0]})"
        else:
            expression = _expression(
                instruction, arguments, lambda p=position: table_scalar("param", p)
            )
        if expression is not None:
            stages.define(name, [f"const T {name} = {expression};"])
        elif position in looked_up(program, dtype):
            # one select per key, the first key's last (a chain of ?: does not vectorize)
            stages.define(name, [f"T {name} = (T)NAN;"] + [
                f"{name} = {arguments[0]} == k{position}_{j} ? r{position}_{j} : {name};"
                for j in reversed(range(looked_up(program, dtype)[position]))
            ])  # fmt: skip
        elif _vml_name(instruction) is not None:
            functions.append(_vml_name(instruction))
            stages.call(name, arguments[0])
        else:
            return None
    result = stages.use(names[len(program.instructions) - 1])
    stages.bodies[-1].append(f"w_[i] = FMA({result}, neg_lr, {stages.use('w')} * decay);")
    declarations = [
        f"    const T s{i} = (T)table[{len(_STEP_SCALARS) + i}];" for i in range(len(scalars))
    ]
    offset = len(_STEP_SCALARS) + len(scalars)
    for position, n in looked_up(program, dtype).items():
        for prefix in ("k", "r"):
            declarations += [
                f"    const T {prefix}{position}_{j} = (T)table[{offset + j}];" for j in range(n)
            ]
            offset += n
    arrays, loops = stages.source()
    rows = ["w", "g", *averages, *(f"d{k}" for k in range(len(program.draws)))]
    pointers = [
        f"        {'' if row in ('w', *averages) else 'const '}T *restrict {row}_ = "
        f"(T *)streams[{index} * n + t];"
        for index, row in enumerate(rows)
    ]
    if functions:  # MKL on one thread within this thread's part, then as it was
        declarations.append("    const int threads = ((mkl_threads_t)vml[0])(1);")
    source = _HEADER.format(ctype=ctype, suffix=suffix, block=BLOCK)
    source += "\n".join(declarations + arrays) + "\n"
    source += _BLOCKS.format(pointers="\n".join(pointers), stages=loops)
    if functions:
        source = source[: source.rindex("}")] + "    ((mkl_threads_t)vml[0])(threads);\n}\n"
    return source + _PARALLEL, tuple(scalars), tuple(functions)


FLAGS = (
    "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
    "-fopenmp", "-fPIC", "-shared",
)  # fmt: skip
"""Compiler flags: no contraction of a·b + c into a fused multiply-add but where the source
says ``FMA`` (torch's rounding); no errno and no trapping, as torch's own build, so that the
loop vectorizes (the results are the same)."""


def enabled() -> bool:
    """Whether generated kernels may run (``NOS_SYM_CPU_KERNELS=0`` turns them off)."""
    return os.environ.get("NOS_SYM_CPU_KERNELS", "1") not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$NOS_SYM_CACHE``, ``$XDG_CACHE_HOME/nos_sym`` or
    ``~/.cache/nos_sym``."""
    if os.environ.get("NOS_SYM_CACHE"):
        return Path(os.environ["NOS_SYM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nos_sym"


@cache
def _compiler() -> tuple[str, str] | None:
    """The C compiler's path and its version text (part of the cache key), or ``None``."""
    path = shutil.which(os.environ.get("CC", "cc"))
    if path is None:
        return None
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path, version


@cache
def _machine() -> str:
    """What ``-march=native`` depends on: the architecture and the CPU's feature flags."""
    try:
        with open("/proc/cpuinfo") as file:
            flags = next((line for line in file if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return platform.machine() + flags


def cache_path(source: str) -> Path:
    """Where the library of ``source`` is kept: named by the sha256 of the source, the compiler
    (path and version), the flags and the CPU."""
    key = "\0".join([source, *(_compiler() or ()), *FLAGS, _machine()])
    return cache_dir() / f"step_{hashlib.sha256(key.encode()).hexdigest()[:32]}.so"


def _compile(source: str, compiler: str, path: Path) -> None:
    """Compile ``source`` into the shared library ``path``: built in a private directory next
    to it and renamed into place (atomic: a concurrent process sees all of it or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        c_file, so_file = Path(scratch) / "step.c", Path(scratch) / "step.so"
        c_file.write_text(source)
        subprocess.run(
            [compiler, *FLAGS, "-o", str(so_file), str(c_file), "-lm"],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        os.replace(so_file, path)


@cache
def _library(source: str):
    """``source`` compiled (or found in :func:`cache_dir`) and loaded; ``None`` if that fails."""
    compiler = _compiler()
    if compiler is None:
        return None
    path = cache_path(source)
    try:
        if not path.exists():
            _compile(source, compiler[0], path)
        try:
            library = ctypes.CDLL(str(path))
        except OSError:  # a damaged file in the cache: compiled anew, once
            _compile(source, compiler[0], path)
            library = ctypes.CDLL(str(path))
        function = library.step
    except (OSError, AttributeError, subprocess.SubprocessError):
        return None
    function.argtypes = [
        ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_double), ctypes.c_int64, ctypes.c_int64,
        ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
    ]  # fmt: skip
    function.restype = None
    return function


@cache
def kernel(program: Program, averages: tuple[str, ...], dtype: torch.dtype) -> Kernel | None:
    """The step kernel of ``program`` (running averages ``averages``) for ``dtype`` parameters,
    or ``None``: no exact C form, no compiler or a failed compile. Not yet checked against the
    torch path (:mod:`nos_sym.symbolic_optim` does that before using it)."""
    if dtype not in DTYPES:
        return None
    generated = _source(program, averages, dtype)
    if generated is None:
        return None
    source, scalars, functions = generated
    addresses = [_vector_math(name, dtype) for name in functions]
    if functions:
        addresses.insert(0, _torch_symbol("MKL_Set_Num_Threads_Local"))
    function = _library(source)
    if function is None or None in addresses:
        return None
    vector_math = (ctypes.c_void_p * max(1, len(addresses)))(*addresses)
    return Kernel(function, dtype, averages, len(program.draws), scalars, vector_math)


def _vector_math(name: str, dtype: torch.dtype) -> int | None:
    """The address of MKL's ``vms<name>``/``vmd<name>`` (where torch's ``exp``, ``log`` and
    ``sqrt`` come from), or ``None``."""
    return _torch_symbol(("vms" if dtype == torch.float32 else "vmd") + name)


@cache
def _torch_symbol(name: str) -> int | None:
    """The address of ``name`` in torch's CPU library, or ``None`` (e.g. a torch without MKL)."""
    library = Path(torch.__file__).parent / "lib" / f"libtorch_cpu{_SUFFIX}"
    try:
        return ctypes.cast(getattr(ctypes.CDLL(str(library)), name), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


_SUFFIX = {"Darwin": ".dylib", "Windows": ".dll"}.get(platform.system(), ".so")


def launch(step: Kernel, program: Program, group: GroupStep) -> None:
    """One step of ``program`` on ``group``: contiguous CPU tensors of ``step.dtype`` with one
    step count (g already negated under ``maximize``), their elements split over
    ``torch.get_num_threads()`` threads."""
    n = len(group.params)
    rows = [group.params, group.grads, *(group.averages[name] for name in step.averages)]
    rows += [[d[k] for d in group.draws] for k in range(step.draws)]
    streams = (ctypes.c_void_p * (len(rows) * n))(*(t.data_ptr() for row in rows for t in row))
    numels = [p.numel() for p in group.params]
    (beta1, beta2, beta3), lr = group.betas, group.lr
    values = [-lr, 1 - lr * group.weight_decay, 1 - beta1, beta2, 1 - beta2, beta3, 1 - beta3]
    values += step.table(program, group.per_step)
    table = (ctypes.c_double * len(values))(*values)
    counts = (ctypes.c_int64 * n)(*numels)
    total = sum(numels)
    threads = max(1, min(torch.get_num_threads(), total // MIN_PER_THREAD))
    step.function(n, counts, streams, table, 0, total, step.vector_math, threads)
