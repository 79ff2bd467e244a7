r"""PowerSign and AddSign (Bello et al., 2017) as ``torch.optim`` optimizers.

Both are faithful to TensorFlow's ``tf.contrib.opt.PowerSignOptimizer`` / ``AddSignOptimizer`` and
their kernels ``ApplyPowerSign`` / ``ApplyAddSign``: one running average ``m`` per parameter,
updated *before* its sign is read, no bias correction, and a sign decay evaluated at the number of
steps already taken. Both scale each coordinate of the gradient by a factor that depends only on
whether the gradient and its running average agree in sign; they differ in the factor:

.. math::
    \text{PowerSign: } \Delta = \text{base}^{\,d(t)\operatorname{sign}(g)\operatorname{sign}(m)}
    \cdot g, \qquad
    \text{AddSign: } \Delta = \bigl(\alpha + d(t)\operatorname{sign}(g)\operatorname{sign}(m)\bigr)
    \cdot g,

and :math:`w \leftarrow w - \text{lr} \cdot \Delta`. The two therefore share one kernel, which
computes the multiplier :math:`h(c + k \, d(t) \operatorname{sign}(g) \operatorname{sign}(m))`
with :math:`h = \exp, c = 0, k = \log \text{base}` for PowerSign and
:math:`h = \mathrm{id}, c = \alpha, k = 1` for AddSign.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import (
    Optimizer,
    ParamsT,
    _default_to_fused_or_foreach,
    _foreach_doc,
    _get_scalar_dtype,
    _get_value,
    _maximize_doc,
    _params_doc,
)

from nos_sym.sign_decay import SignDecay

__all__ = ["AddSign", "PowerSign", "addsign", "powersign"]


class _SignOptimizer(Optimizer):
    """What PowerSign and AddSign share: state, validation, the step loop.

    ``sign_decay`` is an attribute of the optimizer, not a per-group hyper-parameter: the groups
    hold only its ``repr`` (text), so ``state_dict()`` stays plain tensors, numbers and strings,
    loadable with ``torch.load(weights_only=True)`` (also through ``ZeroRedundancyOptimizer``,
    which copies the groups' entries over the callable it was given); construct the optimizer
    with the same ``sign_decay`` before ``load_state_dict``. It is kept by ``copy.deepcopy`` and
    pickling. Groups of older checkpoints get the current defaults of keys they lack.
    """

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        sign_decay: SignDecay | None,
    ) -> None:
        if not defaults["lr"] >= 0.0:
            raise ValueError(f"Invalid learning rate: {defaults['lr']}")
        if not defaults["weight_decay"] >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {defaults['weight_decay']}")
        if not 0.0 <= defaults["beta"] < 1.0:
            raise ValueError(f"Invalid beta parameter: {defaults['beta']}")
        if sign_decay is not None and not callable(sign_decay):
            raise TypeError(
                f"sign_decay must be None or a callable step -> float (see nos_sym.sign_decay), "
                f"got {type(sign_decay).__name__}"
            )
        self.sign_decay = sign_decay
        super().__init__(params, {**defaults, "sign_decay": _describe(sign_decay)})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a ``"sign_decay"`` entry may only repeat the optimizer's (as
        ``ZeroRedundancyOptimizer`` does) and is kept as its description."""
        decay = param_group.get("sign_decay")
        if callable(decay) and decay is not self.sign_decay:
            raise ValueError(
                f"{type(self).__name__} takes one sign_decay for all parameter groups "
                "(the constructor's), not one per group"
            )
        super().add_param_group({**param_group, "sign_decay": _describe(self.sign_decay)})

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "sign_decay": self.sign_decay}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for name, value in self.defaults.items():
                group.setdefault(name, value)
            group["sign_decay"] = _describe(self.sign_decay)

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        state_steps: list[Tensor],
    ) -> None:
        name = type(self).__name__
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{name} does not support sparse gradients")
            if torch.is_complex(p) or torch.is_complex(p.grad):
                raise ValueError(
                    f"{name} does not support complex parameters or gradients "
                    "(sign() of a complex number is not a sign)"
                )
            params_with_grad.append(p)
            grads.append(p.grad)

            state = self.state[p]
            if len(state) == 0:
                # As in torch.optim.Adam: the step count lives on the CPU, so reading it for
                # the sign decay costs no device synchronisation.
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            state_steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params_with_grad: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params_with_grad, grads, exp_avgs, state_steps)
            self._update_group(group, params_with_grad, grads, exp_avgs, state_steps)
        return loss

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        state_steps: list[Tensor],
    ) -> None:
        raise NotImplementedError


