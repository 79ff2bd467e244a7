"""Image-classification data sets for the child networks, and the fixed validation split.

``load(name)`` returns a :class:`Dataset` of uint8 images for ``"fashion-mnist"``, ``"cifar10"``
or ``"synthetic"``. A data set directory ``<base>/<name>/`` is looked for under, in order:

1. the ``root`` argument, 2. ``$NOS_DATA``, 3. ``/usr/share/datasets`` (Debian's
``dataset-fashion-mnist`` package), 4. the user cache ``$XDG_CACHE_HOME/nos_sym`` (default
``~/.cache/nos_sym``).

If none has it, the official files are downloaded into the user cache and checked against their
known md5 — unless ``NOS_OFFLINE`` is set, in which case :class:`DatasetError` lists every place
tried and how to get the data. Mirrors are ``MIRRORS[name]``; ``$NOS_FASHION_MNIST_URL`` /
``$NOS_CIFAR10_URL`` replace them by one base URL (the file name is appended).

CIFAR-10's batch files are Python pickles. They are read straight from the archive (nothing is
extracted to disk) through :class:`RestrictedUnpickler`, which can build numpy arrays and nothing
else, so a tampered file cannot run code.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from nos_sym.choices import DATASETS
from nos_sym.errors import UserError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

__all__ = [
    "CHECKSUMS",
    "DATASETS",
    "MIRRORS",
    "SYSTEM_DIR",
    "Dataset",
    "DatasetError",
    "RestrictedUnpickler",
    "cache_dir",
    "download",
    "load",
    "load_local",
    "split_digest",
    "validation_split",
]


SYSTEM_DIR = Path("/usr/share/datasets")
"""Where Debian's ``dataset-*`` packages install data sets."""

MIRRORS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}
"""Base URLs tried in order; a file's URL is the base followed by its name."""

MIRROR_ENV = {"fashion-mnist": "NOS_FASHION_MNIST_URL", "cifar10": "NOS_CIFAR10_URL"}
"""Environment variables that replace ``MIRRORS[name]`` by a single base URL."""

CHECKSUMS: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
}
"""md5 of each official download file."""

DOWNLOAD_TIMEOUT_SECONDS = 60.0
_CHUNK_BYTES = 1 << 20

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
SYNTHETIC_CLASSES = tuple(f"pattern-{k}" for k in range(10))

_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{k}" for k in range(1, 6))
_CIFAR10_TEST_BATCH = "test_batch"
_CIFAR10_BATCHES = (*_CIFAR10_TRAIN_BATCHES, _CIFAR10_TEST_BATCH)
_CIFAR10_MAX_MEMBER_BYTES = 64 << 20  # a real batch file is ~31 MB

SYNTHETIC_SEED = 20170801
SYNTHETIC_SHAPE = (1, 16, 16)
SYNTHETIC_SIZES = (15_000, 2_000)
"""15,000 training images: the paper's protocol (10,000 to train, 5,000 held out) fits exactly."""
_SYNTHETIC_NOISE_STD = 0.35
_SYNTHETIC_MAX_SHIFT = 2


class DatasetError(UserError, RuntimeError):
    """A data set is missing, corrupt, fails its checksum, or could not be downloaded."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image data set: uint8 images ``N×C×H×W`` and int64 labels.

    ``mean``/``std`` are per channel over the training images scaled to [0, 1]
    (population std: ``sqrt(E[x²] − E[x]²)``), for normalising inputs.
    """

    name: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    classes: tuple[str, ...]
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str


class _Arrays(NamedTuple):
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    ``find_class`` resolves only the globals a pickled ``ndarray`` needs; any other global (the
    way a malicious pickle reaches ``os.system`` and friends) raises ``pickle.UnpicklingError``.
    """

    _ALLOWED: dict[tuple[str, str], object] = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def cache_dir() -> Path:
    """The user cache: ``$XDG_CACHE_HOME/nos_sym``, or ``~/.cache/nos_sym``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nos_sym"


def load(name: str, root: str | os.PathLike[str] | None = None) -> Dataset:
    """Load data set ``name`` from the first place that has it, downloading it if none does."""
    local = load_local(name, root)
    if local is not None:
        return local
    spec = _spec(name)
    if _offline():
        raise DatasetError(_missing_message(name, _search_places(name, root)))
    directory = download(name)
    arrays = spec.read(directory)
    if arrays is None:
        raise DatasetError(f"{name}: downloaded to {directory} but the files are not there")
    return _make_dataset(name, arrays, spec.classes, str(directory))


