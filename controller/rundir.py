"""A search run's directory on disk: its frozen config, its sample log, its checkpoint, and the
readers of a run (:func:`leaderboard`, :func:`status`, :func:`steps`).

A run directory holds:

* ``config.json``: the :class:`SearchConfig` and the run id (frozen: a resume with another
  config is an error, see :data:`FROZEN`);
* ``samples.jsonl``: one JSON line per sample, appended and fsynced after every controller
  update (``step``, ``index``, ``dsl``, ``key``, ``outcome``, ``status``, ``reward`` and, with
  ``--dedup numeric``, ``fingerprint``; with ``charge_store_hits``, ``charged`` on a store hit
  charged to the budget);
* ``checkpoint.pt``: controller, optimizer, baseline and RNG states, written atomically after
  every update and loaded with ``torch.load(weights_only=True)``;
* ``checkpoint.json``: the step of ``checkpoint.pt`` with its size and mtime, written after it
  (``nos-sym status`` reads it instead of loading torch; absent in older run directories, where
  the step is read from the checkpoint's pickle without torch, see :func:`checkpoint_step`);
* ``store.sqlite``: the reward store, unless ``--store`` shares one.

Damage: an unterminated last line of ``samples.jsonl`` is an append cut short (a power loss, a
full disk). Readers ignore it, with one :class:`TornLogWarning`; a resume rewrites the log without
it before appending (so nothing is glued to the torn bytes). Nothing completed is lost: a step's
lines are fsynced before its checkpoint is written, so a torn line belongs to a step that the
resume redoes. Any other undecodable line, and a ``checkpoint.pt`` that cannot be loaded, is a
:class:`SearchError` naming the file; readers never modify a damaged file.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nos_sym.choices import ALGORITHMS, BACKENDS, DATASETS, SPACES
from nos_sym.controller.funnel import Funnel, Rung, seed_stats
from nos_sym.dsl import as_rule
from nos_sym.errors import InputWarning, SearchError

if TYPE_CHECKING:
    from nos_sym.tasks.base import Task

__all__ = [
    "ALGORITHMS",
    "DEDUP",
    "FROZEN",
    "OUTCOMES",
    "Counters",
    "RunFiles",
    "SearchConfig",
    "SearchError",
    "TornLogWarning",
    "atomic_write",
    "check_resumable",
    "checkpoint_step",
    "leaderboard",
    "load_checkpoint",
    "load_config",
    "read_funnel",
    "read_log",
    "read_samples",
    "reward_text",
    "status",
    "status_rows",
    "steps",
    "write_checkpoint_step",
]

OUTCOMES = ("evaluated", "from_store", "degenerate")
DEDUP = ("key", "numeric")
FROZEN = (
    "algo",
    "space",
    "groups",
    "task",
    "dataset",
    "protocol",
    "seed",
    "eval_seed",
    "batch",
    "dedup",
    "population",
    "tournament",
    "rungs",
    "promote",
    "final_seeds",
    "charge_store_hits",
)
"""Fields a resumed run must share with the run it resumes; the others are execution details."""


@dataclass(frozen=True)
class SearchConfig:
    """One search run, as ``config.json`` stores it. ``task`` is a spec for
    :func:`~nos_sym.tasks.registry.get_task` (``dataset`` sets the data set of a task that has
    one; a run directory written before tasks existed has none and is the task ``child``).
    ``seed`` seeds the controller; ``eval_seed`` the trained models, and is part of a reward's
    identity (rule key, protocol hash, task identity, eval seed), so runs with different
    controller seeds still share rewards through a common store."""

    algo: str = "trpo"
    space: str = "paper"
    groups: int | None = None  # None: the space preset's number of groups
    task: str = "child"
    dataset: str = "fashion-mnist"
    protocol: str = "quick"
    seed: int = 0
    eval_seed: int = 0
    batch: int = 5
    dedup: str = "key"  # "key", or "numeric": also merge rules with equal fingerprints
    budget: int = 20
    max_samples: int | None = None  # default 20 × budget
    backend: str = "process"
    workers: int = 2
    store: str | None = None
    ray_address: str | None = None
    population: int = 50  # --algo evolution: population size P
    tournament: int = 10  # --algo evolution: tournament size S
    rungs: tuple[str, ...] | None = None  # the funnel's protocols; None: `protocol` alone
    promote: float = 0.1  # --rungs: the fraction of a rung promoted to the next
    final_seeds: int = 1  # --rungs: seeds of the last rung (its reward: their mean)
    # a key another run paid for in a shared store costs this run's budget the first time it
    # asks for it (``nos-sym study``: every arm pays as if it were alone)
    charge_store_hits: bool = False

    def __post_init__(self):
        if isinstance(self.rungs, list | str):  # config.json keeps a list
            names = self.rungs.split(",") if isinstance(self.rungs, str) else self.rungs
            object.__setattr__(self, "rungs", tuple(name.strip() for name in names))
        rungs = self.rungs or ()
        checks = [
            (self.algo in ALGORITHMS, f"--algo must be one of {', '.join(ALGORITHMS)}"),
            (self.space in SPACES, f"--space must be one of {', '.join(SPACES)}"),
            (self.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}"),
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}"),
            (self.dedup in DEDUP, f"--dedup must be {' or '.join(map(repr, DEDUP))}"),
            (self.groups is None or 1 <= self.groups <= 3, "--groups must be 1, 2 or 3"),
            (self.batch >= 1, "--batch must be at least 1"),
            (self.budget >= 0, "--budget must be at least 0"),
            (self.workers >= 1, "--workers must be at least 1"),
            (self.max_samples is None or self.max_samples >= 1, "--max-samples must be ≥ 1"),
            (self.population >= 2, "--population must be at least 2"),
            (1 <= self.tournament <= self.population, "--tournament must be in 1..population"),
            (
                self.rungs is None or (all(rungs) and len(set(rungs)) == len(rungs) > 0),
                "--rungs must be distinct protocol names separated by commas",
            ),
            (0 < self.promote <= 1, "--promote must be in (0, 1]"),
            (self.final_seeds >= 1, "--final-seeds must be at least 1"),
            (self.final_seeds == 1 or len(rungs) >= 2, "--final-seeds needs two --rungs or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise SearchError(message)

    @property
    def ladder(self) -> tuple[str, ...]:
        """The protocols of the rungs: ``rungs``, or ``(protocol,)`` without a funnel."""
        return self.rungs or (self.protocol,)

    @property
    def hyperparameters(self) -> dict[str, int]:
        """The algorithm's own options (``make_algorithm``'s keyword arguments)."""
        if self.algo == "evolution":
            return {"population": self.population, "tournament": self.tournament}
        return {}

    def resolved_task(self) -> Task:
        """The task this run trains on (a bad spec is a :class:`~nos_sym.errors.UserError`)."""
        from nos_sym.tasks.registry import get_task

        return get_task(self.task, dataset=self.dataset)

    @property
    def sample_limit(self) -> int:
        """Samples a run without a funnel may draw (a funnel's limit depends on its rungs'
        costs: :attr:`SearchRun.sample_limit <nos_sym.controller.search.SearchRun>`)."""
        return self.max_samples if self.max_samples is not None else 20 * max(self.budget, 1)


@dataclass
class Counters:
    """What a run's samples were: each is one of evaluated / from_store / degenerate; diverged
    and failed count the evaluated ones that ended so; charged the from_store ones charged to
    the budget (``charge_store_hits``)."""

    samples: int = 0
    evaluated: int = 0
    from_store: int = 0
    degenerate: int = 0
    diverged: int = 0
    failed: int = 0
    best_reward: float = 0.0
    controller_steps: int = 0
    charged: int = 0

    @classmethod
    def of(cls, lines: list[dict[str, Any]], steps: int) -> Counters:
        counters = cls(controller_steps=steps)
        for line in lines:
            counters.add(line)
        return counters

    def add(self, line: dict[str, Any]) -> None:
        self.samples += 1
        setattr(self, line["outcome"], getattr(self, line["outcome"]) + 1)
        if line["outcome"] == "evaluated" and line["status"] in ("diverged", "failed"):
            setattr(self, line["status"], getattr(self, line["status"]) + 1)
        self.best_reward = max(self.best_reward, line["reward"])
        self.charged += bool(line.get("charged"))


class TornLogWarning(InputWarning):
    """The sample log ends with an unterminated line (an append cut short), which is ignored."""


# --------------------------------------------------------------------------------------------
# The files
# --------------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)``, fsync, then rename over ``path``: readers see the old file or the
    new one, never a part."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@dataclass
class RunFiles:
    """Paths of a run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def checkpoint_step(self) -> Path:
        return self.root / "checkpoint.json"

    @property
    def funnel(self) -> Path:
        return self.root / "funnel.json"

    def store(self, config: SearchConfig) -> Path:
        return Path(config.store) if config.store else self.root / "store.sqlite"


