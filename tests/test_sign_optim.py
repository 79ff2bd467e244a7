"""PowerSign, AddSign and the sign decays against an independent NumPy reference of TF's kernels.

The reference below is written from TensorFlow's kernels (``ApplyPowerSign``/``ApplyAddSign`` in
``training_ops.cc``) and ``sign_decay.py``, not from nos_sym's code:

    m      <- beta * m + (1 - beta) * g
    update <- exp(log(base) * d(t) * sign(g) * sign(m)) * g      (PowerSign)
    update <- (alpha + d(t) * sign(g) * sign(m)) * g              (AddSign)
    w      <- w - lr * update

with d evaluated at the step count *before* it is incremented (0 at the first step).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable

import numpy as np
import pytest
import torch

from nos_sym import SymbolicOptimizer, sign_decay
from nos_sym.presets import preset
from nos_sym.sign_optim import AddSign, PowerSign, addsign, powersign

# ----------------------------------------------------------------------------- reference


def np_linear(decay_steps: int) -> Callable[[int], float]:
    return lambda t: (decay_steps - min(t, decay_steps)) / decay_steps


def np_cosine(decay_steps: int, periods: float, zero_after: float | None = None):
    def decay(t: int) -> float:
        fraction = 2.0 * periods * min(t, decay_steps) / decay_steps
        if zero_after is not None and fraction >= 2 * zero_after:
            return 0.0
        return 0.5 * (1.0 + np.cos(np.pi * fraction))

    return decay


def np_restart(decay_steps: int, periods: float, zero_after: float | None = None):
    def decay(t: int) -> float:
        s = min(t, decay_steps)
        if zero_after is not None and periods * s / decay_steps >= zero_after:
            return 0.0
        return 0.5 * (1.0 + np.cos(np.pi * np.mod(periods * s, decay_steps) / decay_steps))

    return decay


def reference_trajectory(
    kind: str,
    w0: np.ndarray,
    grads: list[np.ndarray],
    *,
    lrs: list[float],
    beta: float = 0.9,
    base: float = math.e,
    alpha: float = 1.0,
    decay: Callable[[int], float] | None = None,
    maximize: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """TF's update, one step per gradient; returns the final (w, m)."""
    w, m = w0.astype(np.float64).copy(), np.zeros_like(w0, dtype=np.float64)
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True)):
        g = -g if maximize else g
        d = 1.0 if decay is None else decay(t)
        m = m * beta + g * (1 - beta)
        sign_gm = np.sign(g) * np.sign(m)
        if kind == "powersign":
            update = np.exp(np.log(base) * d * sign_gm) * g
        else:
            update = (alpha + d * sign_gm) * g
        w = w - lr * update
    return w, m


