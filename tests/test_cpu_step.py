"""The generated C kernel of the CPU per-tensor step (nos_sym.cpu_step): bit-identical to the
torch operators it replaces, used only where it is, and the torch path wherever it is not."""

from __future__ import annotations

import subprocess

import pytest
import torch

from nos_sym import SymbolicOptimizer, cpu_step, symbolic_optim
from nos_sym.compile import fold_scalars
from nos_sym.presets import resolve
from nos_sym.symbolic_optim import DEFAULT_BETAS, _plan, _scalars

POWERSIGN = "sign_g sign_m id id mul ; o1 g exp id mul"
ADAM = "m v id sqrt div"

needs_compiler = pytest.mark.skipif(cpu_step._compiler() is None, reason="no C compiler")
needs_mkl = pytest.mark.skipif(
    cpu_step._torch_symbol("vmsSqrt") is None, reason="torch without MKL's vector math"
)


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path_factory):
    """Kernels compiled into one directory of this session; each test decides anew which
    kernels agree; tensors of 1,000 elements and more take the kernel."""
    monkeypatch.setenv("NOS_SYM_CACHE", str(tmp_path_factory.getbasetemp() / "kernels"))
    monkeypatch.delenv("NOS_SYM_CPU_KERNELS", raising=False)
    monkeypatch.setattr(symbolic_optim, "CPU_KERNEL_NUMEL", 1000)
    monkeypatch.setattr(symbolic_optim, "_CPU_KERNELS", {})


def clear_caches() -> None:
    """Forget the compiler, the loaded libraries and the kernels, as a new process would."""
    for cached in (cpu_step._compiler, cpu_step._library, cpu_step.kernel):
        cached.cache_clear()


@pytest.fixture
def uncached():
    """The test looks the compiler, libraries and kernels up anew, and leaves none of its own."""
    clear_caches()
    yield
    clear_caches()


def make_params(dtype, sizes=(3000, 4099, 1, 129, 2048 + 37)):
    """Tensors above and below the kernel's threshold, whole vectors and tails, one 2-D."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(size, dtype=dtype, generator=generator) for size in sizes]
    params.append(torch.randn(40, 70, dtype=dtype, generator=generator))
    return [torch.nn.Parameter(p) for p in params]


def train(rule, dtype, kernels: bool, monkeypatch, steps=4, sizes=None, **options):
    """Parameters and optimizer states after ``steps`` steps (``kernels``: generated kernels
    on or off); gradients with zeros, infinities and NaNs among them."""
    monkeypatch.setenv("NOS_SYM_CPU_KERNELS", "1" if kernels else "0")
    params = make_params(dtype, *([sizes] if sizes else []))
    options = {"lr": 0.01, "total_steps": 10, **options}
    generator = torch.Generator().manual_seed(5)
    optimizer = SymbolicOptimizer(params, rule, generator=generator, **options)
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 + step)
        for param in params:
            param.grad = torch.randn(param.shape, dtype=dtype, generator=generator)
            param.grad.view(-1)[::53] = 0.0
        params[0].grad[7] = float("nan") if step == 3 else params[0].grad[7]
        optimizer.step()
    states = [t for p in params for t in optimizer.state[p].values() if t.dim()]
    return [p.detach() for p in params] + states


def assert_same_bits(actual, expected):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected, strict=True):
        assert symbolic_optim._same_bits(a, b)


RULES = {
    "PowerSign": (POWERSIGN, {}),
    "AddSign": ("addsign", {}),
    "PowerSign-ld (a decay inside the look-up)": ("powersign-ld", {}),
    "PowerSign-cd, weight decay, maximize": (
        "powersign-cd",
        {"weight_decay": 0.1, "maximize": True},
    ),
    "Adam (MKL's sqrt)": (ADAM, {}),
    "RMSProp, β1 < 0.5 (torch's other lerp)": ("rmsprop", {"betas": (0.3, 0.99)}),
    "drops and noise": ("g g drop_0.1 drop_0.3 sub ; o1 noise id id add", {}),
    "γ, clip, a restart decay, log": ("gamma w_1e-3 clip_1e-3 id add ; o1 rd log id mul", {}),
    "g³, sign, clip, exp of a non-discrete sum": (
        "g3 gamma sign clip_1e-3 sub ; o1 cd exp id mul ; o2 g id id mul",
        {},
    ),
    "log of g², 1/√1": ("g2 m log id mul ; o1 one sqrt id div", {}),
    "Adam + PowerSign": ("adam-powersign", {}),
    "SGD (Δ a leaf)": ("g g id id keep", {}),
}


@needs_compiler
@needs_mkl
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("rule", "options"), RULES.values(), ids=RULES.keys())
def test_kernel_is_bit_identical_to_the_torch_operators(rule, options, dtype, monkeypatch):
    expected = train(rule, dtype, False, monkeypatch, **options)
    actual = train(rule, dtype, True, monkeypatch, **options)
    assert_same_bits(actual, expected)
    used = [kernel for kernel in symbolic_optim._CPU_KERNELS.values() if kernel is not None]
    assert used, "the rule ran on the torch path"


@needs_compiler
@needs_mkl
@pytest.mark.parametrize("rule", [POWERSIGN, ADAM])
@pytest.mark.parametrize("threads", [1, 2])
def test_tensors_of_several_chunks_on_several_threads(rule, threads, monkeypatch):
    """The issue's setting, smaller: tensors of 300,001 elements (three chunks of the torch
    path, two threads' parts) at the default threshold."""
    monkeypatch.setattr(symbolic_optim, "CPU_KERNEL_NUMEL", 1 << 17)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        expected = train(rule, torch.float32, False, monkeypatch, steps=2, sizes=(300_001, 5))
        actual = train(rule, torch.float32, True, monkeypatch, steps=2, sizes=(300_001, 5))
    finally:
        torch.set_num_threads(previous)
    assert_same_bits(actual, expected)


