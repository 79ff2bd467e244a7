r"""``SymbolicOptimizer``: any DSL rule as a ``torch.optim.Optimizer``.

For a rule with update Δ (``Rule.sympy``), every parameter w with gradient g takes the step

.. math::

    m_t = β_1 m_{t-1} + (1-β_1) g_t,\quad v_t = β_2 v_{t-1} + (1-β_2) g_t^2,\quad
    γ_t = β_3 γ_{t-1} + (1-β_3) g_t^3,

    \hat m_t = m_t/(1-β_1^t),\ \hat v_t = v_t/(1-β_2^t),\ \hat γ_t = γ_t/(1-β_3^t),\qquad
    w_t = (1 - \mathrm{lr}\cdot λ)\, w_{t-1} - \mathrm{lr}\cdot Δ(g_t, \hat m_t, \hat v_t,
    \hat γ_t, w_{t-1}, t)

with t counted from 1, by default β1 = 0.9, β2 = β3 = 0.999 and ε = 1e-8 (the DSL's; ``betas=``
and ``eps=`` change them without changing the rule's canonical key), decoupled weight decay
λ = ``weight_decay`` (AdamW's; 0 by default), g negated under ``maximize=True``, and only the
averages Δ reads kept in state. Every hyper-parameter, the rule included, is per parameter group.
Δ runs as the straight-line program of :mod:`nos_sym.compile`: per tensor (the reference: the
whole step, averages to update, one cache-sized chunk of a tensor after the other), on lists of
tensors with ``torch._foreach_*`` (``foreach=True``), fused by ``torch.compile``
(``compile=True``, cached per rule key), or as one generated Triton kernel per group of tensors
(``fused=True`` on CUDA, :mod:`nos_sym.triton_step`); they agree to round-off. On the CPU the
per-tensor path runs large tensors (all of them under ``fused=True``) through the rule's
generated C kernel (:mod:`nos_sym.cpu_step`), bit-identical to its torch operators. The whole
``step()`` may also be compiled (``torch.compile(opt.step)``): t is then read as a tensor, so a
rule without decays or draws compiles once (a ``fused`` group runs the per-tensor path there,
which ``torch.compile`` fuses itself).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import sympy as sp
import torch
from torch.optim.optimizer import Optimizer, _get_scalar_dtype

from nos_sym import cpu_step, triton_step
from nos_sym import primitives as P
from nos_sym.compile import Foreach, Program, bind, optimizer_program, run
from nos_sym.dsl import Rule
from nos_sym.presets import resolve

STATE_NAME = {"m": "exp_avg", "v": "exp_avg_sq", "gamma": "exp_avg_cube"}
"""Optimizer-state key of each running average (torch.optim.Adam's names for m and v)."""

DEFAULT_BETAS = (P.BETA1, P.BETA2, P.BETA3)
"""The DSL's (β1, β2, β3) of m, v and γ."""

_DECAYS = {"ld": P.linear_decay, "cd": P.cosine_decay, "rd": P.restart_decay}
_AVERAGES = ("m", "v", "gamma")


def check_total_steps(rule: Rule, total_steps: int | None) -> None:
    """Raise ``ValueError`` when a rule reads t/T and ``total_steps`` is missing or invalid."""
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0
    ):
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if total_steps is None and rule.needs_total_steps:
        raise ValueError(
            f"rule {rule.dsl!r} uses {', '.join(rule.decay_tokens)}, which needs total_steps "
            "(the run's number of steps T): pass total_steps=..."
        )


def check_betas(betas: Sequence[float]) -> tuple[float, float, float]:
    """(β1, β2, β3) from torch's 2-tuple (β3 = 0.999) or a 3-tuple, each in [0, 1)."""
    betas = tuple(betas)
    if len(betas) == 2:
        betas += (P.BETA3,)
    if len(betas) != 3 or not all(isinstance(b, numbers.Real) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas!r} (expected 2 or 3 numbers in [0, 1))")
    return tuple(float(b) for b in betas)  # type: ignore[return-value]