def gradient_sequence(steps: int, shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Random gradients with exact zeros (sign 0) and frequent sign changes."""
    rng = np.random.default_rng(seed)
    grads = []
    for _ in range(steps):
        g = rng.normal(size=shape)
        g[rng.random(shape) < 0.15] = 0.0
        grads.append(g)
    return grads


def run_torch(
    optimizer_cls: type[torch.optim.Optimizer],
    w0: np.ndarray,
    grads: list[np.ndarray],
    dtype: torch.dtype = torch.float64,
    **kwargs,
) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    w = torch.tensor(w0, dtype=dtype, requires_grad=True)
    opt = optimizer_cls([w], **kwargs)
    for g in grads:
        w.grad = torch.tensor(g, dtype=dtype)
        opt.step()
    return w.detach(), opt


CASES = {
    "powersign e": ("powersign", {}, None),
    "powersign base 2, linear": ("powersign", {"base": 2.0}, (sign_decay.linear(5), np_linear(5))),
    "powersign base 0.5, cosine 2 periods, zero_after": (
        "powersign",
        {"base": 0.5, "beta": 0.5},
        (sign_decay.cosine(8, 2, zero_after=1.5), np_cosine(8, 2, zero_after=1.5)),
    ),
    "powersign e, restart": (
        "powersign",
        {"lr": 0.05},
        (sign_decay.restart(6, 3), np_restart(6, 3)),
    ),
    "powersign maximize": ("powersign", {"base": 3.0, "maximize": True}, None),
    "addsign 1": ("addsign", {}, None),
    "addsign 0.5, restart zero_after": (
        "addsign",
        {"alpha": 0.5},
        (sign_decay.restart(9, 2, zero_after=1.0), np_restart(9, 2, zero_after=1.0)),
    ),
    "addsign 2, cosine, maximize": (
        "addsign",
        {"alpha": 2.0, "beta": 0.99, "maximize": True},
        (sign_decay.cosine(7), np_cosine(7, 0.5)),
    ),
    "addsign -1, linear": ("addsign", {"alpha": -1.0}, (sign_decay.linear(4), np_linear(4))),
}
OPTIMIZERS = {"powersign": PowerSign, "addsign": AddSign}


# ----------------------------------------------------------------------------- the update rule


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("case", CASES)
def test_matches_tf_reference(case: str, foreach: bool) -> None:
    kind, hyper, decays = CASES[case]
    torch_decay, np_decay = decays if decays else (None, None)
    grads = gradient_sequence(12, (5, 4), seed=len(case))
    w0 = np.random.default_rng(1).normal(size=(5, 4))
    lr = hyper.get("lr", 0.1)  # TF's default learning rate
    w, opt = run_torch(
        OPTIMIZERS[kind], w0, grads, sign_decay=torch_decay, foreach=foreach, **hyper
    )
    np_hyper = {k: v for k, v in hyper.items() if k != "lr"}
    w_ref, m_ref = reference_trajectory(
        kind, w0, grads, lrs=[lr] * len(grads), decay=np_decay, **np_hyper
    )
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-13, atol=1e-15)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert set(state) == {"step", "exp_avg"}
    assert state["step"].item() == len(grads)
    np.testing.assert_allclose(state["exp_avg"].numpy(), m_ref, rtol=1e-13, atol=1e-15)


def test_first_step_by_hand() -> None:
    # m_1 = 0.1 g has the sign of g: PowerSign moves by e*g, AddSign by (1 + 1)*g; where g = 0,
    # both move by 0 (and sign(0) = 0 leaves the multiplier at e^0 = 1 and alpha = 1).
    g = torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64)
    for cls, factor in ((PowerSign, math.e), (AddSign, 2.0)):
        w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        w.grad = g.clone()
        cls([w], lr=0.1).step()
        torch.testing.assert_close(w.detach(), -0.1 * factor * g, rtol=1e-15, atol=0)


def test_disagreeing_signs_by_hand() -> None:
    # After a large positive gradient, a small negative one disagrees with m: PowerSign scales it
    # by 1/base, AddSign by alpha - 1.
    for cls, hyper, factor in ((PowerSign, {"base": 4.0}, 0.25), (AddSign, {"alpha": 3.0}, 2.0)):
        w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = cls([w], lr=1.0, **hyper)
        w.grad = torch.tensor([10.0], dtype=torch.float64)
        opt.step()
        before = w.detach().clone()
        w.grad = torch.tensor([-1.0], dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(w.detach() - before, torch.tensor([factor], dtype=w.dtype))


def test_sign_decay_sees_steps_already_taken() -> None:
    seen: list[int] = []

    def recording_decay(step: int) -> float:
        seen.append(step)
        return 1.0

    w = torch.zeros(2, requires_grad=True)
    opt = PowerSign([w], sign_decay=recording_decay)
    for _ in range(3):
        w.grad = torch.ones(2)
        opt.step()
    assert seen == [0, 1, 2]


def test_functional_api_matches_reference() -> None:
    grads = gradient_sequence(4, (6,), seed=3)
    w0 = np.linspace(-1, 1, 6)
    for kind, function, hyper in (
        ("powersign", powersign, {"base": 2.5}),
        ("addsign", addsign, {"alpha": 0.7}),
    ):
        w = torch.tensor(w0)
        exp_avg, step = torch.zeros(6, dtype=torch.float64), torch.tensor(0.0)
        for g in grads:
            function(
                [w],
                [torch.tensor(g)],
                [exp_avg],
                [step],
                lr=0.3,
                beta=0.8,
                sign_decay=sign_decay.linear(3),
                maximize=False,
                **hyper,
            )
        w_ref, _ = reference_trajectory(
            kind, w0, grads, lrs=[0.3] * 4, beta=0.8, decay=np_linear(3), **hyper
        )
        np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-13)
        assert step.item() == 4


# ----------------------------------------------------------------------------- torch.optim contract


def make_model(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3), torch.nn.Linear(3, 1)
    ).to(dtype)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator, dtype=torch.float64).to(dtype)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


DSL_TOTAL_STEPS = 6
DSL_DECAYS = {
    "": None,
    "-ld": sign_decay.linear(DSL_TOTAL_STEPS),
    "-cd": sign_decay.cosine(DSL_TOTAL_STEPS),
    "-rd": sign_decay.restart(DSL_TOTAL_STEPS, 20),
}


@pytest.mark.parametrize("suffix", DSL_DECAYS)
@pytest.mark.parametrize("cls", [PowerSign, AddSign])
def test_agrees_with_the_dsl_rule(cls: type, suffix: str) -> None:
    # The DSL's sign_m is sign(m-hat) = sign(m): PowerSign (base e) and AddSign (alpha = 1) are
    # exactly the DSL rules, decays included (t from 0, clamped at total_steps).
    rule = preset(cls.__name__.lower() + suffix)
    models = [make_model(), make_model()]
    optimizers = [
        cls(models[0].parameters(), lr=0.05, sign_decay=DSL_DECAYS[suffix]),
        SymbolicOptimizer(models[1].parameters(), rule, lr=0.05, total_steps=DSL_TOTAL_STEPS),
    ]
    for model, optimizer in zip(models, optimizers, strict=True):
        train(model, optimizer, steps=DSL_TOTAL_STEPS + 3, seed=8)
    for ours, dsl in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(ours, dsl, rtol=1e-12, atol=1e-14)


def groups(model: torch.nn.Module) -> list[dict]:
    """Three groups with different learning rates; the last layer gets no gradient (frozen)."""
    first, _, second, third = model
    third.requires_grad_(False)
    return [
        {"params": first.parameters(), "lr": 0.01},
        {"params": second.parameters(), "lr": 0.003},
        {"params": third.parameters()},
    ]


@pytest.mark.parametrize("cls", [PowerSign, AddSign])
def test_foreach_equals_for_loop(cls: type) -> None:
    results = []
    for foreach in (False, True):
        model = make_model()
        opt = cls(groups(model), lr=0.02, sign_decay=sign_decay.cosine(10, 1.5), foreach=foreach)
        train(model, opt, steps=12, seed=1)
        results.append([p.detach().clone() for p in model.parameters()])
    for loop_param, foreach_param in zip(*results, strict=True):
        assert torch.equal(foreach_param, loop_param)


@pytest.mark.parametrize("cls", [PowerSign, AddSign])
def test_param_groups_and_frozen_params(cls: type) -> None:
    model = make_model()
    frozen_before = [p.detach().clone() for p in model[3].parameters()]
    opt = cls(groups(model), lr=0.02)
    train(model, opt, steps=3, seed=2)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.003, 0.02]
    for p, before in zip(model[3].parameters(), frozen_before, strict=True):
        assert torch.equal(p, before)
        assert p not in opt.state  # no state for params that never had a gradient
    assert all(opt.state[p]["step"].item() == 3 for p in model[0].parameters())


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_group_learning_rates_match_reference(foreach: bool) -> None:
    grads = gradient_sequence(5, (3,), seed=4)
    w0 = np.array([0.5, -0.2, 1.0])
    a = torch.tensor(w0, requires_grad=True)
    b = torch.tensor(w0, requires_grad=True)
    opt = AddSign([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.01, foreach=foreach)
    for g in grads:
        a.grad, b.grad = torch.tensor(g), torch.tensor(2 * g)
        opt.step()
    for w, lr, scale in ((a, 0.01, 1), (b, 0.5, 2)):
        ref, _ = reference_trajectory("addsign", w0, [scale * g for g in grads], lrs=[lr] * 5)
        np.testing.assert_allclose(w.detach().numpy(), ref, rtol=1e-13)


def test_grad_none_skips_param_and_its_step_count() -> None:
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    seen: list[int] = []
    opt = PowerSign([a, b], sign_decay=lambda t: seen.append(t) or 1.0)
    a.grad = torch.ones(2)
    opt.step()
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
    b.grad = torch.ones(2)
    seen.clear()
    opt.step()
    assert opt.state[a]["step"].item() == 3 and opt.state[b]["step"].item() == 1
    assert seen == [2, 0]  # each parameter's decay is read at its own step count


def test_zero_grad_then_step_is_a_no_op() -> None:
    model = make_model()
    opt = PowerSign(model.parameters(), lr=0.1)
    train(model, opt, steps=2, seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("cls", [PowerSign, AddSign])
def test_state_dict_resume_is_bit_exact(cls: type) -> None:
    decay = sign_decay.restart(20, 3)
    model = make_model()
    opt = cls(groups(model), lr=0.02, sign_decay=decay)
    train(model, opt, steps=5, seed=4)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, steps=6, seed=5)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain tensors and numbers only
    resumed_model = make_model()
    resumed_opt = cls(groups(resumed_model), lr=0.02, sign_decay=decay)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    train(resumed_model, resumed_opt, steps=6, seed=5)
    for p, q in zip(resumed_model.parameters(), uninterrupted, strict=True):
        assert torch.equal(p, q)


def test_deepcopy_and_pickle_keep_sign_decay() -> None:
    w = torch.zeros(2, requires_grad=True)
    opt = AddSign([w], sign_decay=sign_decay.cosine(100, 2.0))
    w.grad = torch.ones(2)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.sign_decay == sign_decay.cosine(100, 2.0)
        assert next(iter(clone.state.values()))["step"].item() == 1


@pytest.mark.parametrize("cls", [PowerSign, AddSign])
def test_older_state_dicts_get_the_new_defaults(cls: type) -> None:
    """A checkpoint from before weight_decay (and the groups' sign_decay entry) still loads."""
    model = make_model()
    opt = cls(groups(model), lr=0.02, sign_decay=sign_decay.linear(20))
    train(model, opt, steps=3, seed=4)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["weight_decay"], group["sign_decay"]
    expected = [p.detach().clone() for p in copy.deepcopy(model).parameters()]
    train(model, opt, steps=3, seed=5)
    resumed = make_model()
    resumed.load_state_dict(dict(zip(resumed.state_dict(), expected, strict=True)))
    resumed_opt = cls(groups(resumed), lr=0.02, sign_decay=sign_decay.linear(20))
    resumed_opt.load_state_dict(saved)
    assert [g["sign_decay"] for g in resumed_opt.param_groups] == [
        "_LinearDecay(decay_steps=20)"
    ] * 3
    train(resumed, resumed_opt, steps=3, seed=5)
    for p, q in zip(resumed.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("lr", [np.float32(0.1), torch.tensor(0.1)])
def test_learning_rates_of_the_types_torch_accepts(lr) -> None:
    results = []
    for value in (lr, float(lr)):
        w = torch.ones(3, requires_grad=True)
        opt = PowerSign([w], lr=value)
        w.grad = torch.tensor([1.0, -2.0, 0.5])
        opt.step()
        results.append(w.detach())
    assert torch.equal(*results)


def test_lr_scheduler_drives_the_learning_rate() -> None:
    grads = gradient_sequence(6, (4,), seed=6)
    w0 = np.zeros(4)
    w = torch.tensor(w0, requires_grad=True)
    opt = PowerSign([w], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for g in grads:
        lrs.append(opt.param_groups[0]["lr"])
        w.grad = torch.tensor(g)
        opt.step()
        scheduler.step()
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    ref, _ = reference_trajectory("powersign", w0, grads, lrs=lrs)
    np.testing.assert_allclose(w.detach().numpy(), ref, rtol=1e-13)


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_params_follow_adam(dtype: torch.dtype, foreach: bool) -> None:
    # As torch.optim.Adam: the state has the parameter's dtype and the math runs in it.
    grads = gradient_sequence(4, (8,), seed=7)
    w0 = np.linspace(-1, 1, 8)
    w, opt = run_torch(PowerSign, w0, grads, dtype=dtype, lr=0.01, foreach=foreach)
    assert (
        w.dtype == dtype and opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].dtype == dtype
    )
    ref, _ = reference_trajectory("powersign", w0, grads, lrs=[0.01] * 4)
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    np.testing.assert_allclose(w.double().numpy(), ref, rtol=tolerance, atol=tolerance)


# ----------------------------------------------------------------------------- bad input

BAD_ARGUMENTS = [
    (PowerSign, {"lr": -1}, ValueError, "Invalid learning rate: -1"),
    (AddSign, {"lr": float("nan")}, ValueError, "Invalid learning rate: nan"),
    (PowerSign, {"beta": 1.0}, ValueError, "Invalid beta parameter: 1.0"),
    (AddSign, {"beta": -0.1}, ValueError, "Invalid beta parameter: -0.1"),
    (PowerSign, {"base": 0.0}, ValueError, "Invalid base: 0.0"),
    (PowerSign, {"base": -2.0}, ValueError, "Invalid base: -2.0"),
    (PowerSign, {"base": float("inf")}, ValueError, "Invalid base: inf"),
    (AddSign, {"alpha": float("inf")}, ValueError, "Invalid alpha value: inf"),
    (AddSign, {"sign_decay": 0.5}, TypeError, "sign_decay must be None or a callable"),
    (PowerSign, {"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
    (
        AddSign,
        {"params": [{"params": [torch.zeros(1, requires_grad=True)], "sign_decay": abs}]},
        ValueError,
        "one sign_decay for all parameter groups",
    ),
]


@pytest.mark.parametrize(("cls", "kwargs", "error", "message"), BAD_ARGUMENTS)
def test_bad_hyper_parameters(cls: type, kwargs: dict, error: type, message: str) -> None:
    kwargs = {"params": [torch.zeros(1, requires_grad=True)], **kwargs}
    with pytest.raises(error, match=message.replace("(", r"\(")):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [PowerSign, AddSign])
def test_sparse_gradients_are_refused(cls: type) -> None:
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    opt = cls(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=f"{cls.__name__} does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("cls", [PowerSign, AddSign])
def test_complex_parameters_are_refused(cls: type) -> None:
    w = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    w.grad = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(ValueError, match="does not support complex"):
        cls([w]).step()


# ----------------------------------------------------------------------------- sign decays


def half_cosine(x: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * x))


SIGN_DECAY_VALUES = [
    (sign_decay.linear(100), [(0, 1.0), (25, 0.75), (100, 0.0), (250, 0.0)]),
    (sign_decay.cosine(100), [(0, 1.0), (50, 0.5), (100, 0.0), (400, 0.0)]),
    (sign_decay.cosine(100, 1), [(0, 1.0), (50, 0.0), (100, 1.0), (150, 1.0)]),
    # zero_after counts periods: 2 periods over 100 steps, zero from 1 period = step 50 on.
    (sign_decay.cosine(100, 2, zero_after=1), [(25, 0.0), (49, half_cosine(1.96)), (50, 0.0)]),
    (sign_decay.restart(100), [(0, 1.0), (50, 0.5), (99, half_cosine(0.99)), (100, 1.0)]),
    (sign_decay.restart(100, 4), [(10, half_cosine(0.4)), (25, 1.0), (30, half_cosine(0.2))]),
    (sign_decay.restart(100, 4, zero_after=2), [(49, half_cosine(0.96)), (50, 0.0), (999, 0.0)]),
]


@pytest.mark.parametrize(("decay", "values"), SIGN_DECAY_VALUES, ids=repr)
def test_sign_decay_values(decay: Callable[[int], float], values: list[tuple[int, float]]) -> None:
    for step, expected in values:
        assert decay(step) == pytest.approx(expected, abs=1e-15), step


@pytest.mark.parametrize(
    ("decay", "reference"),
    [
        (sign_decay.linear(37), np_linear(37)),
        (sign_decay.cosine(37, 0.5), np_cosine(37, 0.5)),
        (sign_decay.cosine(37, 3.3, zero_after=2.1), np_cosine(37, 3.3, zero_after=2.1)),
        (sign_decay.restart(37, 1), np_restart(37, 1)),
        (sign_decay.restart(37, 7.5, zero_after=4), np_restart(37, 7.5, zero_after=4)),
    ],
    ids=repr,
)
def test_sign_decays_match_tf_formulas(decay, reference) -> None:
    steps = range(0, 80)
    np.testing.assert_allclose([decay(t) for t in steps], [reference(t) for t in steps], atol=1e-14)


def test_sign_decays_are_the_dsl_decay_operands() -> None:
    # docs/dsl.md: ld = 1 - t/T, cd = 0.5 (1 + cos(pi t/T)),
    # rd = 0.5 (1 + cos(pi ((20 t) mod T)/T)), with t clamped at T.
    total = 300
    for t in range(0, 2 * total, 7):
        s = min(t, total)
        assert sign_decay.linear(total)(t) == pytest.approx(1 - s / total, abs=1e-15)
        cd = 0.5 * (1 + math.cos(math.pi * s / total))
        assert sign_decay.cosine(total)(t) == pytest.approx(cd, abs=1e-15)
        rd = 0.5 * (1 + math.cos(math.pi * ((20 * s) % total) / total))
        assert sign_decay.restart(total, 20)(t) == pytest.approx(rd, abs=1e-15)


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (sign_decay.linear, {"decay_steps": 0}, "Invalid decay_steps: 0"),
        (sign_decay.linear, {"decay_steps": -5}, "Invalid decay_steps: -5"),
        (sign_decay.cosine, {"decay_steps": 10.0}, "Invalid decay_steps: 10.0"),
        (sign_decay.restart, {"decay_steps": True}, "Invalid decay_steps: True"),
        (sign_decay.cosine, {"decay_steps": 10, "num_periods": -1}, "Invalid num_periods: -1"),
        (sign_decay.restart, {"decay_steps": 10, "num_periods": math.nan}, "Invalid num_periods"),
        (sign_decay.cosine, {"decay_steps": 10, "zero_after": -0.5}, "Invalid zero_after: -0.5"),
    ],
)
def test_sign_decay_bad_arguments(factory, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


def test_sign_decay_refuses_negative_steps_and_pickles() -> None:
    decay = sign_decay.restart(10, 2, zero_after=1.5)
    with pytest.raises(ValueError, match="Invalid step: -1"):
        decay(-1)
    assert pickle.loads(pickle.dumps(decay)) == decay