@pytest.mark.parametrize(
    ("rule", "dtype", "why"),
    [
        ("one one id id add", torch.float32, "Δ is a scalar"),
        (POWERSIGN, torch.bfloat16, "bfloat16 rounds after every operator"),
        ("g g id id keep", torch.float16, "float16 too"),
        ("v v sqrt id mul", torch.float32, "v^1.5: no exact form, no look-up, no MKL function"),
    ],
)
def test_no_kernel(rule, dtype, why):
    plan = _plan(resolve(rule), 1e-8)
    assert cpu_step.kernel(plan.program, plan.averages, dtype) is None, why


CANNOT_RUN = {
    "a 1-element tensor learning rate": (lambda t: t, {"lr": torch.tensor(0.01)}),
    "a transposed parameter": (lambda t: t.t(), {"lr": 0.01}),
}


@needs_compiler
@pytest.mark.parametrize(("layout", "options"), CANNOT_RUN.values(), ids=CANNOT_RUN.keys())
def test_torch_path_where_the_kernel_cannot_run(layout, options, monkeypatch):
    def step(kernels: bool) -> torch.Tensor:
        monkeypatch.setenv("NOS_SYM_CPU_KERNELS", "1" if kernels else "0")
        generator = torch.Generator().manual_seed(0)
        param = torch.nn.Parameter(layout(torch.randn(60, 100, generator=generator)))
        optimizer = SymbolicOptimizer([param], POWERSIGN, **options)
        param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
        return param.detach()

    assert torch.equal(step(True), step(False))
    assert symbolic_optim._CPU_KERNELS == {}


@needs_compiler
def test_a_kernel_that_disagrees_is_not_used(monkeypatch, uncached):
    """A kernel whose m is a plain lerp (no fused multiply-add) differs from torch's in the last
    bit somewhere: the check at first use rejects it and the step runs on torch operators."""
    monkeypatch.setitem(
        cpu_step._UPDATES, "m", ["const T m = m_[i] + w1 * (g - m_[i]);", "m_[i] = m;"]
    )
    expected = train(POWERSIGN, torch.float64, False, monkeypatch)
    actual = train(POWERSIGN, torch.float64, True, monkeypatch)
    assert list(symbolic_optim._CPU_KERNELS.values()) == [None]
    assert_same_bits(actual, expected)