def _check_lr(lr: float | torch.Tensor) -> None:
    """torch's learning-rate check: a number or a one-element tensor, >= 0."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got {lr.numel()} elements")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real | torch.Tensor) or not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")


def _check_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a number >= 0)")


# --------------------------------------------------------------------------------------------
# The functional kernel
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What a step of one rule at one ε needs, resolved once: its program, the averages it
    reads, and whether t must be a Python int (decays, draws) even under ``torch.compile``."""

    rule: Rule
    eps: float
    program: Program
    averages: tuple[str, ...]
    exact_steps: bool


@dataclass(frozen=True)
class GroupStep:
    """One step of tensors of one device, dtype and step count, as a generated kernel takes it
    (:func:`nos_sym.cpu_step.launch`, :func:`nos_sym.triton_step.launch`): ``averages`` maps
    m/v/gamma to one tensor per parameter, ``draws[i]`` are parameter i's draws in label order,
    ``per_step`` the step's scalars (bias corrections, decays), ``maximize`` whether the
    kernel negates g (the per-tensor path's kernels get g negated already)."""

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    averages: dict[str, Sequence[torch.Tensor]]
    draws: Sequence[Sequence[torch.Tensor]]
    per_step: dict[str, float]
    lr: float
    betas: Sequence[float]
    weight_decay: float
    maximize: bool = False

    @classmethod
    def of(
        cls, indices: Sequence[int], params, grads, averages: dict, draws, **options
    ) -> GroupStep:
        """The step of tensors ``indices`` of the parallel lists ``params``, ``grads``,
        ``averages`` (name → list) and ``draws`` (per parameter)."""
        params, grads, averages, draws = _pick(indices, params, grads, averages, draws)
        return cls(params, grads, averages, draws, **options)


def _pick(indices: Sequence[int], *lists: Sequence | dict) -> tuple:
    """The entries ``indices`` of each of the parallel ``lists``; a dict of such lists (the
    averages by name) gives the dict of their entries."""
    return tuple(
        {key: [values[i] for i in indices] for key, values in each.items()}
        if isinstance(each, dict)
        else [each[i] for i in indices]
        for each in lists
    )


@lru_cache(maxsize=1024)
def _plan(rule: Rule, eps: float) -> _Plan:
    """The plan of ``rule`` with ε = ``eps`` (Δ's ε symbol replaced by the number otherwise)."""
    expr = rule.sympy if eps == P.EPSILON else rule.sympy.xreplace({P.EPS: sp.Float(eps)})
    exact = rule.needs_total_steps or rule.stochastic
    return _Plan(rule, eps, optimizer_program(expr), rule.averages, exact)


