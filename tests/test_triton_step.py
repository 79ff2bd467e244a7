"""fused=True: the generated Triton kernel of a rule's step, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1), agrees with the per-tensor path."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

pytest.importorskip("triton")

from nos_sym import SymbolicOptimizer, symbolic_update, triton_step  # noqa: E402
from nos_sym.presets import resolve  # noqa: E402
from nos_sym.symbolic_optim import _plan  # noqa: E402

# numpy runs the interpreted kernels: log(0), 0/0 and masked-off lanes warn there
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

POWERSIGN = "sign_g sign_m id id mul ; o1 g exp id mul"
ADAM = "m v id sqrt div"


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. at its first use; blocks of
    128 elements, so that tensors span several blocks and end inside one."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_step, "BLOCK", 128)


def make_params(dtype, device="cpu"):
    """Tensors of 300, 7×11, 1, 129 elements, a transposed 15×20 and a non-dense 20×15 slice."""
    generator = torch.Generator().manual_seed(0)
    values = [
        torch.randn(300, dtype=dtype, generator=generator),
        torch.randn(7, 11, dtype=dtype, generator=generator),
        torch.randn(1, dtype=dtype, generator=generator),
        torch.randn(129, dtype=dtype, generator=generator),
        torch.randn(20, 15, dtype=dtype, generator=generator).t(),
        torch.randn(20, 30, dtype=dtype, generator=generator)[:, ::2],
    ]
    return [torch.nn.Parameter(value.to(device)) for value in values]


def train(params, optimizer, steps, first=0):
    """``steps`` steps with gradients fixed by the step index; the 1-element parameter has no
    gradient at step 0 (so the group holds two step counts later)."""
    dtype = params[0].dtype
    for step in range(first, first + steps):
        generator = torch.Generator().manual_seed(100 + step)
        for index, param in enumerate(params):
            param.grad = (
                None
                if (index, step) == (2, 0)
                else torch.randn(param.shape, dtype=dtype, generator=generator).to(param.device)
            )
        optimizer.step()
    return torch.cat([param.detach().flatten() for param in params])


def optimizer(params, rule, **options):
    return SymbolicOptimizer(
        [{"params": params[:3]}, {"params": params[3:], "lr": 0.003}],
        rule, lr=0.01, total_steps=25, **options,
        generator=torch.Generator(params[0].device).manual_seed(7),
    )  # fmt: skip


def run(rule, dtype, steps=3, device="cpu", **options):
    params = make_params(dtype, device)
    return train(params, optimizer(params, rule, **options), steps)


RULES = {
    "PowerSign": (POWERSIGN, {}),
    "AddSign": ("addsign", {}),
    "Adam": (ADAM, {}),
    "Adam, β1 < 0.5 (torch's other lerp), weight decay": (
        ADAM,
        {"betas": (0.3, 0.99), "weight_decay": 0.01},
    ),
    "PowerSign, weight decay, maximize, betas": (
        POWERSIGN,
        {"weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.99)},
    ),
    "clip, γ, w, rd, log": ("gamma w_1e-3 clip_1e-3 id add ; o1 rd log id mul", {}),
    "x^-1, x^1.5, log, abs": ("one v id id div ; o1 g3 id sqrt add ; o2 g log id add", {}),
    "x^0.75 (exp2·log2)": ("g g sqrt id mul ; o1 o1 sqrt id keep", {}),
    "drop masks and noise": ("g g drop_0.1 drop_0.3 sub ; o1 noise id id add", {}),
    "ld and anneal_noise": ("ld g id id mul ; o1 anneal_noise id id add", {}),
    "cd": ("addsign-cd", {}),
    "rd": ("powersign-rd", {}),
    "a constant Δ": ("one one id id add", {}),
}
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-14)}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize(("rule", "options"), list(RULES.values()), ids=list(RULES))
def test_fused_step_equals_the_per_tensor_path(rule, options, dtype):
    expected = run(rule, dtype, foreach=False, **options)
    actual = run(rule, dtype, fused=True, **options)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize(("rule", "options"), list(RULES.values()), ids=list(RULES))
def test_fused_step_on_cuda_equals_the_per_tensor_path(rule, options, dtype, monkeypatch):
    """The compiled kernels on a GPU (no interpreter): float32 exp/log are Triton's fast ones,
    hence the looser tolerance there."""
    monkeypatch.delenv("TRITON_INTERPRET")
    expected = run(rule, dtype, device="cuda", foreach=False, **options)
    actual = run(rule, dtype, device="cuda", fused=True, **options)
    rtol, atol = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12)}[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def test_the_rules_above_use_every_instruction():
    ops = {
        instruction.op
        for rule, _ in RULES.values()
        for instruction in _plan(resolve(rule), 1e-8).program.instructions
    }
    assert ops == set(triton_step.EXPRESSIONS) | {"leaf", "const", "draw"}


def test_the_source_holds_no_number_of_the_rule():
    """Rules that differ only in a clip bound, and a rule at another ε, share one source."""

    def source(rule, eps=1e-8):
        program = _plan(resolve(rule), eps).program
        return triton_step._source(program, ("m", "v"), torch.float32)

    clipped = source("m v clip_1e-3 id div")
    assert source("m v clip_1e-4 id div") == clipped
    assert source("m v clip_1e-3 id div", eps=1e-4) == clipped


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_computes_in_float32(dtype):
    """Averages and w are stored in the parameter's dtype, the math runs in float32 (as torch's
    fused Adam): two steps on ``dtype`` parameters give the float32 steps on the same values,
    rounded to ``dtype`` after each (to nearest; Triton's interpreter rounds float32 to bfloat16
    toward zero, so there one bfloat16 step apart)."""
    ulp = {torch.float16: 0.0, torch.bfloat16: 2.0**-7}[dtype]
    params = [p.detach().to(dtype) for p in make_params(torch.float32)]
    exact = [p.float() for p in params]
    half_states, exact_states = [{} for _ in params], [{} for _ in params]
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=generator).to(dtype) for p in params]
        options = {"rule": ADAM, "lr": 0.01, "fused": True}
        symbolic_update(params, grads, half_states, **options)
        symbolic_update(exact, [g.float() for g in grads], exact_states, **options)
        for param, value in zip(params, exact, strict=True):
            assert param.dtype == dtype
            torch.testing.assert_close(param, value.to(dtype), rtol=ulp, atol=0)
        exact = [p.float() for p in params]
        for half, state in zip(half_states, exact_states, strict=True):
            state.update({k: v.float() for k, v in half.items() if k != "step"})


def test_state_dicts_move_between_fused_and_default_optimizers():
    """Same state keys; a state saved by one path continues on the other (the saved group's
    ``fused`` left out, so each keeps its own path)."""
    expected = run(ADAM, torch.float64, steps=6)
    for first, second in [({"fused": True}, {}), ({}, {"fused": True})]:
        params = make_params(torch.float64)
        saving = optimizer(params, ADAM, **first)
        train(params, saving, 3)
        saved = copy.deepcopy(saving.state_dict())
        for group in saved["param_groups"]:
            del group["fused"]
        loading = optimizer(params, ADAM, **second)
        loading.load_state_dict(saved)
        assert [group["fused"] for group in loading.param_groups] == [second.get("fused")] * 2
        assert {frozenset(state) for state in loading.state.values()} == {
            frozenset({"step", "exp_avg", "exp_avg_sq"})
        }
        actual = train(params, loading, 3, first=3)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_one_kernel_per_rule_and_dtype(monkeypatch):
    triton_step.kernel.cache_clear()
    run(POWERSIGN, torch.float32, fused=True)
    run(POWERSIGN, torch.float32, fused=True, weight_decay=0.1, maximize=True)
    assert triton_step.kernel.cache_info().misses == 1
    run(POWERSIGN, torch.float64, fused=True)
    assert triton_step.kernel.cache_info().misses == 2


@pytest.mark.parametrize("other", ["foreach", "compile"])
def test_fused_excludes_foreach_and_compile(other):
    with pytest.raises(ValueError, match=f"`fused` and `{other}` cannot be `True` together"):
        SymbolicOptimizer(make_params(torch.float32), ADAM, fused=True, **{other: True})


def test_triton_takes_cpu_tensors_only_under_the_interpreter(monkeypatch):
    """(Without the interpreter, ``fused=True`` runs CPU tensors in the C kernel instead:
    tests/test_cpu_step.py.)"""
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="fused=True needs CUDA tensors and triton"):
        triton_step.check(make_params(torch.float32))


def test_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ImportError, match=r"pip install 'nos_sym\[triton\]'"):
        SymbolicOptimizer(make_params(torch.float32), ADAM, fused=True)


def test_fused_takes_one_learning_rate():
    params = make_params(torch.float32)[:1]
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(ValueError, match="one learning rate"):
        symbolic_update(
            params, [params[0].grad], [{}], rule=ADAM, lr=torch.tensor([0.1, 0.2]), fused=True
        )