def read_log(run_dir: str | Path) -> tuple[list[dict[str, Any]], bool]:
    """The sample log's lines (a missing or empty log has none) and whether an unterminated last
    line was ignored (then a :class:`TornLogWarning` is issued)."""
    path = RunFiles(Path(run_dir)).samples
    if not path.exists():
        return [], False
    *complete, tail = path.read_bytes().split(b"\n")  # tail: after the last newline
    lines = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SearchError(f"{path}:{number}: not a JSON line (a damaged log?)") from None
    torn = bool(tail.strip())
    if torn:
        warnings.warn(
            f"{path}:{len(complete) + 1}: ignoring an unterminated last line (an append cut "
            "short); a resume redoes its step",
            TornLogWarning,
            stacklevel=1,  # one location: shown once per log and process
        )
    return lines, torn


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """The samples of a run's log (a missing or empty log is an empty list; a torn last line is
    ignored, see :func:`read_log`); the funnel's promotion lines are left out."""
    return [line for line in read_log(run_dir)[0] if "rung" not in line]


def read_funnel(run_dir: str | Path) -> Funnel | None:
    """The funnel of a ``--rungs`` run replayed from its log (None for a run without one): its
    rungs (``funnel.json``, written with the config) and every line folded in order."""
    config, _ = load_config(run_dir)
    if config.rungs is None:
        return None
    path = RunFiles(Path(run_dir)).funnel
    try:
        table = json.loads(path.read_text())
        rungs = [
            Rung(index, row["protocol"], row["hash"], int(row["cost"]), tuple(row["seeds"]))
            for index, row in enumerate(table["rungs"])
        ]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise SearchError(f"{path} is missing or damaged: {error}") from None
    funnel = Funnel(rungs, config.promote)
    for line in read_log(run_dir)[0]:
        funnel.fold(line)
    return funnel