class PowerSign(_SignOptimizer):
    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.1,
        base: float = math.e,
        beta: float = 0.9,
        sign_decay: SignDecay | None = None,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        if not 0.0 < base < math.inf:
            raise ValueError(f"Invalid base: {base}")
        defaults = {
            "lr": lr,
            "base": base,
            "beta": beta,
            "foreach": foreach,
            "maximize": maximize,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults, sign_decay)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        state_steps: list[Tensor],
    ) -> None:
        powersign(
            params,
            grads,
            exp_avgs,
            state_steps,
            foreach=group["foreach"],
            lr=float(group["lr"]),
            base=group["base"],
            beta=group["beta"],
            sign_decay=self.sign_decay,
            maximize=group["maximize"],
            weight_decay=group["weight_decay"],
        )


class AddSign(_SignOptimizer):
    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.1,
        alpha: float = 1.0,
        beta: float = 0.9,
        sign_decay: SignDecay | None = None,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        if not math.isfinite(alpha):
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "beta": beta,
            "foreach": foreach,
            "maximize": maximize,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults, sign_decay)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        state_steps: list[Tensor],
    ) -> None:
        addsign(
            params,
            grads,
            exp_avgs,
            state_steps,
            foreach=group["foreach"],
            lr=float(group["lr"]),
            alpha=group["alpha"],
            beta=group["beta"],
            sign_decay=self.sign_decay,
            maximize=group["maximize"],
            weight_decay=group["weight_decay"],
        )


_SHARED_ARGS_DOC = rf"""beta (float, optional): decay rate of the running average :math:`m`
            (default: 0.9)
        sign_decay (Callable[[int], float], optional): :math:`d(t)`, a function of the number
            of steps already taken by the parameter (0 at its first step), e.g.
            :func:`nos_sym.sign_decay.linear`. ``None`` means :math:`d \equiv 1` (default: None)
        {_foreach_doc}
            On the CPU (where None picks the for-loop) the for-loop is also the faster one here.
        {_maximize_doc}
        weight_decay (float, optional): decoupled weight decay :math:`\lambda`: each step first
            multiplies the parameters by :math:`1 - \gamma\lambda` (AdamW's) (default: 0)"""

_DSL_NOTE = r"""The DSL's ``m`` is the *bias-corrected* :math:`\hat m_t = m_t / (1 - \beta^t)`;
    since :math:`\operatorname{sign}(\hat m_t) = \operatorname{sign}(m_t)`, the DSL's ``sign_m``
    is exactly the sign used here."""

PowerSign.__doc__ = rf"""Implements PowerSign (Bello et al., 2017, arXiv:1709.07417).

    Faithful to TensorFlow's ``tf.contrib.opt.PowerSignOptimizer`` (kernel ``ApplyPowerSign``).

    .. math::
       \begin{{aligned}}
            &\textbf{{input}}: \gamma \text{{ (lr)}}, \text{{base}}, \beta, d(\cdot)
                \text{{ (sign\_decay)}}, \theta_0 \text{{ (params)}}                             \\
            &\textbf{{initialize}}: m_0 \leftarrow 0                                             \\
            &\textbf{{for}} \: t = 1 \: \textbf{{to}} \: \ldots \: \textbf{{do}}                 \\
            &\hspace{{5mm}} g_t \leftarrow \pm \nabla_\theta f_t(\theta_{{t-1}})
                \quad (- \text{{ if maximize}})                                                  \\
            &\hspace{{5mm}} m_t \leftarrow \beta m_{{t-1}} + (1 - \beta) g_t                     \\
            &\hspace{{5mm}} \Delta_t \leftarrow \exp\bigl(\log(\text{{base}}) \, d(t - 1)
                \operatorname{{sign}}(g_t) \operatorname{{sign}}(m_t)\bigr) \, g_t              \\
            &\hspace{{5mm}} \theta_t \leftarrow \theta_{{t-1}} - \gamma \Delta_t
       \end{{aligned}}

    The update is :math:`\text{{base}} \cdot g` where gradient and momentum agree in sign,
    :math:`g / \text{{base}}` where they disagree, and :math:`g` where either is 0. With a sign
    decay the multiplier tends to 1 and PowerSign to SGD. Only ``m`` is kept per parameter (half
    of Adam's state).

    In the update-rule DSL (``docs/dsl.md``, :mod:`nos_sym.dsl`), base :math:`e` without decay is
    ``sign_g sign_m id id mul ; o1 g exp id mul``, and with the DSL's decays (``ld`` is
    :func:`~nos_sym.sign_decay.linear`, ``cd`` is :func:`~nos_sym.sign_decay.cosine` with
    ``num_periods=0.5``, ``rd`` is :func:`~nos_sym.sign_decay.restart` with ``num_periods=20``, all
    with ``decay_steps`` = the run's total steps) PowerSign-ld is
    ``sign_g sign_m id id mul ; o1 ld id id mul ; o2 g exp id mul``. Other bases have no DSL form
    (there is no constant :math:`\log \text{{base}}` operand). {_DSL_NOTE}

    Args:
        {_params_doc}
        lr (float, optional): learning rate (default: 0.1)
        base (float, optional): base of the power, > 0 (default: :math:`e`)
        {_SHARED_ARGS_DOC}

    Example:
        >>> from nos_sym import sign_decay
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = PowerSign(model.parameters(), lr=0.1, sign_decay=sign_decay.cosine(1000))
        >>> model(torch.ones(3)).sum().backward()
        >>> opt.step()
    """

