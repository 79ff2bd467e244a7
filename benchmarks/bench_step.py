"""Optimizer-step speed of DSL rules against torch.optim and a plain copy in the same process.

CPU (issue targets): 20 tensors × 250k fp32 params, 2 threads; DSL-PowerSign ≤ 2.5× and DSL-Adam
≤ 3× the time of copying the parameters (``Tensor.copy_`` into preallocated tensors), and ≤ 1.0×
/ 1.25× the time of ``torch.optim.Adam(foreach=True)``. The default path runs each rule's
generated C kernel (:mod:`nos_sym.cpu_step`); the ``torch operators`` rows are the per-tensor
path without it (``NOS_SYM_CPU_KERNELS=0``), in cache-sized chunks or whole tensors. The first
step of each default-path rule, which compiles and checks its kernel (into an empty cache
directory), is timed apart.
GPU (when CUDA is there): 100M fp32 params in 100 tensors; DSL-PowerSign ≤ 0.80 ms on an H100
and ≤ 1.3× a device copy, DSL-Adam ≤ 1.0× ``torch.optim.Adam(fused=True)``; achieved bandwidth
vs a device copy. The ``(fused)`` rows (``fused=True``, one generated Triton kernel per step)
appear when triton is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from unittest import mock

import torch
from _results import median_seconds, write_section

from nos_sym import PowerSign, SymbolicOptimizer, symbolic_optim

ADAM = "m v id sqrt div"
POWERSIGN = "sign_g sign_m id id mul ; o1 g exp id mul"


def make_params(tensors: int, size: int, device: str) -> list[torch.nn.Parameter]:
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter(torch.randn(size, device=device, generator=generator))
        p.grad = torch.randn(size, device=device, generator=generator)
        params.append(p)
    return params


class Copy:
    """The reference: ``copy_`` of every parameter into a preallocated tensor of its size (on
    CUDA one ``torch._foreach_copy_``, so that kernel launches do not dominate)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.sources = [p.detach() for p in params]
        self.targets = [torch.empty_like(p) for p in self.sources]

    def step(self) -> None:
        if self.sources[0].is_cuda:
            torch._foreach_copy_(self.targets, self.sources)
            return
        for target, source in zip(self.targets, self.sources, strict=True):
            target.copy_(source)


