r"""The task ``wrn``: a Wide ResNet WRN-d-k with batch norm (Zagoruyko & Komodakis 2016), the
paper's transfer target of section 5.2, sized for a CPU.

The network: a 3×3 convolution to 16 channels, then three groups of :math:`n = (d - 4)/6`
pre-activation basic blocks of widths :math:`16k, 32k, 64k` (the second and third groups start with
stride 2), then BN → ReLU → global average pool → linear:

.. math::

    \text{block}(x) = s(x) + W_2 * \operatorname{relu}(\operatorname{BN}(
        W_1 * \operatorname{relu}(\operatorname{BN}(x)))),

:math:`s` the identity, or a strided 1×1 convolution where the width or the resolution changes.
No dropout. The metric is the accuracy on held-out *training* examples (the protocol's
``n_valid``, :func:`~nos_sym.evaluation.datasets.validation_split`); the first
:attr:`WideResNetTask.test_examples` of the data set's *test* split are scored after the final run
and reported only. This is a stand-in for the paper's WRN-28-10 on CIFAR-10 (300 epochs on a GPU):
see ``docs/tasks.md`` for its sizes and timings.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nos_sym.evaluation import datasets
from nos_sym.evaluation.data import load_dataset, prepared, prepared_test, shuffled_epoch
from nos_sym.evaluation.evaluator import DIVERGENCE_CHECK_EVERY, EVAL_MODEL_EXAMPLES
from nos_sym.evaluation.protocol import Protocol, autocast, memory_format
from nos_sym.tasks.base import MakeOptimizer, Task, TaskRun

__all__ = [
    "CURVE_POINTS",
    "PROTOCOL",
    "WideResNet",
    "WideResNetTask",
    "blocks_per_group",
    "default_dataset",
]

CURVE_POINTS = 4
"""Points of a final run's validation curve, evenly spaced, the last at the end of the run."""

PROTOCOL = Protocol(
    name="wrn",
    learning_rates=tuple(10.0**i for i in range(-4, 1)),
    sweep_examples=5_000,
    final_epochs=2,
    final_examples=5_000,
    batch_size=50,
    n_valid=1_000,
)
"""The task's protocol: learning rates 10^i, i = −4…0; each sweep run 1 epoch of 5,000 training
examples (100 steps of 50), the final run 2 epochs of them (200 steps); 1,000 held-out examples;
bf16 autocast, channels-last. Sized so one evaluation (5 sweep runs + the final run) takes ~30 s
on 2 CPU cores (``docs/tasks.md``)."""


def default_dataset() -> str:
    """``cifar10`` when it is on this machine (never downloaded), else ``fashion-mnist``."""
    return "cifar10" if datasets.load_local("cifar10") is not None else "fashion-mnist"


def blocks_per_group(depth: int, width: int) -> int:
    """:math:`n = (d - 4)/6`, the blocks of each group; a ValueError unless ``depth`` is
    6n + 4 with n ≥ 1 and ``width`` ≥ 1."""
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise ValueError(f"a WRN needs depth 6n + 4 (n ≥ 1) and width ≥ 1, got {depth}, {width}")
    return (depth - 4) // 6


