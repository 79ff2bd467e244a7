"""SymbolicOptimizer: DSL rules as torch optimizers, exactly as docs/dsl.md defines them."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from nos_sym import (
    AddSign,
    DSLSyntaxError,
    PowerSign,
    SymbolicOptimizer,
    parse,
    symbolic_optim,
    symbolic_update,
)

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


@pytest.mark.parametrize(
    "schedule",
    [
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=30),
        lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, 0.001, 0.01, step_size_up=5),
    ],
)
def test_cyclic_schedules_cycle_beta1_as_on_adam(schedule):
    """OneCycleLR/CyclicLR with cycle_momentum=True write β1 into each group's betas."""
    model = make_model()
    adam = torch.optim.Adam(groups(model))
    expected = train(model, adam, 30, scheduler=schedule(adam))
    model = make_model()
    ours = SymbolicOptimizer(groups(model), ADAM)
    actual = train(model, ours, 30, scheduler=schedule(ours))
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


@pytest.mark.parametrize(
    ("rule", "options"),
    [
        (POWERSIGN, {"weight_decay": 0.1, "betas": (0.8, 0.99), "maximize": True}),
        ("g g drop_0.1 id mul ; o1 ld id id add", {}),
    ],
)
def test_compiled_path_agrees(rule, options):
    torch.manual_seed(3)
    single = run_rule(rule, steps=6, total_steps=25, **options)
    torch.manual_seed(3)
    fused = run_rule(rule, steps=6, total_steps=25, compile=True, **options)
    torch.testing.assert_close(fused, single, rtol=1e-12, atol=1e-14)