AddSign.__doc__ = rf"""Implements AddSign (Bello et al., 2017, arXiv:1709.07417).

    Faithful to TensorFlow's ``tf.contrib.opt.AddSignOptimizer`` (kernel ``ApplyAddSign``).

    .. math::
       \begin{{aligned}}
            &\textbf{{input}}: \gamma \text{{ (lr)}}, \alpha, \beta, d(\cdot)
                \text{{ (sign\_decay)}}, \theta_0 \text{{ (params)}}                             \\
            &\textbf{{initialize}}: m_0 \leftarrow 0                                             \\
            &\textbf{{for}} \: t = 1 \: \textbf{{to}} \: \ldots \: \textbf{{do}}                 \\
            &\hspace{{5mm}} g_t \leftarrow \pm \nabla_\theta f_t(\theta_{{t-1}})
                \quad (- \text{{ if maximize}})                                                  \\
            &\hspace{{5mm}} m_t \leftarrow \beta m_{{t-1}} + (1 - \beta) g_t                     \\
            &\hspace{{5mm}} \Delta_t \leftarrow \bigl(\alpha + d(t - 1)
                \operatorname{{sign}}(g_t) \operatorname{{sign}}(m_t)\bigr) \, g_t              \\
            &\hspace{{5mm}} \theta_t \leftarrow \theta_{{t-1}} - \gamma \Delta_t
       \end{{aligned}}

    The update is :math:`(\alpha + 1) g` where gradient and momentum agree in sign,
    :math:`(\alpha - 1) g` where they disagree (0 with the default :math:`\alpha = 1`), and
    :math:`\alpha g` where either is 0. With a sign decay AddSign tends to SGD with learning rate
    :math:`\gamma \alpha`.

    In the update-rule DSL (``docs/dsl.md``, :mod:`nos_sym.dsl`), :math:`\alpha = 1` without decay
    is ``sign_g sign_m id id mul ; o1 one id id add ; o2 g id id mul``, and AddSign-ld is
    ``sign_g sign_m id id mul ; o1 ld id id mul ; o2 one id id add ; o3 g id id mul``
    (``cd``, ``rd`` likewise; see :class:`PowerSign` for their meaning). {_DSL_NOTE}

    Args:
        {_params_doc}
        lr (float, optional): learning rate (default: 0.1)
        alpha (float, optional): :math:`\alpha`, the constant part of the multiplier (default: 1.0)
        {_SHARED_ARGS_DOC}

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = AddSign(model.parameters(), lr=0.1)
        >>> model(torch.ones(3)).sum().backward()
        >>> opt.step()
    """


def powersign(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    *,
    lr: float,
    base: float,
    beta: float,
    sign_decay: SignDecay | None,
    maximize: bool,
    weight_decay: float = 0.0,
) -> None:
    r"""Functional API that performs the PowerSign update in place.

    See :class:`PowerSign` for details. ``state_steps`` are 0-dim float tensors holding the number
    of steps already taken per parameter; they are incremented.
    """
    _sign_update(
        params,
        grads,
        exp_avgs,
        state_steps,
        foreach=foreach,
        lr=lr,
        beta=beta,
        sign_decay=sign_decay,
        maximize=maximize,
        weight_decay=weight_decay,
        offset=0.0,
        sign_coefficient=math.log(base),
        exponentiate=True,
    )


