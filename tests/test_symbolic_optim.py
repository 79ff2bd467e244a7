"""SymbolicOptimizer: DSL rules as torch optimizers, exactly as docs/dsl.md defines them."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from nos_sym import SymbolicOptimizer, parse, symbolic_update

ADAM = "m v id sqrt div"
SGD = "g g id id keep"
POWERSIGN = "sign_g sign_m id id mul ; o1 g exp id mul"


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(
        dtype
    )


def groups(model, lrs=(0.01, 0.003)):
    return [
        {"params": model[0].parameters(), "lr": lrs[0]},
        {"params": model[2].parameters(), "lr": lrs[1]},
    ]


def train(model, optimizer, steps, seed=1, scheduler=None):
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 6, generator=generator, dtype=dtype)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run_rule(rule, steps=20, dtype=torch.float64, **options):
    model = make_model(dtype)
    return train(model, SymbolicOptimizer(groups(model), rule, **options), steps)


# ---------------------------------------------------------------------------------------------
# Parity with torch.optim
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    ("rule", "reference"),
    [
        (ADAM, torch.optim.Adam),
        ("v g sqrt id keep ; m o1 id id div", torch.optim.Adam),
        (SGD, torch.optim.SGD),
    ],
)
def test_matches_torch_optim_over_many_steps(rule, reference, foreach):
    model = make_model()
    expected = train(model, reference(groups(model)), 200)
    actual = run_rule(rule, steps=200, foreach=foreach)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)


def test_works_with_lr_schedulers():
    model = make_model()
    adam = torch.optim.Adam(groups(model))
    expected = train(model, adam, 30, scheduler=torch.optim.lr_scheduler.StepLR(adam, 7, 0.5))
    model = make_model()
    ours = SymbolicOptimizer(groups(model), ADAM)
    actual = train(model, ours, 30, scheduler=torch.optim.lr_scheduler.StepLR(ours, 7, 0.5))
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# An independent NumPy reference of docs/dsl.md
# ---------------------------------------------------------------------------------------------
def numpy_reference(rule: str, grads: list[np.ndarray], w0: np.ndarray, lr: float, total: int):
    """w after len(grads) steps of ``rule``, evaluated group by group from docs/dsl.md."""
    w = w0.copy()
    m = v = c = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g**2
        c = 0.999 * c + 0.001 * g**3
        mh, vh, ch = m / (1 - 0.9**t), v / (1 - 0.999**t), c / (1 - 0.999**t)
        s = min(t - 1, total)
        operands = {
            "g": g,
            "g2": g**2,
            "g3": g**3,
            "m": mh,
            "v": vh,
            "gamma": ch,
            "sign_g": np.sign(g),
            "sign_m": np.sign(mh),
            "one": np.ones_like(g),
            "w_1e-3": 1e-3 * w,
            "w_1e-1": 1e-1 * w,
            "adam": mh / (np.sqrt(vh) + 1e-8),
            "rmsprop": g / (np.sqrt(vh) + 1e-8),
            "ld": np.full_like(g, 1 - s / total),
            "cd": np.full_like(g, 0.5 * (1 + math.cos(math.pi * s / total))),
            "rd": np.full_like(g, 0.5 * (1 + math.cos(math.pi * ((20 * s) % total) / total))),
        }
        unary = {
            "id": lambda x: x,
            "neg": np.negative,
            "exp": np.exp,
            "log": lambda x: np.log(np.abs(x)),
            "sqrt": lambda x: np.sqrt(np.abs(x)),
            "clip_1e-3": lambda x: np.clip(x, -1e-3, 1e-3),
            "sign": np.sign,
        }
        binary = {
            "add": np.add,
            "sub": np.subtract,
            "mul": np.multiply,
            "div": lambda x, y: x / (y + 1e-8),
            "keep": lambda x, y: x,
        }
        bank = []
        for group in rule.split(";"):
            op1, op2, u1, u2, b = group.split()
            x = bank[int(op1[1:]) - 1] if op1.startswith("o") and op1 != "one" else operands[op1]
            y = bank[int(op2[1:]) - 1] if op2.startswith("o") and op2 != "one" else operands[op2]
            bank.append(binary[b](unary[u1](x), unary[u2](y)))
        w = w - lr * bank[-1]
    return w


REFERENCE_RULES = [
    "gamma g id id add ; o1 rd id id mul",
    "w_1e-3 g id id add ; o1 v id sqrt div",
    "g3 gamma sign clip_1e-3 sub ; o1 cd exp id mul ; o2 g id id mul",
    "sign_g sign_m id id mul ; o1 ld id id mul ; o2 g exp id mul",
    "adam rmsprop id neg add ; w_1e-1 o1 id id sub",
    "g2 m log id mul ; o1 one sqrt id div",
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("rule", REFERENCE_RULES)
def test_agrees_with_an_independent_numpy_reference(rule, foreach):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 7))
    grads = [rng.normal(size=w0.shape) for _ in range(60)]
    expected = numpy_reference(rule, grads, w0, lr=0.01, total=40)
    w = torch.nn.Parameter(torch.tensor(w0))
    optimizer = SymbolicOptimizer([w], rule, lr=0.01, total_steps=40, foreach=foreach)
    for g in grads:
        w.grad = torch.tensor(g)
        optimizer.step()
    np.testing.assert_allclose(w.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The three paths
# ---------------------------------------------------------------------------------------------
PATH_RULES = [
    POWERSIGN,
    ADAM,
    "g g drop_0.1 drop_0.3 sub ; o1 noise id id add",
    "ld g id id mul ; o1 anneal_noise id id add",
    "gamma w_1e-3 clip_1e-3 id add ; o1 rd log id mul",
    "one one id id add",  # a constant update (degenerate, but it must still run)
]


@pytest.mark.parametrize("rule", PATH_RULES)
def test_single_tensor_and_foreach_paths_are_identical(rule):
    torch.manual_seed(3)
    single = run_rule(rule, total_steps=25, foreach=False)
    torch.manual_seed(3)
    multi = run_rule(rule, total_steps=25, foreach=True)
    torch.testing.assert_close(multi, single, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("rule", [POWERSIGN, "g g drop_0.1 id mul ; o1 ld id id add"])
def test_compiled_path_agrees(rule):
    torch.manual_seed(3)
    single = run_rule(rule, steps=6, total_steps=25)
    torch.manual_seed(3)
    fused = run_rule(rule, steps=6, total_steps=25, compile=True)
    torch.testing.assert_close(fused, single, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# State, resume, randomness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "keys"),
    [
        (SGD, {"step"}),
        (POWERSIGN, {"step", "exp_avg"}),
        (ADAM, {"step", "exp_avg", "exp_avg_sq"}),
        ("gamma g id id add", {"step", "exp_avg_cube"}),
    ],
)
def test_state_holds_only_what_the_rule_reads(rule, keys):
    model = make_model()
    optimizer = SymbolicOptimizer(model.parameters(), rule)
    train(model, optimizer, 2)
    assert all(set(state) == keys for state in optimizer.state.values())


@pytest.mark.parametrize("rule", [ADAM, POWERSIGN, "g m drop_0.3 id add ; o1 noise id id add"])
def test_state_dict_resume_is_bit_for_bit(rule):
    torch.manual_seed(0)
    model = make_model()
    optimizer = SymbolicOptimizer(groups(model), rule)
    train(model, optimizer, 10)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy(optimizer.state_dict())  # state_dict() shares the live tensors
    rng = torch.get_rng_state()
    expected = train(model, optimizer, 10, seed=2)

    resumed_model = make_model(seed=9)
    resumed_model.load_state_dict(saved_model)
    resumed = SymbolicOptimizer(groups(resumed_model), rule)
    resumed.load_state_dict(saved)
    torch.set_rng_state(rng)
    assert torch.equal(train(resumed_model, resumed, 10, seed=2), expected)


def test_loading_another_rules_state_is_an_error():
    model = make_model()
    saved = SymbolicOptimizer(model.parameters(), ADAM).state_dict()
    with pytest.raises(ValueError, match="another rule"):
        SymbolicOptimizer(model.parameters(), POWERSIGN).load_state_dict(saved)


def test_stochastic_rules_are_reproducible_and_draws_independent():
    rule = "g g drop_0.5 drop_0.5 sub"
    torch.manual_seed(5)
    first = run_rule(rule)
    torch.manual_seed(5)
    assert torch.equal(run_rule(rule), first)
    assert not torch.equal(first, run_rule("g g id id keep", steps=0))  # the draws differ
    generator = torch.Generator().manual_seed(1)
    a = run_rule(rule, generator=generator)
    assert torch.equal(a, run_rule(rule, generator=torch.Generator().manual_seed(1)))


def test_params_without_grad_are_skipped():
    model = make_model()
    model[2].weight.requires_grad_(False)
    optimizer = SymbolicOptimizer(model.parameters(), ADAM)
    train(model, optimizer, 3)
    assert model[2].weight not in optimizer.state


def test_non_finite_updates_do_not_crash():
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = SymbolicOptimizer([w], "g g log id keep")
    w.grad = torch.zeros(3)
    optimizer.step()
    assert torch.isinf(w).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_params_keep_their_dtype(dtype):
    model = make_model(dtype)
    optimizer = SymbolicOptimizer(model.parameters(), ADAM)
    train(model, optimizer, 2)
    for param in model.parameters():
        assert param.dtype == dtype and optimizer.state[param]["exp_avg"].dtype == dtype


def test_per_slice_learning_rates_for_stacked_models():
    rng = torch.Generator().manual_seed(0)
    stacked = torch.randn(3, 4, 5, dtype=torch.float64, generator=rng)
    grads = [torch.randn(3, 4, 5, dtype=torch.float64, generator=rng) for _ in range(5)]
    lrs = torch.tensor([1e-3, 1e-2, 1e-1], dtype=torch.float64)
    expected = []
    for k in range(3):
        w, state = stacked[k].clone(), {}
        for g in grads:
            symbolic_update([w], [g[k]], [state], rule=POWERSIGN, lr=lrs[k].item())
        expected.append(w)
    state = {}
    for g in grads:
        symbolic_update([stacked], [g], [state], rule=POWERSIGN, lr=lrs)
    torch.testing.assert_close(stacked, torch.stack(expected), rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------
def test_decay_rules_need_total_steps():
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="uses ld, which needs total_steps"):
        SymbolicOptimizer(params, "ld g id id mul")
    with pytest.raises(ValueError, match="anneal_noise"):
        SymbolicOptimizer(params, "anneal_noise g id id add")
    SymbolicOptimizer(params, "g ld id id keep")  # a dead decay needs nothing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"lr": float("nan")}, "Invalid learning rate"),
        ({"total_steps": 0}, "total_steps must be a positive int"),
        ({"total_steps": 2.5}, "total_steps must be a positive int"),
    ],
)
def test_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SymbolicOptimizer([torch.nn.Parameter(torch.ones(2))], POWERSIGN, **kwargs)


def test_bad_rules():
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="line 1, column 11"):
        SymbolicOptimizer(params, "g g id id kep")
    with pytest.raises(TypeError, match="DSL string or a Rule"):
        SymbolicOptimizer(params, 42)
    assert SymbolicOptimizer(params, parse(SGD)).rule == parse(SGD)


def test_sparse_and_complex_gradients_are_refused():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        SymbolicOptimizer(embedding.parameters(), ADAM).step()
    z = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    z.grad = torch.ones_like(z)
    with pytest.raises(ValueError, match="complex"):
        SymbolicOptimizer([z], ADAM).step()