def _update_averages(averages: dict[str, Any], grad, betas: Sequence[float], foreach: bool) -> None:
    """m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², γ ← β3·γ + (1−β3)·g³, in place."""
    beta1, beta2, beta3 = betas
    if foreach:
        if "m" in averages:
            torch._foreach_lerp_(averages["m"], grad, 1 - beta1)
        if "v" in averages:
            torch._foreach_mul_(averages["v"], beta2)
            torch._foreach_addcmul_(averages["v"], grad, grad, 1 - beta2)
        if "gamma" in averages:
            torch._foreach_mul_(averages["gamma"], beta3)
            torch._foreach_addcmul_(
                averages["gamma"], torch._foreach_mul(grad, grad), grad, 1 - beta3
            )
        return
    if "m" in averages:
        averages["m"].lerp_(grad, 1 - beta1)
    if "v" in averages:
        averages["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if "gamma" in averages:
        averages["gamma"].mul_(beta3).addcmul_(grad * grad, grad, value=1 - beta3)


def _scalars(program: Program, step, total_steps: int | None, betas: Sequence[float]) -> dict:
    """Per-step scalars: bias corrections c = 1/(1 − β^t) and the decays at t (``step`` an int,
    or a 0-d tensor when compiled without decays)."""
    scalars = {
        f"c_{name}": 1.0 / (1.0 - beta**step) for name, beta in zip(_AVERAGES, betas, strict=True)
    }
    for token, decay in _DECAYS.items():
        if token in program.leaves:
            scalars[token] = decay(step, total_steps)
    return scalars


def _leaf_values(grad, param, averages: dict[str, Any]) -> dict[str, Any]:
    return {"g": grad, "w": param, **{f"{name}_raw": value for name, value in averages.items()}}


def _apply(param, delta, lr, foreach: bool) -> None:
    """w ← w − lr·Δ (``lr`` a float or a tensor broadcast against the leading dimension)."""
    if foreach:
        if isinstance(delta, list):
            torch._foreach_add_(param, delta, alpha=-lr)
        else:
            torch._foreach_add_(param, -lr * delta)
        return
    if isinstance(lr, torch.Tensor):
        param.sub_(_per_slice(lr, param) * delta)
    elif isinstance(delta, torch.Tensor):
        param.add_(delta, alpha=-lr)
    else:
        param.add_(-lr * delta)


def _decay(param, lr, weight_decay: float, foreach: bool) -> None:
    """Decoupled weight decay w ← (1 − lr·λ)·w; nothing at all when λ = 0."""
    if weight_decay == 0:
        return
    if foreach:
        torch._foreach_mul_(param, 1 - lr * weight_decay)
    else:
        param.mul_(_per_slice(1 - lr * weight_decay, param))


def _per_slice(lr, param: torch.Tensor):
    """A 1-D lr of K values viewed as [K, 1, ...] against a stacked [K, ...] parameter."""
    if isinstance(lr, torch.Tensor) and lr.dim() == 1 and param.dim() > 1:
        return lr.view(-1, *([1] * (param.dim() - 1)))
    return lr


def _fused_step(
    program: Program, param, grad, averages: dict, scalars: dict, draws, lr, betas, decay
) -> None:
    """One tensor's whole step (averages, Δ, decay, update): what ``compile=True`` compiles."""
    _update_averages(averages, grad, betas, foreach=False)
    delta = run(program, {**_leaf_values(grad, param, averages), **scalars}, draws)
    if decay is not None:
        param.mul_(_per_slice(decay, param))
    param.sub_(_per_slice(lr, param) * delta)


_COMPILED: dict[tuple[str, float], Any] = {}


def _compiled_step(plan: _Plan):
    """``torch.compile`` of :func:`_fused_step` for one rule and ε, cached by (key, ε)."""
    key = (plan.rule.key, plan.eps)
    if key not in _COMPILED:
        program = plan.program

        def step(param, grad, averages, scalars, draws, lr, betas, decay):
            _fused_step(program, param, grad, averages, scalars, draws, lr, betas, decay)

        _COMPILED[key] = torch.compile(step, dynamic=None)
    return _COMPILED[key]


def symbolic_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict[str, Any]],
    *,
    rule: Rule | str,
    lr: float | torch.Tensor,
    total_steps: int | None = None,
    foreach: bool = False,
    compile: bool = False,
    generator: torch.Generator | None = None,
    betas: Sequence[float] = DEFAULT_BETAS,
    eps: float = P.EPSILON,
    weight_decay: float = 0.0,
    maximize: bool = False,
    fused: bool = False,
) -> None:
    """Apply one step of ``rule`` (a ``Rule``, DSL text or a preset name) in place: the
    functional form of :class:`SymbolicOptimizer`.

    ``states`` are per-parameter dicts, filled lazily (``step`` and the averages the rule reads).
    ``lr`` may be a tensor: a 1-D tensor of K learning rates applies slice-wise to parameters
    stacked along their first dimension (K models trained at once).
    """
    rule = resolve(rule)
    check_total_steps(rule, total_steps)
    plan = _plan(rule, float(eps))
    for param, state in zip(params, states, strict=True):
        _init_state(state, param, plan.averages)
    _update(
        plan, params, grads, [state["step"] for state in states],
        {name: [state[STATE_NAME[name]] for state in states] for name in plan.averages},
        lr=lr, total_steps=total_steps, foreach=foreach, compile=compile, generator=generator,
        betas=check_betas(betas), weight_decay=weight_decay, maximize=maximize, fused=fused,
    )  # fmt: skip