def load_local(name: str, root: str | os.PathLike[str] | None = None) -> Dataset | None:
    """Load data set ``name`` from the first place that has it, or None if none does: never
    downloads (whatever ``NOS_OFFLINE`` says)."""
    if name == "synthetic":
        return _make_dataset(name, _synthetic_arrays(), SYNTHETIC_CLASSES, _synthetic_source())
    spec = _spec(name)
    for _, directory in _search_places(name, root):
        if directory is not None and (arrays := spec.read(directory)) is not None:
            return _make_dataset(name, arrays, spec.classes, str(directory))
    return None


def download(name: str) -> Path:
    """Download ``name``'s official files into ``cache_dir()/name`` and return that directory.

    Each file is written to a temporary file in that directory, checked against ``CHECKSUMS``,
    then renamed into place; files already there are kept. Raises :class:`DatasetError`, also
    when ``NOS_OFFLINE`` is set.
    """
    if name == "synthetic":
        raise DatasetError("the synthetic data set is generated in memory; nothing to download")
    spec = _spec(name)
    directory = cache_dir() / name
    if _offline():
        raise DatasetError(
            f"downloads are disabled; unset NOS_OFFLINE to download it to {directory}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    for filename in spec.files:
        if not (directory / filename).is_file():
            _download_from_mirrors(name, filename, directory / filename)
    return directory


def validation_split(
    dataset: Dataset, n_valid: int = 5000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the *training* set into (train_indices, valid_indices), fixed by ``seed``.

    A seeded ``torch.randperm`` of the N training indices: the first ``n_valid`` are held out,
    the rest train. Both keep the permutation's order, so any prefix of ``train_indices`` is a
    uniformly random subset. The test set takes no part.
    """
    n_total = len(dataset.train_y)
    if not 0 < n_valid < n_total:
        raise ValueError(f"n_valid must be in (0, {n_total}), got {n_valid}")
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n_total, generator=generator)
    return permutation[n_valid:], permutation[:n_valid]


def split_digest(train_indices: torch.Tensor, valid_indices: torch.Tensor) -> str:
    """sha256 (hex) identifying a split: the indices, in order, as little-endian int64."""
    digest = hashlib.sha256()
    for label, indices in ((b"train", train_indices), (b"valid", valid_indices)):
        digest.update(label + struct.pack("<q", len(indices)))
        digest.update(indices.to(torch.int64).numpy().astype("<i8").tobytes())
    return digest.hexdigest()


# --- look-up -------------------------------------------------------------------------------------


class _FileSpec(NamedTuple):
    """A data set stored in files: its classes, official download files, and its reader (which
    returns None when a directory does not hold the data set)."""

    classes: tuple[str, ...]
    files: tuple[str, ...]
    read: Callable[[Path], _Arrays | None]


def _spec(name: str) -> _FileSpec:
    specs = {
        "fashion-mnist": _FileSpec(
            FASHION_MNIST_CLASSES, _FASHION_MNIST_FILES, _read_fashion_mnist
        ),
        "cifar10": _FileSpec(CIFAR10_CLASSES, (_CIFAR10_ARCHIVE,), _read_cifar10),
    }
    if name not in specs:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return specs[name]


def _search_places(name: str, root: str | os.PathLike[str] | None) -> list[tuple[str, Path | None]]:
    """(description, directory or None when not configured) in look-up order."""
    nos_data = os.environ.get("NOS_DATA")
    return [
        ("root argument", Path(root) / name if root is not None else None),
        ("$NOS_DATA", Path(nos_data) / name if nos_data else None),
        ("system data sets", SYSTEM_DIR / name),
        ("user cache", cache_dir() / name),
    ]


def _offline() -> bool:
    return os.environ.get("NOS_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _missing_message(name: str, places: list[tuple[str, Path | None]]) -> str:
    tried = "\n".join(
        f"  - {description}: {directory if directory is not None else 'not set'}"
        for description, directory in places
    )
    fixes = [f"unset NOS_OFFLINE to download it to {cache_dir() / name}"]
    if name == "fashion-mnist":
        fixes.insert(0, "`apt-get install dataset-fashion-mnist` (Debian)")
    return (
        f"data set {name!r} not found and downloads are disabled (NOS_OFFLINE is set).\n"
        f"Looked in:\n{tried}\nTo fix: " + ", or ".join(fixes) + "."
    )


# --- download ------------------------------------------------------------------------------------


def _mirrors(name: str) -> tuple[str, ...]:
    override = os.environ.get(MIRROR_ENV[name])
    return (override,) if override else MIRRORS[name]


def _download_from_mirrors(name: str, filename: str, destination: Path) -> None:
    failures = []
    for base in _mirrors(name):
        url = base.rstrip("/") + "/" + filename
        try:
            _download_verified(url, CHECKSUMS[filename], destination)
            return
        except DatasetError as error:
            failures.append(f"  - {error}")
    raise DatasetError(f"could not download {filename} for {name}:\n" + "\n".join(failures))


def _download_verified(url: str, md5: str, destination: Path) -> None:
    """Stream ``url`` to a temporary file next to ``destination``, check md5, rename atomically."""
    descriptor, partial_name = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
    )
    partial = Path(partial_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        with (
            os.fdopen(descriptor, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response,
        ):
            announced = response.headers.get("Content-Length")
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
        if announced is not None and received != int(announced):
            raise DatasetError(f"{url}: truncated download, {received} of {announced} bytes")
        if digest.hexdigest() != md5:
            raise DatasetError(
                f"{url}: checksum mismatch, md5 {digest.hexdigest()} but expected {md5}"
            )
        os.replace(partial, destination)
    except (OSError, http.client.HTTPException) as error:
        raise DatasetError(f"{url}: download failed: {error}") from error
    finally:
        partial.unlink(missing_ok=True)


# --- readers -------------------------------------------------------------------------------------


def _read_fashion_mnist(directory: Path) -> _Arrays | None:
    """The four gzipped IDX files, or None if any is missing."""
    paths = [directory / filename for filename in _FASHION_MNIST_FILES]
    if not all(path.is_file() for path in paths):
        return None
    train_x, train_y, test_x, test_y = (
        _read_idx(path, ndim) for path, ndim in zip(paths, (3, 1, 3, 1), strict=True)
    )
    return _Arrays(train_x[:, None], train_y, test_x[:, None], test_y)


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes (header: 0, 0, 0x08, ndim, then ndim big-endian
    uint32 sizes)."""
    try:
        with gzip.open(path, "rb") as stream:
            zero, type_code, ndim = struct.unpack(">HBB", stream.read(4))
            if (zero, type_code, ndim) != (0, 0x08, expected_ndim):
                raise DatasetError(f"{path}: not a {expected_ndim}-d IDX file of unsigned bytes")
            dims = struct.unpack(f">{ndim}I", stream.read(4 * ndim))
            payload = stream.read(math.prod(dims))
            trailing = stream.read(1)
    except (OSError, EOFError, struct.error, zlib.error) as error:
        raise DatasetError(f"{path}: unreadable: {error}") from error
    if len(payload) != math.prod(dims) or trailing:
        raise DatasetError(f"{path}: payload size does not match the header {dims}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _read_cifar10(directory: Path) -> _Arrays | None:
    """The extracted ``cifar-10-batches-py/`` folder, else the archive; None if neither."""
    folder = directory / _CIFAR10_FOLDER
    if all((folder / batch).is_file() for batch in _CIFAR10_BATCHES):
        return _cifar10_arrays(
            {batch: (folder / batch).read_bytes() for batch in _CIFAR10_BATCHES}, folder
        )
    archive = directory / _CIFAR10_ARCHIVE
    if archive.is_file():
        return _cifar10_arrays(dict(_cifar10_archive_members(archive)), archive)
    return None


def _cifar10_archive_members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """(batch name, bytes) of the archive's batch files, read in memory: nothing touches the disk,
    so member names cannot escape anywhere; links, devices and oversized members are skipped."""
    wanted = {f"{_CIFAR10_FOLDER}/{batch}" for batch in _CIFAR10_BATCHES}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    if member.size > _CIFAR10_MAX_MEMBER_BYTES:
                        raise DatasetError(f"{archive}: {member.name} is implausibly large")
                    extracted = tar.extractfile(member)
                    assert extracted is not None  # regular files always extract
                    yield member.name.rsplit("/", 1)[1], extracted.read()
    except (OSError, EOFError, tarfile.TarError, zlib.error) as error:
        raise DatasetError(f"{archive}: unreadable archive: {error}") from error


def _cifar10_arrays(batches: dict[str, bytes], origin: Path) -> _Arrays:
    missing = [batch for batch in _CIFAR10_BATCHES if batch not in batches]
    if missing:
        raise DatasetError(f"{origin}: missing {', '.join(missing)}")
    train = [_parse_cifar10_batch(batches[b], f"{origin}/{b}") for b in _CIFAR10_TRAIN_BATCHES]
    test_x, test_y = _parse_cifar10_batch(batches[_CIFAR10_TEST_BATCH], f"{origin}/test_batch")
    train_x = np.concatenate([images for images, _ in train])
    train_y = np.concatenate([labels for _, labels in train])
    return _Arrays(train_x, train_y, test_x, test_y)


def _parse_cifar10_batch(raw: bytes, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch pickle: {b"data": N×3072 uint8 (R, G, B planes of 32×32), b"labels": [N ints]}."""
    try:
        batch = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # any malformed pickle, including a refused global
        raise DatasetError(f"{origin}: not a CIFAR-10 batch: {error}") from error
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
        and isinstance(labels, list)
        and len(labels) == len(data)
        and all(isinstance(label, int) for label in labels)
    ):
        raise DatasetError(
            f"{origin}: not a CIFAR-10 batch (expected b'data' N×3072 uint8, b'labels')"
        )
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


# --- synthetic -----------------------------------------------------------------------------------


def _synthetic_source() -> str:
    return f"synthetic (generated in memory, seed {SYNTHETIC_SEED})"


def _synthetic_arrays() -> _Arrays:
    """Ten smooth random prototypes; an image is its class prototype at a random contrast and
    shift (up to ±2 px, wrapping) plus Gaussian noise: ``x = ½ + c·(p_y − ½) + σ·ε``, clipped."""
    generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
    channels, height, width = SYNTHETIC_SHAPE
    coarse = torch.rand(len(SYNTHETIC_CLASSES), channels, 4, 4, generator=generator)
    prototypes = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")

    def sample(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = torch.randperm(count, generator=generator) % len(SYNTHETIC_CLASSES)
        contrast = 0.6 + 0.4 * torch.rand(count, 1, 1, 1, generator=generator)
        noise = torch.randn(count, channels, height, width, generator=generator)
        images = 0.5 + contrast * (prototypes[labels] - 0.5) + _SYNTHETIC_NOISE_STD * noise
        shifts = torch.randint(
            -_SYNTHETIC_MAX_SHIFT, _SYNTHETIC_MAX_SHIFT + 1, (count, 2), generator=generator
        )
        for shift in shifts.unique(dim=0):
            chosen = (shifts == shift).all(dim=1)
            images[chosen] = images[chosen].roll(tuple(shift.tolist()), dims=(2, 3))
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return pixels.numpy(), labels.numpy()

    train_x, train_y = sample(SYNTHETIC_SIZES[0])
    test_x, test_y = sample(SYNTHETIC_SIZES[1])
    return _Arrays(train_x, train_y, test_x, test_y)


# --- assembly ------------------------------------------------------------------------------------


def _make_dataset(name: str, arrays: _Arrays, classes: tuple[str, ...], source: str) -> Dataset:
    for images, labels, part in (
        (arrays.train_x, arrays.train_y, "train"),
        (arrays.test_x, arrays.test_y, "test"),
    ):
        if len(images) != len(labels):
            raise DatasetError(f"{source}: {len(images)} {part} images but {len(labels)} labels")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
            raise DatasetError(f"{source}: {part} labels outside 0..{len(classes) - 1}")
    train_x = torch.from_numpy(np.ascontiguousarray(arrays.train_x).copy())
    mean, std = _channel_mean_std(train_x)
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=torch.from_numpy(arrays.train_y.astype(np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(arrays.test_x).copy()),
        test_y=torch.from_numpy(arrays.test_y.astype(np.int64)),
        classes=classes,
        shape=tuple(train_x.shape[1:]),
        mean=mean,
        std=std,
        source=source,
    )


def _channel_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and population std of ``images / 255`` from a 256-bin histogram
    ``h``: ``μ = Σ_k k·h_k / (255·n)``, ``σ² = Σ_k k²·h_k / (255²·n) − μ²``."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in images.unbind(dim=1):
        histogram = torch.bincount(channel.flatten(), minlength=256).to(torch.float64)
        count = histogram.sum()
        mean = (histogram * levels).sum() / count
        variance = (histogram * levels.square()).sum() / count - mean.square()
        means.append(float(mean))
        stds.append(float(variance.clamp(min=0).sqrt()))
    return tuple(means), tuple(stds)