class Sqrt:
    """A reference for rules with √: ``torch.sqrt`` of every parameter into a preallocated
    tensor (on the CPU, MKL's vector math: what the DSL Adam kernel must call to stay
    bit-identical)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.sources = [p.detach().abs() for p in params]
        self.targets = [torch.empty_like(p) for p in self.sources]

    def step(self) -> None:
        for target, source in zip(self.targets, self.sources, strict=True):
            torch.sqrt(source, out=target)


class TorchOperators:
    """An optimizer whose per-tensor steps run torch operators (no generated kernel), in
    cache-sized chunks or (``chunked=False``) on whole tensors."""

    def __init__(self, optimizer: torch.optim.Optimizer, chunked: bool = True):
        self.optimizer = optimizer
        self.chunk_bytes = symbolic_optim.CHUNK_BYTES if chunked else 1 << 62

    def step(self) -> None:
        with (
            mock.patch.object(symbolic_optim, "CHUNK_BYTES", self.chunk_bytes),
            mock.patch.dict(os.environ, {"NOS_SYM_CPU_KERNELS": "0"}),
        ):
            self.optimizer.step()


def candidates(device: str) -> dict[str, callable]:
    cuda = device == "cuda"
    table = {
        "copy of the parameters": Copy,
        "torch.optim.Adam(foreach=True)": lambda p: torch.optim.Adam(p, foreach=True),
        "DSL Adam (default path)": lambda p: SymbolicOptimizer(p, ADAM),
        "DSL Adam (foreach)": lambda p: SymbolicOptimizer(p, ADAM, foreach=True),
        "DSL PowerSign (default path)": lambda p: SymbolicOptimizer(p, POWERSIGN),
        "DSL PowerSign (foreach)": lambda p: SymbolicOptimizer(p, POWERSIGN, foreach=True),
        "nos_sym.PowerSign": lambda p: PowerSign(p),
    }
    if not cuda:
        table["sqrt of the parameters (torch.sqrt)"] = Sqrt
        for name, rule in (("Adam", ADAM), ("PowerSign", POWERSIGN)):
            for chunked in (True, False):
                table[f"DSL {name} (torch operators, {'' if chunked else 'un'}chunked)"] = (
                    lambda p, rule=rule, chunked=chunked: TorchOperators(
                        SymbolicOptimizer(p, rule), chunked
                    )
                )
    table["torch.optim.Adam(fused=True)"] = lambda p: torch.optim.Adam(p, fused=True)
    if cuda:
        table["DSL PowerSign (compile)"] = lambda p: SymbolicOptimizer(p, POWERSIGN, compile=True)
        table["DSL Adam (compile)"] = lambda p: SymbolicOptimizer(p, ADAM, compile=True)
        if importlib.util.find_spec("triton") is not None:  # the generated Triton kernels
            table["DSL PowerSign (fused)"] = lambda p: SymbolicOptimizer(p, POWERSIGN, fused=True)
            table["DSL Adam (fused)"] = lambda p: SymbolicOptimizer(p, ADAM, fused=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10, help="steps per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurements")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument(
        "--size", type=int, help="parameters per tensor (default: 250k on CPU, 1M on CUDA)"
    )
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    tensors, default = (100, 1_000_000) if cuda else (20, 250_000)
    size = args.size or default
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    params = make_params(tensors, size, args.device)
    optimizers = {name: make(params) for name, make in candidates(args.device).items()}
    first_steps = []
    if not cuda:  # each rule's kernel compiled and checked anew (in an empty cache), timed
        with (
            tempfile.TemporaryDirectory(prefix="bench_step_kernels_") as cache,
            mock.patch.dict(os.environ, {"NOS_SYM_CACHE": cache}),
        ):
            for name in ("DSL PowerSign (default path)", "DSL Adam (default path)"):
                start = time.perf_counter()
                optimizers[name].step()
                first_steps.append(
                    f"- {name}: first step {time.perf_counter() - start:.2f} s (compiles and "
                    "checks the rule's C kernel; later processes load it from the cache)"
                )
    samples: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):  # interleaved, so that load on the machine hits all alike
        for name, optimizer in optimizers.items():
            samples[name].append(median_seconds(optimizer.step, args.repeats, 1, sync))
    times = {name: 1e3 * statistics.median(values) for name, values in samples.items()}
    rows = []
    reference = times["torch.optim.Adam(foreach=True)"]
    copy_ms = times["copy of the parameters"]
    for name, ms in times.items():
        rows.append(f"| {name} | {ms:.2f} | {ms / reference:.2f}× | {ms / copy_ms:.2f}× |")
    targets = (
        []
        if cuda
        else [
            f"- DSL PowerSign / copy: {times['DSL PowerSign (default path)'] / copy_ms:.2f}× "
            "(target ≤ 2.5×)",
            f"- DSL Adam / copy: {times['DSL Adam (default path)'] / copy_ms:.2f}× (target ≤ 3×)",
        ]
    )
    targets += [
        f"- DSL Adam / torch Adam(foreach): {times['DSL Adam (default path)'] / reference:.2f}× "
        "(target ≤ 1.25×)",
        f"- DSL PowerSign / torch Adam(foreach): "
        f"{times['DSL PowerSign (default path)'] / reference:.2f}× (target ≤ 1.0×)",
    ]
    if cuda:
        fused = times["torch.optim.Adam(fused=True)"]
        best = min(v for k, v in times.items() if k.startswith("DSL PowerSign"))
        targets += [
            f"- best DSL PowerSign step: {best:.3f} ms (target ≤ 0.80 ms on an H100), "
            f"{best / copy_ms:.2f}× the copy (target ≤ 1.3×)",
            f"- best DSL Adam / Adam(fused): "
            f"{min(v for k, v in times.items() if k.startswith('DSL Adam')) / fused:.2f}×",
        ]
    write_section(
        f"bench_step ({args.device}{'' if size == default else f', {size:,} per tensor'})",
        f"""
{tensors} tensors × {size:,} fp32 parameters{"" if cuda else f", {args.threads} threads"}; median
over {args.rounds} interleaved rounds of {args.repeats} steps; the copy (`copy_` of every
parameter into a preallocated tensor) is timed in the same rounds.

| optimizer | ms/step | vs torch Adam(foreach) | vs the copy |
| --- | --- | --- | --- |
{chr(10).join(rows)}

{chr(10).join(targets)}
{chr(10).join(first_steps)}
""",
    )


if __name__ == "__main__":
    main()