def run_sizes(rule, steps=6, **options):
    """Tensors of 1,000, 37×29 and 5 float64 elements and a non-contiguous 30×40, in two groups
    (weight decay; maximize and another lr), with fixed gradients and draws from seed 3."""
    torch.manual_seed(3)
    params = [
        torch.nn.Parameter(torch.randn(1000, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(37, 29, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(40, 30, dtype=torch.float64).t()),
    ]
    optimizer = SymbolicOptimizer(
        [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "maximize": True}],
        rule, lr=0.01, total_steps=25, betas=(0.8, 0.99), **options,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, dtype=torch.float64, generator=generator)
        optimizer.step()
    return torch.cat([param.detach().flatten() for param in params])


@pytest.mark.parametrize("rule", PATH_RULES)
def test_chunks_change_no_bit_and_the_paths_still_agree(rule, monkeypatch):
    whole = run_sizes(rule)  # every tensor below one chunk: the unchunked step
    monkeypatch.setattr(symbolic_optim, "CHUNK_BYTES", 1024)  # 128 float64 elements
    chunked = run_sizes(rule)
    assert torch.equal(chunked, whole)
    torch.testing.assert_close(run_sizes(rule, foreach=True), chunked, rtol=1e-14, atol=1e-15)


def test_compiled_path_agrees_with_the_chunked_one(monkeypatch):
    monkeypatch.setattr(symbolic_optim, "CHUNK_BYTES", 1024)
    chunked = run_sizes(POWERSIGN, steps=3)
    fused = run_sizes(POWERSIGN, steps=3, compile=True)
    torch.testing.assert_close(fused, chunked, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("tensors", "allowed", "sizes"),
    [
        ([torch.zeros(1000), torch.zeros(1000)], True, [256, 256, 256, 232]),
        ([torch.zeros(1000, dtype=torch.float64)], True, [128] * 7 + [104]),
        ([torch.zeros(40, 25)], True, [256, 256, 256, 232]),
        ([torch.zeros(256)], True, [256]),  # one chunk: the tensor itself
        ([torch.zeros(1000)], False, [1000]),  # e.g. a 1-D lr of stacked models
        ([torch.zeros(1000), torch.zeros(25, 40).t()], True, [1000]),  # not contiguous
    ],
)
def test_chunks_are_aligned_views_that_write_through(tensors, allowed, sizes, monkeypatch):
    monkeypatch.setattr(symbolic_optim, "CHUNK_BYTES", 1024)
    chunks = symbolic_optim._chunked(tensors, allowed)
    assert [chunk[0].numel() for chunk in chunks] == sizes
    for chunk in chunks:
        assert len(chunk) == len(tensors)
        for piece in chunk:
            piece.add_(1)
    assert all(torch.equal(t, torch.ones_like(t)) for t in tensors)


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
        ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
        ({"lr": "0.1"}, "Invalid learning rate"),
        ({"betas": (0.9, 1.0)}, "Invalid betas"),
        ({"betas": (0.9,)}, "Invalid betas"),
        ({"eps": -1e-8}, "Invalid eps"),
        ({"weight_decay": -0.1}, "Invalid weight_decay"),
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


# ---------------------------------------------------------------------------------------------
# torch.optim's conventions (issue 14)
# ---------------------------------------------------------------------------------------------
def test_compiled_step_matches_eager_and_compiles_once():
    """torch.compile(opt.step): one graph for every step (t is traced as a tensor), as Adam."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager = run_rule(ADAM, steps=12, dtype=torch.float32)
    model = make_model(torch.float32)
    optimizer = SymbolicOptimizer(groups(model), ADAM)
    counter = CompileCounterWithBackend("inductor")
    optimizer.step = torch.compile(optimizer.step, backend=counter)
    compiled = train(model, optimizer, 12)
    torch._dynamo.reset()
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def clones(optimizer):
    return [copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))]


def test_deepcopy_and_pickle_keep_rule_total_steps_and_generator():
    rule = "g g drop_0.3 id mul ; o1 ld id id mul"
    w = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    optimizer = SymbolicOptimizer(
        [w], rule, total_steps=9, generator=torch.Generator().manual_seed(4)
    )
    for copied in clones(optimizer):
        assert (copied.rule, copied.total_steps) == (optimizer.rule, 9)
        copied_w = copied.param_groups[0]["params"][0]
        copied_w.grad = torch.ones_like(copied_w)
        copied.step()  # the copy draws from its own copy of the generator
        expected = w.detach().clone().requires_grad_()
        fresh = SymbolicOptimizer(
            [expected], rule, total_steps=9, generator=torch.Generator().manual_seed(4)
        )
        expected.grad = torch.ones_like(expected)
        fresh.step()
        assert torch.equal(copied_w, expected)


OLD_KEYS = ["compile", "betas", "eps", "weight_decay", "maximize", "rule", "foreach"]


def test_state_dicts_and_pickles_without_new_keys_get_the_defaults():
    model = make_model()
    optimizer = SymbolicOptimizer(groups(model), ADAM)
    train(model, optimizer, 3)
    saved = copy.deepcopy(optimizer.state_dict())
    pickled = optimizer.__getstate__()
    for group in saved["param_groups"] + pickled["param_groups"]:
        for key in OLD_KEYS:
            del group[key]
    expected = train(copy.deepcopy(model), copy.deepcopy(optimizer), 3)
    loaded = SymbolicOptimizer(groups(model), ADAM)
    loaded.load_state_dict(saved)
    unpickled = SymbolicOptimizer.__new__(SymbolicOptimizer)
    unpickled.__setstate__(copy.deepcopy(pickled))
    for restored in (loaded, unpickled):
        assert all(set(OLD_KEYS) <= set(group) for group in restored.param_groups)
    assert torch.equal(train(copy.deepcopy(model), loaded, 3), expected)


@pytest.mark.parametrize("lr", [np.float32(0.01), np.float64(0.01), torch.tensor(0.01), 1])
def test_learning_rates_of_the_types_torch_accepts(lr):
    actual = run_rule(ADAM, steps=5, dtype=torch.float32, lr=lr)
    expected = run_rule(ADAM, steps=5, dtype=torch.float32, lr=float(lr))
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def fixed_gradient_run(make_optimizer, weight_decay, foreach, steps=6):
    """Parameters of two groups (weight decay λ and 0) after steps with fixed gradients."""
    rng = torch.Generator().manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=rng)) for _ in "ab")
    grads = [torch.randn(2, 4, 3, dtype=torch.float64, generator=rng) for _ in range(steps)]
    optimizer = make_optimizer(
        [{"params": [a], "weight_decay": weight_decay}, {"params": [b]}], foreach
    )
    trajectory = [(a.detach().clone(), b.detach().clone())]
    for grad in grads:
        a.grad, b.grad = grad[0], grad[1]
        optimizer.step()
        trajectory.append((a.detach().clone(), b.detach().clone()))
    return trajectory


WEIGHT_DECAY_OPTIMIZERS = {
    "SymbolicOptimizer": lambda groups, foreach: SymbolicOptimizer(
        groups, POWERSIGN, lr=0.05, foreach=foreach
    ),
    "PowerSign": lambda groups, foreach: PowerSign(groups, lr=0.05, foreach=foreach),
    "AddSign": lambda groups, foreach: AddSign(groups, lr=0.05, foreach=foreach),
}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", WEIGHT_DECAY_OPTIMIZERS)
def test_decoupled_weight_decay_per_group(name, foreach):
    """w_t = (1 − lr·λ)·w_{t−1} − lr·Δ_t, Δ_t the update without decay (fixed gradients), in the
    group that asks for it only."""
    make = WEIGHT_DECAY_OPTIMIZERS[name]
    plain = fixed_gradient_run(make, 0.0, foreach)
    decayed = fixed_gradient_run(make, 0.1, foreach)
    expected = plain[0][0]
    for (before, _), (after, _), (actual, _) in zip(plain, plain[1:], decayed[1:], strict=False):
        expected = (1 - 0.05 * 0.1) * expected + (after - before)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(p[1], d[1]) for p, d in zip(plain, decayed, strict=True))


def test_weight_decay_is_adamw():
    model = make_model()
    expected = train(model, torch.optim.AdamW(groups(model), weight_decay=0.1), 30)
    actual = run_rule(ADAM, steps=30, weight_decay=0.1)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "options",
    [{"betas": (0.8, 0.99), "eps": 1e-4}, {"maximize": True}, {"betas": (0.5, 0.9), "eps": 0.1}],
)
def test_betas_eps_and_maximize_are_adams(options):
    model = make_model()
    expected = train(model, torch.optim.Adam(groups(model), **options), 30)
    actual = run_rule(ADAM, steps=30, **options)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)


def test_beta3_drives_gamma_and_the_key_does_not_change():
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = SymbolicOptimizer([w], "gamma g id id keep", lr=1.0, betas=(0.9, 0.999, 0.5))
    assert optimizer.param_groups[0]["rule_key"] == parse("gamma g id id keep").key
    gamma, expected = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t, value in enumerate([1.0, -2.0, 0.5], start=1):
        w.grad = torch.full((3,), value, dtype=torch.float64)
        optimizer.step()
        gamma = 0.5 * gamma + 0.5 * value**3
        expected -= gamma / (1 - 0.5**t)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=0)


def test_preset_names_where_a_rule_is_expected():
    params = [torch.nn.Parameter(torch.ones(2))]
    assert SymbolicOptimizer(params, "powersign").rule == parse(POWERSIGN)
    state = {}
    symbolic_update([torch.ones(2)], [torch.ones(2)], [state], rule="adam", lr=0.1)
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    with pytest.raises(DSLSyntaxError, match="known presets: sgd, momentum, adam"):
        SymbolicOptimizer(params, "powersine")


def test_repr_and_state_dict_name_the_rule_in_dsl():
    optimizer = SymbolicOptimizer([torch.nn.Parameter(torch.ones(2))], "adam")
    assert f"rule: {ADAM}\n" in repr(optimizer)
    assert optimizer.state_dict()["param_groups"][0]["rule"] == ADAM


def test_a_rule_per_parameter_group():
    """A sign rule for the weights, SGD for the biases: the same as two optimizers."""
    model = make_model()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    mixed = SymbolicOptimizer([{"params": weights}], "powersign", lr=0.01)
    mixed.add_param_group({"params": biases, "rule": parse(SGD), "lr": 0.1})
    actual = train(model, mixed, 10)
    model = make_model()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    pair = [SymbolicOptimizer(weights, POWERSIGN, lr=0.01), SymbolicOptimizer(biases, SGD, lr=0.1)]
    expected = train(model, Both(pair), 10)
    assert torch.equal(actual, expected)
    assert all(set(mixed.state[p]) == {"step"} for p in mixed.param_groups[1]["params"])
    assert [g["rule"] for g in mixed.state_dict()["param_groups"]] == [POWERSIGN, SGD]
    other = SymbolicOptimizer([{"params": weights}, {"params": biases}], POWERSIGN)
    with pytest.raises(ValueError, match="another rule"):
        other.load_state_dict(mixed.state_dict())
    with pytest.raises(ValueError, match="needs total_steps"):
        mixed.add_param_group(
            {"params": [torch.nn.Parameter(torch.ones(1))], "rule": "ld g id id mul"}
        )


class Both:
    """Two optimizers stepped as one (the reference of the per-group rule test)."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    def zero_grad(self):
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()