def addsign(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    *,
    lr: float,
    alpha: float,
    beta: float,
    sign_decay: SignDecay | None,
    maximize: bool,
    weight_decay: float = 0.0,
) -> None:
    r"""Functional API that performs the AddSign update in place.

    See :class:`AddSign` for details. ``state_steps`` are 0-dim float tensors holding the number
    of steps already taken per parameter; they are incremented.
    """
    _sign_update(
        params,
        grads,
        exp_avgs,
        state_steps,
        foreach=foreach,
        lr=lr,
        beta=beta,
        sign_decay=sign_decay,
        maximize=maximize,
        weight_decay=weight_decay,
        offset=alpha,
        sign_coefficient=1.0,
        exponentiate=False,
    )


def _sign_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None,
    lr: float,
    beta: float,
    sign_decay: SignDecay | None,
    maximize: bool,
    weight_decay: float,
    offset: float,
    sign_coefficient: float,
    exponentiate: bool,
) -> None:
    r"""The shared kernel: :math:`\theta \leftarrow (1 - \text{lr} \lambda) \theta - \text{lr}
    \cdot h(x) \cdot g` (:math:`\lambda` = ``weight_decay``) with
    :math:`x = c + k \, d(t) \operatorname{sign}(g) \operatorname{sign}(m)`, after
    :math:`m \leftarrow \beta m + (1 - \beta) g`; :math:`c` is ``offset``, :math:`k` is
    ``sign_coefficient`` and :math:`h` is ``exp`` if ``exponentiate`` else the identity.
    """
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    update = _multi_tensor_sign_update if foreach else _single_tensor_sign_update
    update(
        params,
        grads,
        exp_avgs,
        state_steps,
        lr=lr,
        beta=beta,
        sign_decay=sign_decay,
        maximize=maximize,
        weight_decay=weight_decay,
        offset=offset,
        sign_coefficient=sign_coefficient,
        exponentiate=exponentiate,
    )


def _sign_scale(sign_coefficient: float, sign_decay: SignDecay | None, step: Tensor) -> float:
    """``sign_coefficient * d(t)``, t = the steps already taken (read before incrementing)."""
    if sign_decay is None:
        return sign_coefficient
    return sign_coefficient * sign_decay(int(_get_value(step)))


def _single_tensor_sign_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta: float,
    sign_decay: SignDecay | None,
    maximize: bool,
    weight_decay: float,
    offset: float,
    sign_coefficient: float,
    exponentiate: bool,
) -> None:
    for param, grad, exp_avg, step in zip(params, grads, exp_avgs, state_steps, strict=True):
        if maximize:
            grad = -grad
        sign_scale = _sign_scale(sign_coefficient, sign_decay, step)
        step += 1

        exp_avg.mul_(beta).add_(grad, alpha=1 - beta)

        multiplier = torch.sign(grad).mul_(torch.sign(exp_avg)).mul_(sign_scale)
        if offset != 0.0:
            multiplier.add_(offset)
        if exponentiate:
            multiplier.exp_()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.addcmul_(multiplier, grad, value=-lr)


def _multi_tensor_sign_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta: float,
    sign_decay: SignDecay | None,
    maximize: bool,
    weight_decay: float,
    offset: float,
    sign_coefficient: float,
    exponentiate: bool,
) -> None:
    if len(params) == 0:
        return

    grouped_tensors = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, state_steps]  # type: ignore[list-item]
    )
    for (device_params, device_grads, device_exp_avgs, device_steps), _ in grouped_tensors.values():
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        sign_scales: float | list[float] = (
            sign_coefficient
            if sign_decay is None
            else [_sign_scale(sign_coefficient, sign_decay, step) for step in device_steps]
        )
        torch._foreach_add_(device_steps, 1)

        torch._foreach_mul_(device_exp_avgs, beta)
        torch._foreach_add_(device_exp_avgs, device_grads, alpha=1 - beta)

        multipliers = torch._foreach_sign(device_grads)
        torch._foreach_mul_(multipliers, torch._foreach_sign(device_exp_avgs))
        torch._foreach_mul_(multipliers, sign_scales)
        if offset != 0.0:
            torch._foreach_add_(multipliers, offset)
        if exponentiate:
            torch._foreach_exp_(multipliers)
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)
        torch._foreach_addcmul_(device_params, multipliers, device_grads, -lr)


def _describe(sign_decay: SignDecay | None) -> str | None:
    """What a parameter group records of the optimizer's sign decay: its ``repr``, or None."""
    return None if sign_decay is None else repr(sign_decay)