def _update(
    plan: _Plan,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    averages: dict[str, Sequence[torch.Tensor]],
    *,
    lr,
    total_steps: int | None,
    foreach: bool,
    compile: bool,
    generator: torch.Generator | None,
    betas: tuple[float, float, float],
    weight_decay: float,
    maximize: bool,
    fused: bool = False,
) -> None:
    """:func:`symbolic_update` on the tensors of initialised states: ``steps`` (0-d counts) and
    ``averages`` (name → one running average per parameter), parallel to ``params``."""
    program = plan.program
    if steps:
        torch._foreach_add_(list(steps), 1)  # 0-d CPU counts (as torch.optim.Adam's)
    traced = torch.compiler.is_compiling()  # inside torch.compile(opt.step): already compiled
    forced = False  # fused=True on the CPU: the kernel for tensors of any size
    if fused and not traced:
        lr = _one_lr(lr)
        on_cpu: list[int] = []
        others: list[int] = []
        for index, param in enumerate(params):
            (on_cpu if _c_kernel_device(param) else others).append(index)
        if others:
            _fused_update(
                plan, *_pick(others, params, grads, steps, averages), lr, total_steps, generator,
                betas, weight_decay, maximize,
            )  # fmt: skip
        if not on_cpu:
            return
        params, grads, steps, averages = _pick(on_cpu, params, grads, steps, averages)
        forced = True  # every tensor the kernel can take, whatever NOS_SYM_CPU_KERNELS says
    if maximize:
        grads = [-grad for grad in grads]
    if foreach and not compile and not traced and not isinstance(lr, torch.Tensor):
        _foreach_update(
            plan, params, grads, steps, averages, lr, total_steps, generator, betas, weight_decay
        )
        return
    if compile and not traced:
        step_fn = _compiled_step(plan)
    scalar_tensors: dict[tuple, tuple[dict[str, torch.Tensor], torch.Tensor, Any]] = {}
    kernels = not (traced or compile or isinstance(lr, torch.Tensor)) and (
        forced or cpu_step.enabled()
    )
    minimum = 1 if forced else CPU_KERNEL_NUMEL
    generated: dict[tuple, list[int]] = {}  # (kernel, t) → the tensors it steps
    kept_draws: list = [None] * len(params)  # the draws of the tensors a kernel steps
    per_step: dict[int, tuple[dict, Any]] = {}  # t → (its scalars, the program bound to them)
    for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
        own = {name: values[index] for name, values in averages.items()}
        if traced and not plan.exact_steps:
            # t as a float64 tensor (as torch.optim.Adam under torch.compile): one graph for all t
            step = steps[index].to(torch.float64)
            draws: list = []
        else:
            step = int(steps[index].item())
            draws = [draw.sample(param, step, generator) for draw in program.draws]
        if traced:
            scalars = _scalars(program, step, total_steps, betas)
            evaluate = bind(program, scalars)
        else:
            if step not in per_step:
                scalars = _scalars(program, step, total_steps, betas)
                per_step[step] = scalars, bind(program, scalars)
            scalars, evaluate = per_step[step]
        if compile and not traced:
            # scalars as 0-d tensors, so that new values do not recompile; made once per
            # (step, device, dtype), not once per tensor
            where = (step, param.device, param.dtype)
            if where not in scalar_tensors:
                scalar_tensors[where] = (
                    {name: _zero_dim(value, param) for name, value in scalars.items()},
                    _zero_dim(lr, param),
                    None if weight_decay == 0 else _zero_dim(1 - lr * weight_decay, param),
                )
            step_scalars, step_lr, decay = scalar_tensors[where]
            step_fn(param, grad, own, step_scalars, draws, step_lr, betas, decay)
            continue
        kernel = _cpu_kernel(plan, param, grad, own, draws, minimum) if kernels else None
        if kernel is not None:
            generated.setdefault((kernel, step), []).append(index)
            kept_draws[index] = draws
            continue
        # all of the step on one cache-sized chunk, then on the next (a 1-D lr needs the shape)
        pieces = [param, grad, *own.values(), *draws]
        for piece, piece_grad, *rest in _chunked(
            pieces, not traced and not isinstance(lr, torch.Tensor)
        ):
            piece_averages = dict(zip(own, rest[: len(own)], strict=True))
            _torch_step(evaluate, piece, piece_grad, piece_averages, rest[len(own) :],
                        lr=lr, betas=betas, weight_decay=weight_decay)  # fmt: skip
    for (kernel, step), indices in generated.items():
        options = {"lr": lr, "betas": betas, "weight_decay": weight_decay}
        group = GroupStep.of(
            indices, params, grads, averages, kept_draws, per_step=per_step[step][0], **options
        )
        cpu_step.launch(kernel, program, group)


