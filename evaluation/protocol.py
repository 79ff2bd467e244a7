"""How a candidate update rule is scored: the paper's protocol as one frozen, hashable record.

Bello et al. 2017, section 4.2: for each learning rate 10^i, i = −5…1, train the child network for
1 epoch on 10,000 training examples (batch 100); pick the learning rate with the best accuracy on
5,000 held-out *training* examples; train a fresh network (same initialisation) with it for 5
epochs; the reward is the final accuracy on those 5,000 held-out examples.

The paper does not say whether the 5 final epochs see the same 10,000 examples or the whole training
split; ``final_examples`` makes it explicit (default 10,000, the same examples as the sweep;
``None`` = every training example not held out).

Everything that can change a reward is a field, and :attr:`Protocol.hash` covers every field plus
:data:`PROTOCOL_VERSION` (bumped whenever the child network or the training loop changes what a
protocol computes), so rewards stored under one hash are comparable with each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

PROTOCOL_VERSION = 1

PRECISIONS = ("fp32", "bf16")
MEMORY_FORMATS = ("channels_last", "contiguous")


@dataclass(frozen=True)
class Protocol:
    """Every setting of a candidate's evaluation (see the module docstring for the procedure)."""

    name: str
    learning_rates: tuple[float, ...] = tuple(10.0**i for i in range(-5, 2))
    sweep_epochs: int = 1  # epochs per learning rate in the sweep
    sweep_examples: int = 10_000  # training examples the sweep sees
    final_epochs: int = 5  # epochs of the final run at the best learning rate
    final_examples: int | None = 10_000  # training examples of the final run; None = all
    batch_size: int = 100
    n_valid: int = 5_000  # held-out training examples: picks the lr and gives the reward
    split_seed: int = 0  # fixes the held-out split and which examples train
    precision: str = "bf16"  # "bf16": autocast to bfloat16; "fp32": plain float32
    memory_format: str = "channels_last"  # activations' layout: "channels_last" | "contiguous"
    # The evaluation's `seed` (not a field) draws the initialisation, shared by every learning
    # rate and the final run, and the order of the examples in each epoch.

    def __post_init__(self) -> None:
        if not self.learning_rates or not all(
            math.isfinite(lr) and lr > 0 for lr in self.learning_rates
        ):
            raise ValueError(f"learning_rates must be positive and finite: {self.learning_rates}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(
                f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}"
            )
        examples = [self.sweep_examples] + (
            [self.final_examples] * (self.final_examples is not None)
        )
        if min(self.sweep_epochs, self.final_epochs, self.n_valid) < 1 or any(
            n < self.batch_size for n in examples
        ):
            raise ValueError(
                f"protocol {self.name!r}: epochs, n_valid and examples must cover a batch"
            )

    def steps(self, epochs: int, examples: int) -> int:
        """Optimizer steps of a run: ``epochs · ⌊examples / batch_size⌋`` (a last partial batch is
        dropped)."""
        return epochs * (examples // self.batch_size)

    @property
    def sweep_steps(self) -> int:
        """Steps of each learning-rate run: the ``total_steps`` T of decay operands there."""
        return self.steps(self.sweep_epochs, self.sweep_examples)

    def final_steps(self, train_size: int) -> int:
        """Steps of the final run when ``train_size`` training examples are not held out."""
        return self.steps(self.final_epochs, self.final_examples or train_size)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, the version included."""
        fields = dataclasses.asdict(self) | {"version": PROTOCOL_VERSION}
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """sha256 (hex) of :meth:`to_json`: equal exactly when every setting is equal."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


PROTOCOLS: dict[str, Protocol] = {
    # Section 4.2 of the paper: 7 learning rates × 1 epoch of 10,000, then 5 epochs: 1,200 steps.
    "paper": Protocol(name="paper"),
    # The same procedure, ~40× cheaper: tests, the README demo, CPU searches (~0.3 s / candidate).
    "quick": Protocol(
        name="quick",
        learning_rates=(1e-3, 1e-2, 1e-1),
        sweep_examples=500,
        final_epochs=1,
        final_examples=1_000,
        batch_size=50,
        n_valid=1_000,
    ),
    # Between the two (issue 13; calibrated in docs/RESULTS.md): the paper's span of learning
    # rates, every other decade, more examples than `quick`: 4 × 20 + 100 = 180 steps, ~1/6 of
    # `paper`.
    "screen": Protocol(
        name="screen",
        learning_rates=(1e-5, 1e-3, 1e-1, 10.0),
        sweep_examples=2_000,
        final_epochs=2,
        final_examples=5_000,
        n_valid=2_000,
    ),
}


def derived_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed for one use of the evaluation's ``seed``: sha256 of both."""
    text = "/".join(map(str, (seed, *purpose)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def epoch_order(seed: int, epoch: int, examples: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits the first ``examples`` training examples of
    the pool: the same for every learning rate and the final run."""
    generator = torch.Generator().manual_seed(derived_seed(seed, "order", epoch))
    return torch.randperm(examples, generator=generator)


def memory_format(protocol: Protocol) -> torch.memory_format:
    """The torch memory format of the protocol's activations."""
    return (
        torch.channels_last
        if protocol.memory_format == "channels_last"
        else torch.contiguous_format
    )


def autocast(protocol: Protocol, device: torch.device) -> AbstractContextManager:
    """The precision context of a forward pass: bf16 autocast on ``device``, or nothing."""
    if protocol.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def get_protocol(name: str | Protocol) -> Protocol:
    """The protocol called ``name`` in :data:`PROTOCOLS` (a :class:`Protocol` passes through)."""
    if isinstance(name, Protocol):
        return name
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}") from None