def load_config(run_dir: str | Path) -> tuple[SearchConfig, str]:
    """(config, run id) of an existing run directory."""
    path = RunFiles(Path(run_dir)).config
    if not path.exists():
        raise SearchError(f"{run_dir} is not a search run directory (no config.json)")
    try:
        saved = json.loads(path.read_text())
        run_id = saved.pop("run_id")
        return SearchConfig(**saved), run_id
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SearchError(f"{path} is damaged: {error}") from None


def check_resumable(run_dir: str | Path, saved: SearchConfig, config: SearchConfig) -> None:
    """A :class:`SearchError` when ``config`` differs from the ``saved`` config of ``run_dir``
    in a :data:`FROZEN` field (naming each one), so that the run cannot be resumed with it."""
    mismatched = [name for name in FROZEN if getattr(saved, name) != getattr(config, name)]
    if mismatched:
        details = ", ".join(
            f"{name}: {getattr(saved, name)!r} → {getattr(config, name)!r}" for name in mismatched
        )
        raise SearchError(
            f"{run_dir} holds a run with another config ({details});"
            " resume it with the same options or use a new --run-dir"
        )


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's last checkpoint (None before the first update). A file that cannot be loaded is
    a :class:`SearchError` saying what to do; the file is left as it is."""
    path = RunFiles(Path(run_dir)).checkpoint
    if not path.exists():
        return None
    import torch  # here: the readers that need no checkpoint start without torch

    try:
        with warnings.catch_warnings():  # a damaged file is one line below, not torch's warnings
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True)
    except Exception:  # torch raises EOFError, UnpicklingError, RuntimeError, ... on damage
        state = None
    if not (isinstance(state, dict) and {"step", "algorithm"} <= state.keys()):
        what = "it is empty" if path.stat().st_size == 0 else "it is damaged"
        raise SearchError(
            f"{path} cannot be read as a search checkpoint ({what}); move it away to restart "
            "the run from step 0 (rewards already paid stay in the store), or use another "
            "--run-dir"
        )
    return state


def write_checkpoint_step(run_dir: str | Path, step: int) -> None:
    """Write ``checkpoint.json``, ``{"step", "size", "mtime_ns"}`` of the ``checkpoint.pt`` just
    written, so that :func:`checkpoint_step` reads the step without torch."""
    files = RunFiles(Path(run_dir))
    stat = files.checkpoint.stat()
    text = json.dumps({"step": step, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    atomic_write(files.checkpoint_step, lambda path: path.write_text(text))


class _Opaque:
    """Every object of a checkpoint but its top-level dict, ints and strings, as
    :func:`_pickled_step` reads it: the one class its unpickler constructs or calls, so reading
    runs no code named by the file (no module is imported, no function of the file called)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


