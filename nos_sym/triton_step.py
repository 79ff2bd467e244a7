r"""One generated Triton kernel per rule: the whole optimizer step of ``fused=True``.

For a rule's program (:mod:`nos_sym.compile`) and a parameter dtype, :func:`kernel` writes the
source of one ``@triton.jit`` kernel that, for each element of every tensor of a launch, in one
pass over memory,

.. math::

    g \leftarrow \pm g,\quad m \leftarrow m + (1-β_1)(g - m),\quad
    v \leftarrow β_2 v + (1-β_2) g^2,\quad γ \leftarrow β_3 γ + (1-β_3) g^3,\quad
    w \leftarrow d\cdot w - \mathrm{lr}\cdot Δ(g, m, v, γ, w, \text{draws}),

reading g, w, the averages the rule uses and its pre-drawn random tensors, and writing the
averages and w (d = 1 − lr·λ, the decoupled weight decay; −g under ``maximize``). Δ is the
program's tensor instructions as Triton expressions, one row of :data:`EXPRESSIONS` per
instruction name of :mod:`nos_sym.compile` (a new primitive is one row). Every number — lr, d,
the betas, the per-step scalars (bias corrections c_m, c_v, c_γ, decays ld/cd/rd, and every
instruction computed from them and from constants by :func:`nos_sym.compile.fold_scalars`), clip
bounds, non-integer exponents — is read from the launch's table, not written into the source, so
one compile serves every step and every hyper-parameter.

Multi-tensor: one launch per group of tensors of the same device, dtype and step count (as the
``foreach`` path groups them). Its arguments are one int64 table — per tensor its element count
and the addresses of its streams (w, g, averages, draws), then the scalars, each a float64 bit
pattern — and a table of blocks (tensor index, first element): program i runs block i, so
tensors of any sizes share one grid. This works under Triton's interpreter too
(``TRITON_INTERPRET=1``, CPU tensors, the tests), which reads raw addresses from host memory.

Compute dtype: float32 for float16/bfloat16/float32 parameters (averages and w stored back in the
parameter's dtype, as ``torch.optim.Adam(fused=True)``), float64 for float64. Δ matches the
per-tensor path to round-off: the tensor ops round as torch's do (``div_rn``, ``sqrt_rn``;
x^n for an integer n is a product of squarings, x^(n+½) adds a square root), except that on a
GPU ``exp``/``log`` are Triton's fast versions and a non-integer, non-half exponent is
exp2(e·log2 x).

Source and compilation: ``triton.jit`` reads a kernel's source from its file (``inspect``), so
the generated text is written to a file of a private temporary directory (named by its sha256)
and imported. The text is built from the program's instruction names and positions alone
(identifiers ``v<i>``, the fixed expressions below and table offsets); no user text, no number
and no symbol name from a rule reaches it (a leaf outside
:data:`~nos_sym.compile.KERNEL_LEAVES` is a table scalar).
Kernels are cached per (program, dtype, interpreter or not); ``triton`` is imported at the first
kernel, so ``import nos_sym`` never needs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TYPE_CHECKING

import torch

from nos_sym.compile import KERNEL_LEAVES, Program, fold_scalars, table_scalars

if TYPE_CHECKING:  # symbolic_optim imports this module
    from nos_sym.symbolic_optim import GroupStep

BLOCK = 1024
"""Elements per Triton program (one block of one tensor)."""

DTYPES = {
    torch.float16: ("tl.float16", "tl.float32"),
    torch.bfloat16: ("tl.bfloat16", "tl.float32"),
    torch.float32: ("tl.float32", "tl.float32"),
    torch.float64: ("tl.float64", "tl.float64"),
}
"""Parameter dtype → (its Triton type, the compute type)."""

_AVERAGES = ("m", "v", "gamma")
_STEP_SCALARS = ("neg_lr", "decay", "sign", "w1", "one_minus_w1", "b2", "c2", "b3", "c3")
"""The scalars of every kernel, in table order: −lr, 1 − lr·λ, ±1 (maximize), the lerp weight
1 − β1 and β1, β2, 1 − β2, β3, 1 − β3."""

INSTALL_HINT = "fused=True needs triton: pip install 'nos_sym[triton]'"


def _pow(args: Sequence[str], exponent: float, scalar: Callable[[], str]) -> str:
    """x^e: a product of squarings for an integer e, times √x for a half-integer one (as
    torch's pow special-cases x², x³, √x, 1/√x, 1/x), exp2(e·log2 x) otherwise (0, ∞ and nan
    where torch gives them)."""
    (x,) = args
    if not math.isfinite(exponent):
        raise ValueError(f"fused=True: no Triton kernel for the exponent {exponent}")
    twice = 2 * abs(exponent)
    if twice != int(twice):
        return f"tl.exp2({scalar()} * tl.log2({x}))"
    whole, half = divmod(int(twice), 2)
    factors = [f"sqrt({x})"] if half else []
    power, square = whole, x
    while power:
        if power & 1:
            factors.append(square)
        power >>= 1
        if power:
            square = f"({square} * {square})"
    product = " * ".join(factors) or f"tl.where({x} == {x}, 1.0, 1.0).to({x}.dtype)"
    return f"reciprocal({product})" if exponent < 0 else product


def _clip(x: str, bound: str) -> str:
    """x clamped to [−bound, bound], nan kept (as torch.clamp)."""
    return f"tl.clamp({x}, -{bound}, {bound}, propagate_nan=tl.PropagateNan.ALL)"


EXPRESSIONS: dict[str, Callable[[Sequence[str], object, Callable[[], str]], str]] = {
    "add": lambda a, param, scalar: f"{a[0]} + {a[1]}",
    "mul": lambda a, param, scalar: f"{a[0]} * {a[1]}",
    "div": lambda a, param, scalar: f"div({a[0]}, {a[1]})",
    "pow": lambda a, param, scalar: _pow(a, param, scalar),
    "clip": lambda a, param, scalar: _clip(a[0], scalar()),
    "exp": lambda a, param, scalar: f"tl.exp({a[0]})",
    "log": lambda a, param, scalar: f"tl.log({a[0]})",
    "abs": lambda a, param, scalar: f"tl.abs({a[0]})",
    "sign": lambda a, param, scalar: (
        f"tl.where({a[0]} > 0, 1.0, tl.where({a[0]} < 0, -1.0, 0.0)).to({a[0]}.dtype)"
    ),
}
"""Instruction name → its Triton expression, from the argument expressions, the instruction's
``param`` and ``scalar()``, which reserves the next table scalar for the instruction's param
(clip bound, exponent) and names it. ``div``, ``sqrt`` and ``reciprocal`` are the correctly
rounded operations of the compute dtype (:data:`ROUNDED`)."""

ROUNDED = {
    "tl.float32": (
        "tl.math.div_rn(x, y)",
        "tl.sqrt_rn(x)",
        "tl.math.div_rn(tl.where(x == x, 1.0, 1.0), x)",
    ),
    "tl.float64": ("x / y", "tl.sqrt(x)", "1.0 / x"),
}
"""Compute type → div(x, y), sqrt(x), reciprocal(x), correctly rounded (Triton's ``/`` and
``sqrt`` are approximate on float32 GPUs; its ``_rn`` functions exist for float32 only)."""


@dataclass(frozen=True)
class Kernel:
    """A compiled step: the Triton function, the averages and draws it streams, and where each
    of its table scalars comes from (``("folded", i)``: value i of
    :func:`nos_sym.compile.fold_scalars`; ``("param", i)``: instruction i's param)."""

    function: object
    averages: tuple[str, ...]
    draws: int
    scalars: tuple[tuple[str, int], ...]

    def scalar_values(self, program: Program, per_step: dict[str, float]) -> list[float]:
        return table_scalars(program, fold_scalars(program, per_step), self.scalars)


def _source(program: Program, averages: tuple[str, ...], dtype: torch.dtype) -> tuple[str, tuple]:
    """The kernel's source and its table scalars (see :class:`Kernel`)."""
    storage, compute = DTYPES[dtype]
    rows = ["numel", "w", "g", *averages, *(f"d{k}" for k in range(len(program.draws)))]
    tensor = [False] * len(program.instructions)
    scalars: list[tuple[str, int]] = []
    names: dict[int, str] = {}

    def table_scalar(source: str, index: int) -> str:
        scalars.append((source, index))
        return f"s{len(_STEP_SCALARS) + len(scalars) - 1}"

    body = []
    for position, instruction in enumerate(program.instructions):
        op, args = instruction.op, instruction.args
        if op == "leaf" and instruction.param in KERNEL_LEAVES:
            names[position], tensor[position] = KERNEL_LEAVES[instruction.param], True
        elif op == "draw":
            names[position], tensor[position] = f"d{instruction.param}", True
        elif op in ("leaf", "const") or not any(tensor[arg] for arg in args):
            continue  # a per-step scalar: read from the table where a tensor op needs it
        else:
            for arg in args:
                if arg not in names:
                    names[arg] = table_scalar("folded", arg)
            arguments = [names[arg] for arg in args]
            expression = EXPRESSIONS[op](
                arguments, instruction.param, lambda p=position: table_scalar("param", p)
            )
            body.append(f"    v{position} = {expression}")
            names[position], tensor[position] = f"v{position}", True
    result = len(program.instructions) - 1
    if result not in names:
        names[result] = table_scalar("folded", result)
    n_scalars = len(_STEP_SCALARS) + len(scalars)
    division, root, reciprocal = ROUNDED[compute]
    lines = [
        "import triton",
        "import triton.language as tl",
        "",
        "",
        *_helper("div(x, y)", division),
        *_helper("sqrt(x)", root),
        *_helper("reciprocal(x)", reciprocal),
        "@triton.jit(do_not_specialize=['n_tensors', 'n_blocks'])",  # no recompile per count
        "def step(table, blocks, n_tensors, n_blocks, BLOCK: tl.constexpr):",
        "    block = tl.program_id(0)",
        "    t = tl.load(blocks + block)",
        "    offsets = tl.load(blocks + n_blocks + block) + tl.arange(0, BLOCK)",
        "    mask = offsets < tl.load(table + t)",
        f"    base = table + {len(rows)} * n_tensors",
        *(
            f"    s{i} = tl.load(base + {i}).to(tl.float64, bitcast=True).to({compute})"
            for i in range(n_scalars)
        ),
        *(
            f"    {row}_ptr = tl.load(table + {i} * n_tensors + t).to(tl.pointer_type({storage}))"
            for i, row in enumerate(rows)
            if i
        ),
        *(f"    {row} = tl.load({row}_ptr + offsets, mask=mask).to({compute})" for row in rows[1:]),
        "    g = g * s2",
    ]
    update = {
        "m": "    m = tl.where(s3 < 0.5, m + s3 * (g - m), g - (g - m) * s4)",
        "v": "    v = v * s5 + s6 * (g * g)",
        "gamma": "    gamma = gamma * s7 + s8 * (g * g * g)",
    }
    for name in averages:
        lines += [
            update[name],
            f"    tl.store({name}_ptr + offsets, {name}.to({storage}), mask=mask)",
        ]
    lines += body
    lines.append(
        f"    tl.store(w_ptr + offsets, (w * s1 + s0 * {names[result]}).to({storage}), mask=mask)"
    )
    return "\n".join(lines) + "\n", tuple(scalars)


def _helper(signature: str, body: str) -> list[str]:
    return ["@triton.jit", f"def {signature}:", f"    return {body}", "", ""]


_DIRECTORY: list[tempfile.TemporaryDirectory] = []


def _load(source: str):
    """The ``step`` function of ``source``, written to a file and imported (see the module
    docstring)."""
    if not _DIRECTORY:
        _DIRECTORY.append(tempfile.TemporaryDirectory(prefix="nos_sym_triton_"))
    name = f"nos_sym_step_{hashlib.sha256(source.encode()).hexdigest()[:20]}"
    path = os.path.join(_DIRECTORY[0].name, f"{name}.py")
    with open(path, "w") as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.step


def interpreted() -> bool:
    """Whether Triton's interpreter runs kernels (``TRITON_INTERPRET=1``): CPU tensors allowed."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@cache
def kernel(program: Program, averages: tuple[str, ...], dtype: torch.dtype, interpret: bool):
    """The step kernel of ``program`` (whose running averages are ``averages``) for parameters of
    ``dtype``, compiled once per (program, averages, dtype, interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    source, scalars = _source(program, averages, dtype)
    return Kernel(_load(source), averages, len(program.draws), scalars)


def check(params: Sequence[torch.Tensor]) -> None:
    """Raise a one-line error unless ``fused=True`` can run on ``params``: triton installed, CUDA
    tensors (CPU ones under ``TRITON_INTERPRET=1``), a dtype of :data:`DTYPES`."""
    if importlib.util.find_spec("triton") is None:
        raise ImportError(INSTALL_HINT)
    _check_tensors(params)


def _check_tensors(params: Sequence[torch.Tensor]) -> None:
    """:func:`check` without the look-up of triton (every step: :func:`kernel` imports it)."""
    for param in params:
        if not (param.is_cuda or (param.device.type == "cpu" and interpreted())):
            raise RuntimeError(
                f"fused=True needs CUDA tensors and triton (CPU tensors only under "
                f"TRITON_INTERPRET=1); got a {param.device.type} tensor"
            )
        if param.dtype not in DTYPES:
            raise RuntimeError(
                f"fused=True supports float16/bfloat16/float32/float64, not {param.dtype}"
            )


def _bits(value: float) -> int:
    """A float64's bit pattern as a signed int64 (how scalars travel in the table)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


@lru_cache(maxsize=64)
def _blocks(numels: tuple[int, ...], block: int, device: torch.device) -> torch.Tensor:
    """The block table of a launch: every block's tensor index, then its first element."""
    owners = [i for i, n in enumerate(numels) for _ in range(0, n, block)]
    starts = [start for n in numels for start in range(0, n, block)]
    return torch.tensor(owners + starts, dtype=torch.int64, device=device)


def _is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill numel() consecutive places of memory (any dimension
    order: contiguous, channels-last, a transpose)."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _dense(tensor: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when it is laid out in memory as ``layout`` (dense), else a copy so."""
    if tensor.stride() == layout.stride():
        return tensor
    return torch.empty_like(layout).copy_(tensor)


def launch(program: Program, group: GroupStep) -> None:
    """One step of ``program`` on ``group`` (tensors of one device, dtype and step count), in
    one launch. A parameter or average not laid out densely runs on a dense copy that is written
    back."""
    params, grads, averages, draws = group.params, group.grads, group.averages, group.draws
    lr, betas, weight_decay, maximize = group.lr, group.betas, group.weight_decay, group.maximize
    _check_tensors(params)
    names = tuple(name for name in _AVERAGES if name in averages)
    step = kernel(program, names, params[0].dtype, interpreted())
    layouts = [p if _is_dense(p) else p.contiguous() for p in params]
    written = [layouts, *([_dense(a, like) for a, like in zip(averages[n], layouts, strict=True)]
                          for n in names)]  # fmt: skip
    read = [[_dense(g, like) for g, like in zip(grads, layouts, strict=True)]]
    read += [
        [_dense(d[k], like) for d, like in zip(draws, layouts, strict=True)]
        for k in range(step.draws)
    ]
    beta1, beta2, beta3 = betas
    scalars = [-lr, 1 - lr * weight_decay, -1.0 if maximize else 1.0, 1 - beta1, beta1]
    scalars += [beta2, 1 - beta2, beta3, 1 - beta3, *step.scalar_values(program, group.per_step)]
    streams = [written[0], read[0], *written[1:], *read[1:]]
    numels = tuple(p.numel() for p in params)
    table = [*numels, *(t.data_ptr() for stream in streams for t in stream)]
    device = params[0].device
    table = torch.tensor(table + [_bits(s) for s in scalars], dtype=torch.int64, device=device)
    blocks = _blocks(numels, BLOCK, device)
    if blocks.numel():
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            step.function[(blocks.numel() // 2,)](
                table, blocks, len(params), blocks.numel() // 2, BLOCK=BLOCK
            )
    for stream, targets in zip(written, [params, *(averages[n] for n in names)], strict=True):
        for staged, target in zip(stream, targets, strict=True):
            if staged is not target:
                target.copy_(staged)