@pytest.mark.parametrize("setting", ["0", "off", "false"])
def test_kernels_can_be_turned_off(setting, monkeypatch):
    monkeypatch.setenv("NOS_SYM_CPU_KERNELS", setting)
    assert not cpu_step.enabled()
    params = make_params(torch.float32)
    optimizer = SymbolicOptimizer(params, POWERSIGN)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    assert symbolic_optim._CPU_KERNELS == {}


def test_no_compiler_means_no_kernel_and_the_same_results(monkeypatch, uncached):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    plan = _plan(resolve(POWERSIGN), 1e-8)
    assert cpu_step.kernel(plan.program, plan.averages, torch.float32) is None
    expected = train(POWERSIGN, torch.float32, False, monkeypatch)
    actual = train(POWERSIGN, torch.float32, True, monkeypatch)
    assert_same_bits(actual, expected)


@needs_compiler
def test_compiled_kernels_are_kept_and_reused(monkeypatch, tmp_path, uncached):
    """The first kernel compiles into the cache directory; a new process (caches cleared)
    loads the file without compiling."""
    monkeypatch.setenv("NOS_SYM_CACHE", str(tmp_path / "cache"))
    plan = _plan(resolve("addsign"), 1e-8)
    assert cpu_step.kernel(plan.program, plan.averages, torch.float64) is not None
    files = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].startswith("step_") and files[0].endswith(".so")
    clear_caches()
    cpu_step._compiler()  # `cc --version` runs once per process; only the compile is refused

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert cpu_step.kernel(plan.program, plan.averages, torch.float64) is not None


def test_a_failed_compile_means_no_kernel(monkeypatch, tmp_path, uncached):
    monkeypatch.setenv("NOS_SYM_CACHE", str(tmp_path))
    cpu_step._compiler()  # found before the compiler's runs fail

    def failing(*args, **kwargs):
        raise subprocess.CalledProcessError(1, args[0])

    monkeypatch.setattr(subprocess, "run", failing)
    assert cpu_step._library("void step(void) {}\n/* unique */") is None
    assert not list(tmp_path.glob("step_*.so"))


LOOKUPS = {
    # rule → the keys of its one look-up and the torch function of its results
    "powersign": ([1.0, -0.0, -1.0, 0.0], torch.exp),
    "addsign": None,  # no transcendental operator: no look-up
}