class _Block(nn.Module):
    """A pre-activation basic block ``in_channels → out_channels`` at ``stride``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` for ``shape = (C, H, W)`` images and ``classes`` outputs."""

    def __init__(self, depth: int, width: int, shape: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        blocks, widths = blocks_per_group(depth, width), (16, 16 * width, 32 * width, 64 * width)
        layers: list[nn.Module] = [nn.Conv2d(shape[0], widths[0], 3, padding=1, bias=False)]
        for group in range(3):
            for index in range(blocks):
                stride = 2 if group > 0 and index == 0 else 1
                in_channels = widths[group] if index == 0 else widths[group + 1]
                layers.append(_Block(in_channels, widths[group + 1], stride))
        layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[3], classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@functools.lru_cache(maxsize=4)
def _initial_state(
    depth: int, width: int, shape: tuple[int, int, int], classes: int, seed: int
) -> dict[str, Tensor]:
    """The initialisation drawn from ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WideResNet(depth, width, shape, classes).state_dict()


@dataclass(frozen=True)
class WideResNetTask(Task):
    """The task ``wrn`` (see the module docstring): WRN-``depth``-``width`` on ``dataset``
    (empty: :func:`default_dataset`, resolved when the task is made, so the identity names it).

    One run trains the network drawn from ``seed`` for ``steps`` steps (:meth:`Task.steps`: the
    protocol's epochs × examples / batch), the examples in the order the seed draws
    (:func:`~nos_sym.evaluation.protocol.epoch_order`), in the protocol's precision and memory
    format. Metric: held-out accuracy at the end; diverged: a non-finite loss or parameter
    (checked every :data:`~nos_sym.evaluation.evaluator.DIVERGENCE_CHECK_EVERY` steps and at the
    end), then the metric is 0. A final run also returns the validation accuracy at
    :data:`CURVE_POINTS` evenly spaced steps (``curve``) and the test accuracy (``test``); a sweep
    run neither (they would cost as much as its training)."""

    depth: int = 16
    width: int = 1
    dataset: str = ""
    test_examples: int = 2_000

    name: ClassVar[str] = "wrn"
    version: ClassVar[int | str] = 1
    protocols: ClassVar[Mapping[str, Protocol]] = {"wrn": PROTOCOL}
    default_protocol: ClassVar[str] = "wrn"

    def __post_init__(self) -> None:
        blocks_per_group(self.depth, self.width)
        if not self.dataset:
            object.__setattr__(self, "dataset", default_dataset())
        if self.dataset not in datasets.DATASETS:
            raise ValueError(f"unknown data set {self.dataset!r}; known: {datasets.DATASETS}")
        if self.test_examples < 1:
            raise ValueError(f"test_examples must be ≥ 1, got {self.test_examples}")

    def check(self) -> None:
        load_dataset(self.dataset)  # a missing data set: one clear DatasetError

    def run(
        self,
        make_optimizer: MakeOptimizer,
        *,
        lr: float,
        seed: int,
        steps: int,
        protocol: Protocol,
        final: bool,
        device: str = "cpu",
    ) -> TaskRun:
        target = torch.device(device)
        data = prepared(self.dataset, protocol, target)
        memory = memory_format(protocol)
        model = WideResNet(self.depth, self.width, data.shape, data.classes)
        model.load_state_dict(
            _initial_state(self.depth, self.width, data.shape, data.classes, seed)
        )
        model.to(target, memory_format=memory)
        params = list(model.parameters())
        optimizer = make_optimizer(params)
        precision = functools.partial(autocast, protocol, target)

        def accuracy(x: Tensor, y: Tensor) -> float:
            """Accuracy on ``(x, y)`` in eval mode (the batch-norm running statistics)."""
            model.eval()
            correct = torch.zeros((), dtype=torch.long, device=target)
            with torch.inference_mode(), precision():
                for start in range(0, len(y), EVAL_MODEL_EXAMPLES):
                    batch = x[start : start + EVAL_MODEL_EXAMPLES]
                    logits = model(batch.contiguous(memory_format=memory))
                    correct += (logits.argmax(dim=1) == y[start : start + len(batch)]).sum()
            model.train()
            return correct.item() / len(y)

        examples = (
            (protocol.final_examples or len(data.train_y)) if final else protocol.sweep_examples
        )
        batch, batches = protocol.batch_size, examples // protocol.batch_size
        marks = {steps * (i + 1) // CURVE_POINTS for i in range(CURVE_POINTS)} if final else set()
        bad_loss = torch.zeros((), dtype=torch.bool, device=target)
        curve: list[float] = []
        model.train()
        for step in range(1, steps + 1):
            epoch, first = divmod((step - 1) * batch, batches * batch)
            xs, ys = shuffled_epoch(data, seed, epoch, examples)
            with precision():
                logits = model(xs[first : first + batch].contiguous(memory_format=memory))
                loss = F.cross_entropy(logits, ys[first : first + batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bad_loss |= ~torch.isfinite(loss.detach())
            checked = step % DIVERGENCE_CHECK_EVERY == 0 or step in marks or step == steps
            if checked and _diverged(bad_loss, params):
                return TaskRun(metric=0.0, diverged=True, curve=(*curve, 0.0) if final else ())
            if step in marks:
                curve.append(accuracy(data.valid_x, data.valid_y))
        if not final:
            return TaskRun(metric=accuracy(data.valid_x, data.valid_y))
        test_x, test_y = prepared_test(
            load_dataset(self.dataset), self.test_examples, target, data.valid_x.dtype
        )
        return TaskRun(metric=curve[-1], curve=tuple(curve), test=accuracy(test_x, test_y))


def _diverged(bad_loss: Tensor, params: list[Tensor]) -> bool:
    """A non-finite loss so far, or a non-finite parameter now (one host sync)."""
    finite = torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()
    return bool(bad_loss | ~finite)
