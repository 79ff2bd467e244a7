r"""``SymbolicOptimizer``: any DSL rule as a ``torch.optim.Optimizer``.

For a rule with update Δ (``Rule.sympy``), every parameter w with gradient g takes the step

.. math::

    m_t = β_1 m_{t-1} + (1-β_1) g_t,\quad v_t = β_2 v_{t-1} + (1-β_2) g_t^2,\quad
    γ_t = β_3 γ_{t-1} + (1-β_3) g_t^3,

    \hat m_t = m_t/(1-β_1^t),\ \hat v_t = v_t/(1-β_2^t),\ \hat γ_t = γ_t/(1-β_3^t),\qquad
    w_t = w_{t-1} - \mathrm{lr}\cdot Δ(g_t, \hat m_t, \hat v_t, \hat γ_t, w_{t-1}, t)

with t counted from 1, β1 = 0.9, β2 = β3 = 0.999, and only the averages Δ reads kept in state.
Δ runs as the straight-line program of :mod:`nos_sym.compile`: per tensor (the reference), on
lists of tensors with ``torch._foreach_*`` (``foreach=True``), or fused by ``torch.compile``
(``compile=True``, cached per rule key); the three agree to round-off.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim.optimizer import Optimizer, _get_scalar_dtype

from nos_sym import primitives as P
from nos_sym.compile import Foreach, Program, optimizer_program, run
from nos_sym.dsl import Rule, as_rule

STATE_NAME = {"m": "exp_avg", "v": "exp_avg_sq", "gamma": "exp_avg_cube"}
"""Optimizer-state key of each running average (torch.optim.Adam's names for m and v)."""

_DECAYS = {"ld": P.linear_decay, "cd": P.cosine_decay, "rd": P.restart_decay}
_BETA = {"m": P.BETA1, "v": P.BETA2, "gamma": P.BETA3}


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


# --------------------------------------------------------------------------------------------
# The functional kernel
# --------------------------------------------------------------------------------------------
def _update_averages(averages: dict[str, Any], grad, foreach: bool) -> None:
    """m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², γ ← β3·γ + (1−β3)·g³, in place."""
    if foreach:
        if "m" in averages:
            torch._foreach_lerp_(averages["m"], grad, 1 - P.BETA1)
        if "v" in averages:
            torch._foreach_mul_(averages["v"], P.BETA2)
            torch._foreach_addcmul_(averages["v"], grad, grad, 1 - P.BETA2)
        if "gamma" in averages:
            torch._foreach_mul_(averages["gamma"], P.BETA3)
            torch._foreach_addcmul_(
                averages["gamma"], torch._foreach_mul(grad, grad), grad, 1 - P.BETA3
            )
        return
    if "m" in averages:
        averages["m"].lerp_(grad, 1 - P.BETA1)
    if "v" in averages:
        averages["v"].mul_(P.BETA2).addcmul_(grad, grad, value=1 - P.BETA2)
    if "gamma" in averages:
        averages["gamma"].mul_(P.BETA3).addcmul_(grad * grad, grad, value=1 - P.BETA3)


def _scalars(program: Program, step: int, total_steps: int | None) -> dict[str, float]:
    """Per-step scalars: bias corrections c = 1/(1 − β^t) and the decays at t."""
    scalars = {f"c_{name}": 1.0 / (1.0 - beta**step) for name, beta in _BETA.items()}
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


def _per_slice(lr: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A 1-D lr of K values viewed as [K, 1, ...] against a stacked [K, ...] parameter."""
    if isinstance(lr, torch.Tensor) and lr.dim() == 1 and param.dim() > 1:
        return lr.view(-1, *([1] * (param.dim() - 1)))
    return lr


def _fused_step(program: Program, param, grad, averages: dict, scalars: dict, draws, lr) -> None:
    """One tensor's whole step (averages, Δ, update): the function ``compile=True`` compiles."""
    _update_averages(averages, grad, foreach=False)
    delta = run(program, {**_leaf_values(grad, param, averages), **scalars}, draws)
    param.sub_(_per_slice(lr, param) * delta)


_COMPILED: dict[str, Any] = {}


def _compiled_step(rule: Rule):
    """``torch.compile`` of :func:`_fused_step` for one rule, cached by its key."""
    if rule.key not in _COMPILED:
        program = optimizer_program(rule.sympy)

        def step(param, grad, averages, scalars, draws, lr):
            _fused_step(program, param, grad, averages, scalars, draws, lr)

        _COMPILED[rule.key] = torch.compile(step, dynamic=None)
    return _COMPILED[rule.key]


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
) -> None:
    """Apply one step of ``rule`` in place: the functional form of :class:`SymbolicOptimizer`.

    ``states`` are per-parameter dicts, filled lazily (``step`` and the averages the rule reads).
    ``lr`` may be a tensor: a 1-D tensor of K learning rates applies slice-wise to parameters
    stacked along their first dimension (K models trained at once).
    """
    rule = as_rule(rule)
    check_total_steps(rule, total_steps)
    program = optimizer_program(rule.sympy)
    for param, state in zip(params, states, strict=True):
        _init_state(state, param, rule)
    for state in states:
        state["step"] += 1
    if compile:
        step_fn = _compiled_step(rule)
    if foreach and not compile and not isinstance(lr, torch.Tensor):
        _foreach_update(program, rule, params, grads, states, lr, total_steps, generator)
        return
    scalar_tensors: dict[tuple, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
    for param, grad, state in zip(params, grads, states, strict=True):
        step = int(state["step"].item())
        averages = {name: state[STATE_NAME[name]] for name in rule.averages}
        draws = [draw.sample(param, step, generator) for draw in program.draws]
        scalars = _scalars(program, step, total_steps)
        if compile:
            # scalars as 0-d tensors, so that new values do not recompile; made once per
            # (step, device, dtype), not once per tensor
            where = (step, param.device, param.dtype)
            if where not in scalar_tensors:
                scalar_tensors[where] = (
                    {name: _zero_dim(value, param) for name, value in scalars.items()},
                    _zero_dim(lr, param),
                )
            step_scalars, step_lr = scalar_tensors[where]
            step_fn(param, grad, averages, step_scalars, draws, step_lr)
            continue
        _update_averages(averages, grad, foreach=False)
        delta = run(program, {**_leaf_values(grad, param, averages), **scalars}, draws)
        _apply(param, delta, lr, foreach=False)


def _foreach_update(program, rule, params, grads, states, lr, total_steps, generator) -> None:
    """The multi-tensor path: tensors grouped by (device, dtype, step), Δ on lists."""
    steps = [int(state["step"].item()) for state in states]
    draws = [
        [draw.sample(p, step, generator) for draw in program.draws]
        for p, step in zip(params, steps, strict=True)
    ]
    groups: dict[tuple, list[int]] = {}
    for index, (param, step) in enumerate(zip(params, steps, strict=True)):
        groups.setdefault((param.device, param.dtype, step), []).append(index)
    for (_, _, step), indices in groups.items():
        group_params = [params[i] for i in indices]
        group_grads = [grads[i] for i in indices]
        averages = {name: [states[i][STATE_NAME[name]] for i in indices] for name in rule.averages}
        _update_averages(averages, group_grads, foreach=True)
        values = {
            **_leaf_values(group_grads, group_params, averages),
            **_scalars(program, step, total_steps),
        }
        group_draws = [[draws[i][k] for i in indices] for k in range(len(program.draws))]
        delta = run(program, values, group_draws, backend=Foreach)
        _apply(group_params, delta, lr, foreach=True)


def _zero_dim(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _init_state(state: dict[str, Any], param: torch.Tensor, rule: Rule) -> None:
    if state:
        return
    state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
    for name in rule.averages:
        state[STATE_NAME[name]] = torch.zeros_like(param, memory_format=torch.preserve_format)


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------
class SymbolicOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` running a DSL rule: w ← w − lr·Δ (see the module docstring).

    Args:
        params: parameters or parameter groups.
        rule: a DSL string (``"m v id sqrt div"``) or a parsed :class:`~nos_sym.Rule`.
        lr: learning rate.
        total_steps: the run's number of steps T, needed by ``ld``, ``cd``, ``rd`` and
            ``anneal_noise`` (t counts from 0 and is clamped at T).
        foreach: use ``torch._foreach_*`` multi-tensor ops. ``None`` picks them on CUDA and the
            per-tensor loop on CPU, where it is faster (its temporaries stay in cache).
        compile: fuse each tensor's step with ``torch.compile`` (kernels cached per rule key;
            compiling costs seconds, so this is for long runs, not for search candidates).
        generator: the ``torch.Generator`` of the random primitives (default: torch's global
            RNG, reproducible under ``torch.manual_seed``).
    """

    def __init__(
        self,
        params: Iterable,
        rule: Rule | str,
        lr: float = 1e-3,
        *,
        total_steps: int | None = None,
        foreach: bool | None = None,
        compile: bool = False,
        generator: torch.Generator | None = None,
    ):
        if not isinstance(lr, float | int) or isinstance(lr, bool) or not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        self.rule = as_rule(rule)
        check_total_steps(self.rule, total_steps)
        self.total_steps = total_steps
        self.generator = generator
        defaults = {
            "lr": lr,
            "foreach": foreach,
            "compile": bool(compile),
            "rule_key": self.rule.key,
        }
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for group in state_dict["param_groups"]:
            if group.get("rule_key", self.rule.key) != self.rule.key:
                raise ValueError(
                    f"this state_dict belongs to another rule (key {group['rule_key'][:12]}…), "
                    f"not to {self.rule.dsl!r}"
                )
        super().load_state_dict(state_dict)

    def _init_group(self, group: dict[str, Any]) -> tuple[list, list, list]:
        params, grads, states = [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise ValueError("SymbolicOptimizer does not support sparse gradients")
            if torch.is_complex(param):
                raise ValueError("SymbolicOptimizer does not support complex parameters")
            params.append(param)
            grads.append(param.grad)
            states.append(self.state[param])
        return params, grads, states

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = self._init_group(group)
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            symbolic_update(
                params,
                grads,
                states,
                rule=self.rule,
                lr=group["lr"],
                total_steps=self.total_steps,
                foreach=foreach,
                compile=group["compile"],
                generator=self.generator,
            )
        return loss