@pytest.mark.parametrize("rule", LOOKUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lookups(rule, dtype):
    plan = _plan(resolve(rule), 1e-8)
    folded = fold_scalars(plan.program, _scalars(plan.program, 3, 10, DEFAULT_BETAS))
    found = cpu_step.lookups(plan.program, folded, dtype)
    if LOOKUPS[rule] is None:
        assert found == []
        return
    keys, function = LOOKUPS[rule]
    assert found == [(keys, function(torch.tensor(keys, dtype=dtype)).tolist())]


def test_lookup_of_a_decayed_sign_product():
    """PowerSign-ld: e^{ld·sign(g)·sign(m)}, keys ±ld and ±0 (four, as counted)."""
    plan = _plan(resolve("powersign-ld"), 1e-8)
    scalars = _scalars(plan.program, 4, 10, DEFAULT_BETAS)
    ((keys, results),) = cpu_step.lookups(
        plan.program, fold_scalars(plan.program, scalars), torch.float64
    )
    decay = scalars["ld"]
    assert sorted(keys) == sorted([decay, -decay, 0.0, -0.0])
    assert results == torch.exp(torch.tensor(keys, dtype=torch.float64)).tolist()


def test_discrete_counts():
    plan = _plan(resolve(POWERSIGN), 1e-8)
    counts = cpu_step.discrete(plan.program)
    ops = {plan.program.instructions[p].op: n for p, n in counts.items()}
    assert ops == {"sign": 4, "mul": 4, "exp": 4}
    assert cpu_step.discrete(_plan(resolve(ADAM), 1e-8).program) == {}


def test_every_instruction_has_a_c_row():
    """The C table names the same instructions as the Triton one, every one a preset uses."""
    from nos_sym import triton_step
    from nos_sym.presets import PRESETS

    assert set(cpu_step.EXPRESSIONS) == set(triton_step.EXPRESSIONS)
    used = {
        instruction.op
        for name in PRESETS
        for instruction in _plan(resolve(name), 1e-8).program.instructions
    }
    assert used - {"leaf", "const", "draw"} <= set(cpu_step.EXPRESSIONS)


@needs_compiler
@needs_mkl
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_every_preset_has_a_kernel(dtype):
    from nos_sym.presets import PRESETS

    missing = []
    for name in PRESETS:
        plan = _plan(resolve(name), 1e-8)
        kernel = cpu_step.kernel(plan.program, plan.averages, dtype)
        if kernel is None or not symbolic_optim._agrees(plan, kernel):
            missing.append(name)
    assert missing == []


# ---------------------------------------------------------------------------------------------
# fused=True on the CPU: the C kernel for every tensor it can take
# ---------------------------------------------------------------------------------------------
FUSED = {
    # rule, options of both runs, options of the fused run only
    "PowerSign": (POWERSIGN, {}, {}),
    "Adam, weight decay, maximize": (ADAM, {"weight_decay": 0.1, "maximize": True}, {}),
    "drops and noise, a 1-element tensor lr (read as a number)": (
        "g g drop_0.1 drop_0.3 sub ; o1 noise id id add",
        {},
        {"lr": torch.tensor(0.01, dtype=torch.float64)},
    ),
}


@needs_compiler
@needs_mkl
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("rule", "options", "fused"), FUSED.values(), ids=FUSED.keys())
def test_fused_on_the_cpu_is_the_default_path_bit_for_bit(rule, options, fused, dtype, monkeypatch):
    """Every tensor, the 1-element and the 129-element ones too, runs in the kernel; the
    reference is the default path on torch operators (NOS_SYM_CPU_KERNELS=0, which fused=True
    does not heed)."""
    monkeypatch.setattr(symbolic_optim, "CPU_KERNEL_NUMEL", 1 << 40)  # default path: torch
    expected = train(rule, dtype, False, monkeypatch, **options)
    actual = train(rule, dtype, False, monkeypatch, fused=True, **{**options, **fused})
    assert_same_bits(actual, expected)
    assert [k for k in symbolic_optim._CPU_KERNELS.values() if k is not None]


@needs_compiler
def test_fused_on_the_cpu_takes_a_transposed_parameter_on_the_torch_operators(monkeypatch):
    def step(**options) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        param = torch.nn.Parameter(torch.randn(60, 100, generator=generator).t())
        optimizer = SymbolicOptimizer([param], POWERSIGN, **options)
        param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
        return param.detach()

    assert torch.equal(step(fused=True), step())


@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        (torch.bfloat16, "fused=True on the CPU supports float32/float64, not torch.bfloat16"),
        (torch.float16, "not torch.float16"),
    ],
)
def test_fused_on_the_cpu_refuses_half_precision(dtype, message):
    params = make_params(torch.float32)
    optimizer = SymbolicOptimizer(params[:1], POWERSIGN)
    half = [torch.nn.Parameter(torch.zeros(3, dtype=dtype))]
    with pytest.raises(RuntimeError, match=message):
        optimizer.add_param_group({"params": half, "fused": True})
    assert len(optimizer.param_groups) == 1  # the optimizer stays as it was


def test_fused_on_the_cpu_without_a_compiler_says_so(monkeypatch, uncached):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(RuntimeError, match="no C kernel for .* here .* fused=False"):
        SymbolicOptimizer(make_params(torch.float32), POWERSIGN, fused=True)


@needs_compiler
def test_a_damaged_cache_file_is_compiled_anew(monkeypatch, tmp_path, uncached):
    monkeypatch.setenv("NOS_SYM_CACHE", str(tmp_path))
    plan = _plan(resolve("addsign"), 1e-8)
    source = cpu_step._source(plan.program, plan.averages, torch.float32)[0]
    path = cpu_step.cache_path(source)
    path.write_bytes(b"not a shared library")
    assert cpu_step.kernel(plan.program, plan.averages, torch.float32) is not None
    assert path.read_bytes()[:4] == b"\x7fELF"
