"""The child network's training data, prepared once per process: datasets loaded, normalised,
moved to the device and cast to the protocol's dtype, and each epoch's shuffled copy.

Everything here is cached in-process (``functools.lru_cache``): every candidate of a search shares
the dataset, the protocol's split and the seed, so the data is prepared once and each epoch's
order gathered once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from nos_sym.evaluation import datasets
from nos_sym.evaluation.protocol import Protocol, epoch_order

__all__ = [
    "Data",
    "compute_dtype",
    "load_dataset",
    "normalised",
    "prepare",
    "prepared",
    "prepared_test",
    "shuffled_epoch",
]


@dataclass(frozen=True, eq=False)
class Data:
    """A dataset's training pool and held-out split: normalised, on the device, in the protocol's
    dtype."""

    train_x: Tensor
    train_y: Tensor
    valid_x: Tensor
    valid_y: Tensor
    shape: tuple[int, int, int]
    classes: int


load_dataset = functools.lru_cache(maxsize=4)(datasets.load)
""":func:`nos_sym.evaluation.datasets.load`, cached (a dataset is read from disk once)."""


def compute_dtype(protocol: Protocol) -> torch.dtype:
    """The dtype the protocol trains in (``bf16`` or fp32)."""
    return torch.bfloat16 if protocol.precision == "bf16" else torch.float32


def normalised(
    dataset: datasets.Dataset, images: Tensor, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """uint8 ``images`` of ``dataset`` as ``(x/255 − mean)/std`` (its training split's per-channel
    statistics), on ``device`` in ``dtype``."""
    mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std).view(1, -1, 1, 1)
    return ((images.float() / 255 - mean) / std).to(device, dtype)


@functools.lru_cache(maxsize=4)
def prepared_test(
    dataset: datasets.Dataset, examples: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The first ``examples`` of the *test* split (all when it has fewer), normalised as the
    training data: for reporting only, never for choosing anything."""
    return (
        normalised(dataset, dataset.test_x[:examples], device, dtype),
        dataset.test_y[:examples].to(device),
    )


@functools.lru_cache(maxsize=4)
def prepare(
    dataset: datasets.Dataset,
    n_valid: int,
    split_seed: int,
    pool: int | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Data:
    """Normalise ``(x/255 − mean)/std`` once; keep the first ``pool`` training indices (a random
    subset: the split is a random permutation) and the ``n_valid`` held-out ones."""
    train_idx, valid_idx = datasets.validation_split(dataset, n_valid=n_valid, seed=split_seed)
    if pool is not None and pool > len(train_idx):
        raise ValueError(
            f"{dataset.name}: the protocol trains on {pool} examples but only {len(train_idx)} "
            f"remain after holding out {n_valid}"
        )

    def images(indices: Tensor) -> Tensor:
        return normalised(dataset, dataset.train_x[indices], device, dtype)

    train_idx = train_idx[:pool]
    return Data(
        train_x=images(train_idx),
        train_y=dataset.train_y[train_idx].to(device),
        valid_x=images(valid_idx),
        valid_y=dataset.train_y[valid_idx].to(device),
        shape=dataset.shape,
        classes=len(dataset.classes),
    )


def prepared(dataset: str | datasets.Dataset, protocol: Protocol, device: torch.device) -> Data:
    """The data ``protocol`` trains on: a pool of max(sweep, final) examples (all of the training
    split if the final run uses it all) and the held-out split."""
    pool = (
        None
        if protocol.final_examples is None
        else max(protocol.sweep_examples, protocol.final_examples)
    )
    return prepare(
        load_dataset(dataset) if isinstance(dataset, str) else dataset,
        protocol.n_valid,
        protocol.split_seed,
        pool,
        device,
        compute_dtype(protocol),
    )


@functools.lru_cache(maxsize=16)
def shuffled_epoch(data: Data, seed: int, epoch: int, examples: int) -> tuple[Tensor, Tensor]:
    """The first ``examples`` of the pool in epoch ``epoch``'s order: one gather, then batches
    are contiguous slices. Cached: every candidate of a search shares the seed."""
    order = epoch_order(seed, epoch, examples).to(data.train_x.device)
    return data.train_x[:examples][order], data.train_y[:examples][order]