def _torch_step(evaluate, param, grad, averages: dict, draws, *, lr, betas, weight_decay) -> None:
    """The per-tensor path's step of one tensor (or chunk) by torch operators: averages, Δ
    (``evaluate``: the program bound to the step's scalars), decay, update."""
    _update_averages(averages, grad, betas, foreach=False)
    delta = evaluate(_leaf_values(grad, param, averages), draws)
    _decay(param, lr, weight_decay, foreach=False)
    _apply(param, delta, lr, foreach=False)


CPU_KERNEL_NUMEL = 1 << 17
"""Elements from which a CPU tensor's step runs as the rule's generated C kernel
(:mod:`nos_sym.cpu_step`; one chunk of float32): below, the torch operators cost little and a
new rule's compile (a search candidate's small network) would cost more than it saves."""

_CPU_KERNELS: dict[tuple, cpu_step.Kernel | None] = {}


def _cpu_kernel(
    plan: _Plan, param, grad, averages: dict, draws, minimum: int
) -> cpu_step.Kernel | None:
    """The generated kernel for this tensor's step, if it may run it (the caller has checked
    that kernels are enabled and the learning rate is a number): a float32/float64 CPU tensor
    of at least ``minimum`` elements, all its streams contiguous and of its dtype, and the
    rule's :func:`_verified_kernel`."""
    if param.numel() < minimum or param.dtype not in cpu_step.DTYPES or param.device.type != "cpu":
        return None
    streams = [param, grad, *averages.values(), *draws]
    if not all(t.is_contiguous() and t.dtype == param.dtype for t in streams):
        return None
    return _verified_kernel(plan, param.dtype)


def _verified_kernel(plan: _Plan, dtype: torch.dtype) -> cpu_step.Kernel | None:
    """The rule's generated kernel for ``dtype`` if it exists here and agreed with the torch
    path bit for bit on probe tensors (checked once per rule, ε and dtype), else ``None``."""
    key = (plan.rule.key, plan.eps, dtype)
    if key not in _CPU_KERNELS:
        kernel = cpu_step.kernel(plan.program, plan.averages, dtype)
        _CPU_KERNELS[key] = kernel if kernel is not None and _agrees(plan, kernel) else None
    return _CPU_KERNELS[key]