class _StepUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        return _Opaque

    def persistent_load(self, pid: object) -> _Opaque:
        return _Opaque()


_PICKLE_LIMIT = 64 << 20
"""Largest ``data.pkl`` :func:`_pickled_step` reads (a controller's is ~100 KB)."""


def _pickled_step(path: Path) -> int | None:
    """The top-level ``step`` of a ``torch.save`` checkpoint read without torch: the zip's
    ``data.pkl`` with every class and tensor storage replaced by :class:`_Opaque`; None where
    that fails (then :func:`load_checkpoint` reads it, or says what is wrong)."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
            if info.file_size > _PICKLE_LIMIT:
                return None
            state = _StepUnpickler(io.BytesIO(archive.read(info))).load()
        step = state["step"] if isinstance(state, dict) else None
    except Exception:  # not a zip, no data.pkl, a damaged pickle, ...: torch decides
        return None
    return step if type(step) is int and step >= 0 else None


def checkpoint_step(run_dir: str | Path) -> int:
    """The controller step of the run's last checkpoint (0 before the first update): from
    ``checkpoint.json`` when it describes the ``checkpoint.pt`` there (same size and mtime),
    else from ``checkpoint.pt`` itself — its pickle read without torch
    (:func:`_pickled_step`), or :func:`load_checkpoint` where that fails (a run directory
    written before ``checkpoint.json`` existed, a checkpoint replaced or damaged since)."""
    files = RunFiles(Path(run_dir))
    try:
        stat = files.checkpoint.stat()
        saved = json.loads(files.checkpoint_step.read_text())
        if stat.st_size > 0 and (saved["size"], saved["mtime_ns"]) == (
            stat.st_size,
            stat.st_mtime_ns,
        ):
            return int(saved["step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no usable sidecar: read the checkpoint
    step = _pickled_step(files.checkpoint) if files.checkpoint.exists() else None
    if step is not None:
        return step
    checkpoint = load_checkpoint(run_dir)
    return int(checkpoint["step"]) if checkpoint else 0


# --------------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------------
def leaderboard(run_dir: str | Path, n: int = 10) -> list[dict[str, Any]]:
    """The run's distinct rules by reward: ``{"dsl", "minimal_dsl", "key", "reward", "status",
    "latex"}`` (``dsl`` as sampled, ``minimal_dsl`` its live groups only). In a ``--rungs`` run,
    ranked by the highest rung reached, then the reward there (the mean over its seeds); rows
    also carry ``rung``, ``protocol``, ``std`` (over the seeds) and ``seeds``."""
    config = load_config(run_dir)[0] if RunFiles(Path(run_dir)).config.exists() else None
    funnel = config is not None and config.rungs is not None
    best: dict[str, dict[str, Any]] = {}
    for line in read_log(run_dir)[0] if funnel else read_samples(run_dir):
        held = best.get(line["key"])
        if line["outcome"] != "degenerate" and (
            held is None or line.get("rung", 0) > held.get("rung", 0)
        ):
            best[line["key"]] = line
    ranked = sorted(
        best.values(), key=lambda line: (-line.get("rung", 0), -line["reward"], line["dsl"])
    )[:n]
    rows = []
    for line in ranked:
        rule = as_rule(line["dsl"])
        row = {
            "dsl": line["dsl"],
            "minimal_dsl": rule.minimal_dsl,
            "key": line["key"],
            "reward": line["reward"],
            "status": line["status"],
            "latex": rule.latex(),
        }
        if funnel:
            rewards = line.get("rewards", [line["reward"]])
            row |= {
                "rung": line.get("rung", 0),
                "protocol": line.get("protocol", config.ladder[0]),
                "std": seed_stats(rewards)[1],
                "seeds": line.get("seeds", [config.eval_seed]),
            }
        rows.append(row)
    return rows


def reward_text(row: dict[str, Any]) -> str:
    """A leaderboard row's reward: ``0.8123``, or in a funnel ``0.8123 ± 0.0040 (2: paper,
    3 seeds)`` (mean ± std over the seeds of its highest rung, which names its protocol)."""
    if "protocol" not in row:
        return f"{row['reward']:.4f}"
    seeds = len(row["seeds"])
    return (
        f"{row['reward']:.4f} ± {row['std']:.4f} ({row['rung']}: {row['protocol']}, "
        f"{seeds} seed{'s' * (seeds > 1)})"
    )


def leaderboard_markdown(rows: list[dict[str, Any]]) -> str:
    """A :func:`leaderboard` as a Markdown table (the minimal DSL; ``|`` in Δ escaped, so
    absolute values do not split a cell); a funnel's rows show their protocol, mean ± std and
    number of seeds."""
    lines = ["| # | rule | Δ | reward | status |", "| --- | --- | --- | --- | --- |"]
    for i, row in enumerate(rows, start=1):
        delta = row["latex"].replace("|", r"\|")
        lines.append(
            f"| {i} | `{row['minimal_dsl']}` | ${delta}$ | {reward_text(row)} | {row['status']} |"
        )
    return "\n".join(lines)


def status(run_dir: str | Path) -> dict[str, Any]:
    """Counts of a run: samples, unique keys, evaluated, from_store (with
    ``charge_store_hits``: then charged, those of them charged to the budget), degenerate,
    diverged, failed, best reward (of the samples), controller steps; in a ``--rungs`` run also
    ``rungs`` (per rung, :meth:`Funnel.counts`), the ``compute`` spent and the ``budget``, both
    in evaluations of the last rung."""
    config = load_config(run_dir)[0]
    lines = read_samples(run_dir)
    counters = Counters.of(lines, checkpoint_step(run_dir))
    summary = dataclasses.asdict(counters)
    summary["unique"] = len({line["key"] for line in lines})
    order = [
        "samples",
        "unique",
        "evaluated",
        "from_store",
        "degenerate",
        "diverged",
        "failed",
        "best_reward",
        "controller_steps",
    ]
    if config.charge_store_hits:
        order.insert(order.index("from_store") + 1, "charged")
    result = {name: summary[name] for name in order}
    funnel = read_funnel(run_dir)
    if funnel is not None:
        unit = funnel.rungs[-1].cost
        result["rungs"] = funnel.counts()
        result["compute"] = round(funnel.spent() / unit, 6)
        result["budget"] = config.budget
    return result


def status_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """A :func:`status` summary as (name, value) rows; a funnel's rungs one row each."""
    rows: list[tuple[str, Any]] = []
    for name, value in summary.items():
        if name != "rungs":
            rows.append((name, value))
            continue
        for rung in value:
            counts = ", ".join(f"{key} {count}" for key, count in rung.items() if key != "rung")
            rows.append((f"rung {rung['rung']}", counts))
    return rows


def steps(run_dir: str | Path) -> Iterator[tuple[int, list[float]]]:
    """(controller step, rewards of its samples) in order."""
    by_step: dict[int, list[float]] = collections.defaultdict(list)
    for line in read_samples(run_dir):
        by_step[line["step"]].append(line["reward"])
    yield from sorted(by_step.items())