def _agrees(plan: _Plan, kernel: cpu_step.Kernel) -> bool:
    """Whether ``kernel`` and the torch operators give bit-identical parameters and averages
    (any NaN equal to any NaN) on probe tensors of 2,085 elements (whole vectors and a tail;
    zeros, infinities and NaNs among them), at steps 1 and 7 of 10, with and without weight
    decay."""
    generator = torch.Generator().manual_seed(0)

    def probe(nonnegative: bool = False) -> torch.Tensor:
        values = torch.randn(2085, dtype=kernel.dtype, generator=generator)
        values[::97], values[5], values[6], values[7] = 0.0, math.inf, -math.inf, math.nan
        return values.abs() if nonnegative else values

    for step, weight_decay in ((1, 0.0), (7, 0.1)):
        param, grad = probe(), probe()
        averages = {name: probe(name == "v") for name in plan.averages}
        draws = [draw.sample(param, step, generator) for draw in plan.program.draws]
        scalars = _scalars(plan.program, step, 10, DEFAULT_BETAS)
        options = {"lr": 0.01, "betas": DEFAULT_BETAS, "weight_decay": weight_decay}
        expected = [param.clone(), *(a.clone() for a in averages.values())]
        own = dict(zip(averages, expected[1:], strict=True))
        draws_copy = [d.clone() for d in draws]  # the torch path may overwrite its draws
        _torch_step(bind(plan.program, scalars), expected[0], grad, own, draws_copy, **options)
        group = GroupStep.of([0], [param], [grad], {k: [v] for k, v in averages.items()},
                             [draws], per_step=scalars, **options)  # fmt: skip
        cpu_step.launch(kernel, plan.program, group)
        if not all(map(_same_bits, [param, *averages.values()], expected)):
            return False
    return True


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are NaN at the same places and bit-identical elsewhere."""
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(
        a.view(bits).masked_fill(nan, 0), b.view(bits).masked_fill(nan, 0)
    )


CHUNK_BYTES = 1 << 19
"""Bytes per tensor in one chunk of the per-tensor step (131,072 fp32 elements; the fastest of
256 KiB–1 MiB measured): a chunk's streams and temporaries stay in L2. Chunks hold a multiple of
128 elements, so they (and their halves on two threads) start on whole SIMD vectors and an op
whose vector loop and scalar tail round differently (``pow(x, 1.5)``) still treats every element
as the unchunked loop does (the tail is the tensor's last elements in both)."""


def _chunked(tensors: list[torch.Tensor], allowed: bool) -> list[list[torch.Tensor]]:
    """The same-shaped ``tensors`` (a parameter, its gradient, averages and draws) cut into
    chunks of :data:`CHUNK_BYTES`: one list of 1-D views per chunk (in-place updates write
    through), or the whole tensors when not ``allowed``, small or not all contiguous."""
    size = max(128, int(CHUNK_BYTES // tensors[0].element_size()) // 128 * 128)
    numel = tensors[0].numel()
    if not allowed or numel <= size or not all(t.is_contiguous() for t in tensors):
        return [tensors]
    flat = [t.view(-1) for t in tensors]
    return [[t[start : start + size] for t in flat] for start in range(0, numel, size)]


def _step_groups(
    program: Program, params, steps, generator
) -> tuple[list[list[torch.Tensor]], dict[tuple, list[int]]]:
    """Each tensor's draws (made in the per-tensor path's order, so all paths see the same
    numbers), and the tensors' indices grouped by (device, dtype, step)."""
    counts = [int(step.item()) for step in steps]
    draws = [
        [draw.sample(p, count, generator) for draw in program.draws]
        for p, count in zip(params, counts, strict=True)
    ]
    groups: dict[tuple, list[int]] = {}
    for index, (param, count) in enumerate(zip(params, counts, strict=True)):
        groups.setdefault((param.device, param.dtype, count), []).append(index)
    return draws, groups


def _fused_update(
    plan: _Plan, params, grads, steps, averages, lr, total_steps, generator, betas, weight_decay,
    maximize,
) -> None:  # fmt: skip
    """``fused=True`` on CUDA (and CPU tensors under Triton's interpreter): one Triton launch
    per group of tensors of one (device, dtype, step) (:mod:`nos_sym.triton_step`)."""
    draws, groups = _step_groups(plan.program, params, steps, generator)
    for (_, _, count), indices in groups.items():
        per_step = _scalars(plan.program, count, total_steps, betas)
        options = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize}
        group = GroupStep.of(indices, params, grads, averages, draws, per_step=per_step, **options)
        triton_step.launch(plan.program, group)


def _one_lr(lr) -> float:
    """``fused=True``'s learning rate: a number (a one-element tensor read once per step)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("fused=True takes one learning rate, not a tensor of several")
        return lr.item()
    return lr


def _c_kernel_device(param: torch.Tensor) -> bool:
    """Whether ``fused=True`` runs ``param`` in the generated C kernel (a CPU tensor, unless
    Triton's interpreter is on: then the Triton kernel, for its tests)."""
    return param.device.type == "cpu" and not triton_step.interpreted()


def _check_fused(plan: _Plan, params: Sequence[torch.Tensor]) -> None:
    """Raise a one-line error unless ``fused=True`` can run ``params``: the CPU ones in the
    rule's generated C kernel (float32/float64, a kernel that exists here and agrees with the
    torch operators), the others in its Triton kernel (:func:`nos_sym.triton_step.check`)."""
    on_cpu = [param for param in params if _c_kernel_device(param)]
    for dtype in dict.fromkeys(param.dtype for param in on_cpu):
        if dtype not in cpu_step.DTYPES:
            raise RuntimeError(f"fused=True on the CPU supports float32/float64, not {dtype}")
        if _verified_kernel(plan, dtype) is None:
            raise RuntimeError(
                f"fused=True on the CPU: no C kernel for {plan.rule.dsl!r} here (it needs a C "
                "compiler, and torch's MKL for exp, log and sqrt); fused=False gives the same "
                "results"
            )
    others = [param for param in params if not _c_kernel_device(param)]
    if others:
        triton_step.check(others)


def _foreach_update(
    plan: _Plan, params, grads, steps, averages, lr, total_steps, generator, betas, weight_decay
) -> None:
    """The multi-tensor path: tensors grouped by (device, dtype, step), Δ on lists."""
    program = plan.program
    draws, groups = _step_groups(program, params, steps, generator)
    for (_, _, count), indices in groups.items():
        group_params, group_grads, group_averages = _pick(indices, params, grads, averages)
        _update_averages(group_averages, group_grads, betas, foreach=True)
        values = {
            **_leaf_values(group_grads, group_params, group_averages),
            **_scalars(program, count, total_steps, betas),
        }
        group_draws = [[draws[i][k] for i in indices] for k in range(len(program.draws))]
        delta = run(program, values, group_draws, backend=Foreach)
        _decay(group_params, lr, weight_decay, foreach=True)
        _apply(group_params, delta, lr, foreach=True)


def _zero_dim(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _init_state(state: dict[str, Any], param: torch.Tensor, averages: tuple[str, ...]) -> None:
    if state:
        return
    state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
    for name in averages:
        state[STATE_NAME[name]] = torch.zeros_like(param, memory_format=torch.preserve_format)


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------
class SymbolicOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` running a DSL rule: w ← w − lr·Δ (see the module docstring).

    Args:
        params: parameters or parameter groups. A group may carry its own ``"rule"`` (and any
            hyper-parameter below but ``total_steps`` and ``generator``).
        rule: a preset name (``"powersign"``, see :mod:`nos_sym.presets`), a DSL string
            (``"m v id sqrt div"``) or a parsed :class:`~nos_sym.Rule`.
        lr: learning rate (a number or a one-element tensor).
        betas: (β1, β2, β3) of m, v and γ, or torch's (β1, β2) with β3 = 0.999.
        eps: the ε of the rule's ``div``, ``adam`` and ``rmsprop`` (e.g. 1e-4 for pure fp16).
        weight_decay: decoupled weight decay λ: w ← (1 − lr·λ)·w − lr·Δ (AdamW's).
        maximize: maximize the objective (Δ reads −g).
        total_steps: the run's number of steps T, needed by ``ld``, ``cd``, ``rd`` and
            ``anneal_noise`` (t counts from 0 and is clamped at T).
        foreach: use ``torch._foreach_*`` multi-tensor ops. ``None`` picks them on CUDA and the
            per-tensor loop on CPU, where it is faster (it runs each tensor's step in chunks of
            :data:`CHUNK_BYTES`, so its temporaries stay in cache).
        compile: fuse each tensor's step with ``torch.compile`` (kernels cached per rule key;
            compiling costs seconds, so this is for long runs, not for search candidates).
        fused: run each step as one generated kernel per rule (``torch.optim.Adam(fused=True)``'s
            keyword): on CUDA one Triton kernel per group of tensors (:mod:`nos_sym.triton_step`,
            needs the ``triton`` extra; CPU tensors run it too under ``TRITON_INTERPRET=1``), on
            the CPU the rule's C kernel for every contiguous float32/float64 tensor, whatever
            its size (:mod:`nos_sym.cpu_step`; bit-identical to the default path, which uses it
            for large tensors anyway). ``None``/``False``: the other paths.
        generator: the ``torch.Generator`` of the random primitives (default: torch's global
            RNG, reproducible under ``torch.manual_seed``; under DDP give every rank the same
            seed).

    The rule of each group is in its ``"rule"`` entry as DSL text (so in ``repr(opt)`` and in
    ``state_dict()``), next to its canonical key ``"rule_key"``.
    """

    def __init__(
        self,
        params: Iterable,
        rule: Rule | str,
        lr: float | torch.Tensor = 1e-3,
        *,
        betas: Sequence[float] = DEFAULT_BETAS,
        eps: float = P.EPSILON,
        weight_decay: float = 0.0,
        maximize: bool = False,
        total_steps: int | None = None,
        foreach: bool | None = None,
        compile: bool = False,
        generator: torch.Generator | None = None,
        fused: bool | None = None,
    ):
        self.rule = resolve(rule)
        self.total_steps = total_steps
        self.generator = generator
        self._plans: dict[tuple[str, float], _Plan] = {}
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": bool(maximize),
            "foreach": foreach,
            "compile": bool(compile),
            "fused": fused,
            "rule": self.rule.dsl,
            "rule_key": self.rule.key,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its ``"rule"`` (a preset name, DSL text or ``Rule``) defaults to the
        optimizer's, its hyper-parameters are checked."""
        rule = resolve(param_group.get("rule", self.rule))
        group = {**param_group, "rule": rule.dsl, "rule_key": rule.key}
        for name, value in self.defaults.items():
            group.setdefault(name, value)
        check_total_steps(rule, self.total_steps)
        _check_lr(group["lr"])
        group["betas"] = check_betas(group["betas"])
        _check_non_negative("eps", group["eps"])
        _check_non_negative("weight_decay", group["weight_decay"])
        if group["fused"]:
            for other in ("foreach", "compile"):
                if group[other]:
                    raise ValueError(f"`fused` and `{other}` cannot be `True` together.")
        super().add_param_group(group)
        if group["fused"]:
            try:
                _check_fused(self._group_plan(group), group["params"])
            except (ImportError, RuntimeError):
                self.param_groups.pop()  # the optimizer stays as it was
                raise
        self._group_plan(group)  # resolved before any torch.compile traces a step

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(rule=self.rule, total_steps=self.total_steps, generator=self.generator)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling and ``load_state_dict``: groups of older checkpoints get the defaults."""
        super().__setstate__(state)
        self._plans = {}
        for group in self.param_groups:
            for name, value in self.defaults.items():
                group.setdefault(name, value)
            self._group_plan(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; each group must belong to the same rule as the group it replaces.
        Keys a saved group lacks (an older checkpoint) keep the current group's values."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            super().load_state_dict(state_dict)  # torch's error
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            saved_key = saved.get("rule_key")
            if saved_key is None and "rule" in saved:
                saved_key = resolve(saved["rule"]).key
            if saved_key not in (None, group["rule_key"]):
                raise ValueError(
                    f"this state_dict belongs to another rule (key {saved_key[:12]}…), "
                    f"not to {group['rule']!r}"
                )
        filled = [
            {**{k: v for k, v in group.items() if k != "params"}, **saved}
            for group, saved in zip(self.param_groups, saved_groups, strict=True)
        ]
        super().load_state_dict({**state_dict, "param_groups": filled})

    def _group_plan(self, group: dict[str, Any]) -> _Plan:
        key = (group["rule"], group["eps"])
        if key not in self._plans:
            self._plans[key] = _plan(resolve(group["rule"]), float(group["eps"]))
        return self._plans[key]

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        steps: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        exp_avg_cubes: list[torch.Tensor],
    ) -> bool:
        """torch.optim's contract (Adam's): fill the lists with the group's parameters that have
        a gradient, their gradients, step counts and the averages the group's rule reads, states
        created on first use; return whether any is complex (never: refused). ``torch.compile``
        runs this eagerly, so a compiled ``step()`` does not trace the initialisation."""
        averages = self._group_plan(group).averages
        outputs = dict(zip(_AVERAGES, (exp_avgs, exp_avg_sqs, exp_avg_cubes), strict=True))
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise ValueError("SymbolicOptimizer does not support sparse gradients")
            if torch.is_complex(param):
                raise ValueError("SymbolicOptimizer does not support complex parameters")
            state = self.state[param]
            _init_state(state, param, averages)
            params.append(param)
            grads.append(param.grad)
            steps.append(state["step"])
            for name in averages:
                outputs[name].append(state[STATE_NAME[name]])
        return False

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, steps = [], [], []
            averages = {name: [] for name in _AVERAGES}
            self._init_group(group, params, grads, steps, *averages.values())
            if not params:
                continue
            plan = self._group_plan(group)
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            lr = group["lr"]
            _update(
                plan, params, grads, steps, {name: averages[name] for name in plan.averages},
                lr=lr if isinstance(lr, torch.Tensor) else float(lr),
                total_steps=self.total_steps, foreach=foreach, compile=group["compile"],
                generator=self.generator, betas=group["betas"],
                weight_decay=group["weight_decay"], maximize=group["maximize"],
                fused=bool(group["fused"]),
            )  # fmt: skip
        return loss
