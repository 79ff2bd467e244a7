"""Dedup-aware search runs that survive crashes: ``nos-sym search``.

One controller step:

1. sample a batch of rules from the policy (recording their log-probabilities);
2. canonicalize them; a degenerate rule gets reward 0 and is never evaluated;
3. answer every rule whose key the reward store already holds (from an earlier batch, an earlier
   run sharing the store, or an evaluation still in flight), and duplicates within the batch;
4. claim and dispatch only the new keys to the workers;
5. when the batch's results are in, update the controller with every sample's reward
   (duplicates included), append the samples to the log and write a checkpoint.

Every sample is exactly one of ``evaluated`` / ``from_store`` / ``degenerate``, and ``--budget``
counts evaluations paid for. With ``workers`` K the runner keeps up to ⌈K/batch⌉ batches in
flight, each sampled from the policy of its time; batches are folded into the controller in the
order they were sampled, using the log-probabilities recorded at sampling (so a stale batch is
weighted correctly by TRPO's importance ratio).

The run directory holds ``config.json`` (frozen; a resume with another config is an error),
``store.sqlite`` (unless ``--store`` shares one), ``samples.jsonl`` (one line per sample) and
``checkpoint.pt`` (controller, optimizer, baseline and RNG states, written atomically after every
update and loaded with ``torch.load(weights_only=True)``). A killed run resumes from its last
checkpoint: the samples of the unfinished step are drawn again from the restored RNG, and the
evaluations it had already paid for are answered from the store and still counted as evaluated.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import json
import math
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nos_sym.controller.algorithms import ALGORITHMS as ALGORITHM_CLASSES
from nos_sym.controller.algorithms import Algorithm, make_algorithm
from nos_sym.controller.policy import Samples
from nos_sym.controller.space import SPACES, get_space
from nos_sym.dsl import Rule, as_rule, parse
from nos_sym.evaluation.datasets import DATASETS
from nos_sym.evaluation.protocol import PROTOCOLS, get_protocol
from nos_sym.evaluation.store import Claim, Record, RewardStore

OUTCOMES = ("evaluated", "from_store", "degenerate")
BACKENDS = ("inline", "process", "ray", "gpu")
ALGORITHMS = tuple(ALGORITHM_CLASSES)
FROZEN = ("algo", "space", "groups", "dataset", "protocol", "seed", "eval_seed", "batch", "dedup")
"""Fields a resumed run must share with the run it resumes; the others are execution details."""


class SearchError(Exception):
    """A run that cannot start or resume (bad run directory, config mismatch, no CUDA, ...)."""


@dataclass(frozen=True)
class SearchConfig:
    """One search run. ``seed`` seeds the controller; ``eval_seed`` the child networks, and is
    part of a reward's identity (rule key, protocol hash, dataset, eval seed), so runs with
    different controller seeds still share rewards through a common store."""

    algo: str = "trpo"
    space: str = "paper"
    groups: int | None = None  # None: the space preset's number of groups
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

    def __post_init__(self):
        checks = [
            (self.algo in ALGORITHMS, f"--algo must be one of {', '.join(ALGORITHMS)}"),
            (self.space in SPACES, f"--space must be one of {', '.join(SPACES)}"),
            (self.protocol in PROTOCOLS, f"--protocol must be one of {', '.join(PROTOCOLS)}"),
            (self.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}"),
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}"),
            (self.dedup in ("key", "numeric"), "--dedup must be 'key' or 'numeric'"),
            (self.groups is None or 1 <= self.groups <= 3, "--groups must be 1, 2 or 3"),
            (self.batch >= 1, "--batch must be at least 1"),
            (self.budget >= 0, "--budget must be at least 0"),
            (self.workers >= 1, "--workers must be at least 1"),
            (self.max_samples is None or self.max_samples >= 1, "--max-samples must be ≥ 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SearchError(message)

    @property
    def sample_limit(self) -> int:
        return self.max_samples if self.max_samples is not None else 20 * max(self.budget, 1)


# --------------------------------------------------------------------------------------------
# Evaluation jobs and backends
# --------------------------------------------------------------------------------------------
def evaluate_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train the child with one rule (runs in a worker): a JSON-able result dict."""
    from nos_sym.evaluation.evaluator import evaluate

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    result = evaluate(
        job["dsl"],
        dataset=job["dataset"],
        protocol=job["protocol"],
        seed=job["seed"],
        device=job.get("device", "cpu"),
    )
    return result.store_fields()


def _failed(message: str) -> dict[str, Any]:
    return {
        "status": "failed",
        "reward": 0.0,
        "best_lr": None,
        "sweep": {},
        "seconds": 0.0,
        "device": "",
        "message": message[:2000],
    }


class InlineBackend:
    """Evaluations in this process, one after another, when submitted (deterministic)."""

    def submit(self, jobs: list[dict]) -> list[futures.Future]:
        done = []
        for job in jobs:
            future: futures.Future = futures.Future()
            try:
                future.set_result(evaluate_job(job))
            except Exception as error:  # a candidate's failure never stops the run
                future.set_result(_failed(f"{type(error).__name__}: {error}"))
            done.append(future)
        return done

    def close(self) -> None:
        pass


class ProcessBackend:
    """A spawn-based process pool of ``workers`` processes, each with cores/workers threads.

    A worker that dies breaks the whole pool, failing every job in it. Those jobs are tried
    again one at a time in a one-process quarantine pool: the job that dies there too is the
    culprit and is marked ``failed``; the others get their real result, and the run goes on.
    """

    def __init__(self, workers: int, function: Callable[[dict], dict] = evaluate_job):
        self.workers = workers
        self.function = function
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self._lock = threading.Lock()
        self._pools = {"main": self._new_pool(workers), "quarantine": self._new_pool(1)}
        self._quarantined: collections.deque[tuple[dict, futures.Future]] = collections.deque()
        self._quarantine_busy = False

    @staticmethod
    def _new_pool(workers: int) -> futures.ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return futures.ProcessPoolExecutor(max_workers=workers, mp_context=context)

    def submit(self, jobs: list[dict]) -> list[futures.Future]:
        results = []
        for job in jobs:
            outer: futures.Future = futures.Future()
            self._run({**job, "threads": self.threads}, outer)
            results.append(outer)
        return results

    def _submit(self, pool: str, job: dict) -> futures.Future:
        """Submit to the named pool, rebuilding it first if a dead worker broke it."""
        with self._lock:
            try:
                return self._pools[pool].submit(self.function, job)
            except futures.process.BrokenProcessPool:
                self._pools[pool] = self._new_pool(self.workers if pool == "main" else 1)
                return self._pools[pool].submit(self.function, job)

    def _run(self, job: dict, outer: futures.Future) -> None:
        def finish(inner: futures.Future) -> None:
            try:
                outer.set_result(inner.result())
            except futures.process.BrokenProcessPool:
                self._quarantine(job, outer)
            except Exception as error:
                outer.set_result(_failed(f"{type(error).__name__}: {error}"))

        self._submit("main", job).add_done_callback(finish)

    def _quarantine(self, job: dict, outer: futures.Future) -> None:
        """Queue a job of a broken pool for the one-process pool, which runs them one by one."""
        with self._lock:
            self._quarantined.append((job, outer))
            if self._quarantine_busy:
                return
            self._quarantine_busy = True
        self._next_quarantined()

    def _next_quarantined(self) -> None:
        with self._lock:
            if not self._quarantined:
                self._quarantine_busy = False
                return
            job, outer = self._quarantined.popleft()

        def finish(inner: futures.Future) -> None:
            try:
                outer.set_result(inner.result())
            except futures.process.BrokenProcessPool as error:
                outer.set_result(_failed(f"worker process died: {error}"))
            except Exception as error:
                outer.set_result(_failed(f"{type(error).__name__}: {error}"))
            self._next_quarantined()

        self._submit("quarantine", job).add_done_callback(finish)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


class RayBackend:
    """Ray tasks (one CPU each by default): ``ray.init()`` locally, or ``address`` for a cluster."""

    def __init__(self, workers: int, address: str | None):
        try:
            import ray
        except ImportError:
            raise SearchError("the ray backend needs Ray: pip install 'nos_sym[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        self._task = ray.remote(num_cpus=1, max_retries=0)(evaluate_job)

    def submit(self, jobs: list[dict]) -> list[futures.Future]:
        results = []
        for job in jobs:
            outer: futures.Future = futures.Future()
            inner = self._task.remote({**job, "threads": 1}).future()

            def finish(inner: futures.Future, outer: futures.Future = outer) -> None:
                try:
                    outer.set_result(inner.result())
                except Exception as error:  # a task error or a dead worker
                    outer.set_result(_failed(f"{type(error).__name__}: {error}"))

            inner.add_done_callback(finish)
            results.append(outer)
        return results

    def close(self) -> None:
        pass


class GpuBackend:
    """The batched GPU evaluator: each submitted batch of candidates (× the sweep's learning
    rates) is trained together as one stacked model, in a background thread."""

    def __init__(self):
        if not torch.cuda.is_available():
            raise SearchError("the gpu backend needs CUDA, and torch sees no GPU here")
        self._executor = futures.ThreadPoolExecutor(max_workers=1)

    def submit(self, jobs: list[dict]) -> list[futures.Future]:
        from nos_sym.evaluation.evaluator import evaluate_batch

        if not jobs:
            return []
        job = jobs[0]
        batch = self._executor.submit(
            evaluate_batch,
            [j["dsl"] for j in jobs],
            dataset=job["dataset"],
            protocol=job["protocol"],
            seed=job["seed"],
            device="cuda",
        )
        results = [futures.Future() for _ in jobs]

        def finish(batch: futures.Future) -> None:
            try:
                values = [r.store_fields() for r in batch.result()]
            except Exception as error:
                values = [_failed(f"{type(error).__name__}: {error}")] * len(jobs)
            for future, value in zip(results, values, strict=True):
                future.set_result(value)

        batch.add_done_callback(finish)
        return results

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def make_backend(config: SearchConfig):
    if config.backend == "inline":
        return InlineBackend()
    if config.backend == "process":
        return ProcessBackend(config.workers)
    if config.backend == "ray":
        return RayBackend(config.workers, config.ray_address)
    return GpuBackend()


# --------------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
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

    def store(self, config: SearchConfig) -> Path:
        return Path(config.store) if config.store else self.root / "store.sqlite"


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """The sample log of a run (a missing or empty log is an empty list)."""
    path = RunFiles(Path(run_dir)).samples
    if not path.exists():
        return []
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            raise SearchError(f"{path}:{number}: not a JSON line (a damaged log?)") from None
    return lines


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


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    path = RunFiles(Path(run_dir)).checkpoint
    return torch.load(path, weights_only=True) if path.exists() else None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """One sample of a batch waiting for its reward."""

    rule: Rule | None  # None: a result read back from the log
    outcome: str
    future: futures.Future | None = None  # its evaluation (or the one it shares)
    claim: Claim | None = None  # set on the sample that paid for the evaluation
    record: Record | None = None  # already finished in the store
    fingerprint: str | None = None


@dataclass
class _Batch:
    step: int
    samples: Samples
    pending: list[_Pending] = field(default_factory=list)


@dataclass
class Counters:
    """What a run's samples were: each is one of evaluated / from_store / degenerate; diverged
    and failed count the evaluated ones that ended so."""

    samples: int = 0
    evaluated: int = 0
    from_store: int = 0
    degenerate: int = 0
    diverged: int = 0
    failed: int = 0
    best_reward: float = 0.0
    controller_steps: int = 0

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


class SearchRun:
    """A search run bound to its directory; :meth:`run` goes on until the budget is paid."""

    def __init__(self, run_dir: str | Path, config: SearchConfig | None = None):
        self.files = RunFiles(Path(run_dir))
        self.config, self.run_id = self._open(config)
        groups = {} if self.config.groups is None else {"groups": self.config.groups}
        space = get_space(self.config.space, **groups)
        self.protocol = get_protocol(self.config.protocol)
        self.algorithm: Algorithm = make_algorithm(self.config.algo, space, self.config.seed)
        checkpoint = load_checkpoint(self.files.root)
        self.step = 0
        if checkpoint is not None:
            self.algorithm.load_state_dict(checkpoint["algorithm"])
            self.step = int(checkpoint["step"])
        self.lines = self._truncated_log()
        self.counters = Counters.of(self.lines, self.step)
        # fingerprint → the sample that answers it (--dedup numeric)
        self.fingerprints: dict[str, _Pending] = {
            line["fingerprint"]: _Pending(
                None,
                line["outcome"],
                record=_LoggedRecord(status=line["status"], reward=line["reward"]),
            )
            for line in self.lines
            if line.get("fingerprint")
        }
        self.seen_keys = {line["key"] for line in self.lines}  # keys already counted once
        self.store = RewardStore(self.files.store(self.config))
        self._in_flight_keys: dict[str, futures.Future] = {}

    # ---- set-up --------------------------------------------------------------------------
    def _open(self, config: SearchConfig | None) -> tuple[SearchConfig, str]:
        if self.files.config.exists():
            saved, run_id = load_config(self.files.root)
            if config is None:
                return saved, run_id
            mismatched = [name for name in FROZEN if getattr(saved, name) != getattr(config, name)]
            if mismatched:
                details = ", ".join(
                    f"{name}: {getattr(saved, name)!r} → {getattr(config, name)!r}"
                    for name in mismatched
                )
                raise SearchError(
                    f"{self.files.root} holds a run with another config ({details});"
                    " resume it with the same options or use a new --run-dir"
                )
            self._write_config(config, run_id)
            return config, run_id
        if config is None:
            raise SearchError(f"{self.files.root} is not a search run directory")
        self.files.root.mkdir(parents=True, exist_ok=True)
        run_id = f"run-{uuid.uuid4().hex[:12]}"
        self._write_config(config, run_id)
        return config, run_id

    def _write_config(self, config: SearchConfig, run_id: str) -> None:
        text = json.dumps({**dataclasses.asdict(config), "run_id": run_id}, indent=2)
        _atomic_write(self.files.config, lambda path: path.write_text(text + "\n"))

    def _truncated_log(self) -> list[dict[str, Any]]:
        """The log up to the last checkpointed step (later lines belong to an unfinished step)."""
        lines = read_samples(self.files.root)
        kept = [line for line in lines if line["step"] <= self.step]
        if len(kept) != len(lines):
            text = "".join(json.dumps(line) + "\n" for line in kept)
            _atomic_write(self.files.samples, lambda path: path.write_text(text))
        return kept

    # ---- one batch -----------------------------------------------------------------------
    def _job(self, rule: Rule) -> dict[str, Any]:
        return {
            "dsl": rule.dsl,
            "dataset": self.config.dataset,
            "protocol": self.config.protocol,
            "seed": self.config.eval_seed,
        }

    def _identity(self, key: str) -> tuple[str, str, str, int]:
        return key, self.protocol.hash, self.config.dataset, self.config.eval_seed

    def _classify(self, rule: Rule, paid: int, jobs: list) -> _Pending | None:
        """The outcome of one sample; None when it would exceed the budget."""
        first_time = rule.key not in self.seen_keys
        self.seen_keys.add(rule.key)
        if rule.is_degenerate:
            return _Pending(rule, "degenerate")
        fingerprint = rule.fingerprint() if self.config.dedup == "numeric" else None
        if rule.key in self._in_flight_keys:
            return _Pending(
                rule, "from_store", self._in_flight_keys[rule.key], fingerprint=fingerprint
            )
        if fingerprint in self.fingerprints:
            twin = self.fingerprints[fingerprint]
            return _Pending(
                rule, "from_store", twin.future, record=twin.record, fingerprint=fingerprint
            )
        pending = self._claim(rule, paid, jobs, first_time, fingerprint)
        if pending is not None and fingerprint is not None:
            self.fingerprints.setdefault(fingerprint, pending)
        return pending

    def _claim(
        self, rule: Rule, paid: int, jobs: list, first_time: bool, fingerprint: str | None
    ) -> _Pending | None:
        """Claim a new key in the store: ours to evaluate, already finished, or someone else's."""
        answer = self.store.claim(*self._identity(rule.key), dsl=rule.dsl, owner=self.run_id)
        if isinstance(answer, Record):
            # paid by this run before a crash, in the step being redone: still ours
            paid_by_us = (answer.extra or {}).get("run") == self.run_id and first_time
            outcome = "evaluated" if paid_by_us else "from_store"
            if outcome == "evaluated" and paid >= self.config.budget:
                return None
            return _Pending(rule, outcome, record=answer, fingerprint=fingerprint)
        if paid >= self.config.budget:
            if isinstance(answer, Claim):
                self.store.release(answer)
            return None
        if answer is None:  # another run is evaluating it: wait for its result
            future = _poll(self.store, self._identity(rule.key))
            pending = _Pending(rule, "from_store", future=future, fingerprint=fingerprint)
        else:
            future = futures.Future()
            jobs.append((self._job(rule), future))
            pending = _Pending(
                rule, "evaluated", future=future, claim=answer, fingerprint=fingerprint
            )
        self._in_flight_keys[rule.key] = pending.future
        return pending

    def _new_batch(self, backend, paid: int) -> _Batch | None:
        samples = self.algorithm.sample(self.config.batch)
        batch = _Batch(step=0, samples=samples)  # numbered by run()
        jobs: list[tuple[dict, futures.Future]] = []
        for dsl in samples.dsl:
            pending = self._classify(as_rule(dsl), paid, jobs)
            if pending is None:  # the budget is spent: the batch ends here
                break
            paid += pending.outcome == "evaluated"
            batch.pending.append(pending)
        if len(batch.pending) < len(samples):
            batch.samples = samples.subset(list(range(len(batch.pending))))
        submitted = backend.submit([job for job, _ in jobs])
        for (_, future), result in zip(jobs, submitted, strict=True):
            result.add_done_callback(lambda done, future=future: future.set_result(done.result()))
        return batch if batch.pending else None

    def _finish(self, batch: _Batch) -> None:
        """Wait for a batch, record its evaluations, update the controller, log, checkpoint."""
        lines = []
        for index, pending in enumerate(batch.pending):
            result = self._result(pending)
            lines.append(
                {
                    "step": batch.step,
                    "index": index,
                    "dsl": pending.rule.dsl,
                    "key": pending.rule.key,
                    "outcome": pending.outcome,
                    **result,
                    **({"fingerprint": pending.fingerprint} if pending.fingerprint else {}),
                }
            )
        rewards = torch.tensor([line["reward"] for line in lines], dtype=torch.float64)
        stats = self.algorithm.update(batch.samples, rewards)
        self.step = batch.step
        with open(self.files.samples, "a") as log:
            log.writelines(json.dumps(line) + "\n" for line in lines)
            log.flush()
            os.fsync(log.fileno())
        state = {
            "step": self.step,
            "algorithm": self.algorithm.state_dict(),
            "last_update": {k: float(v) for k, v in stats.items()},
        }
        _atomic_write(self.files.checkpoint, lambda path: torch.save(state, path))
        for line in lines:
            self.counters.add(line)
        self.counters.controller_steps = self.step

    def _result(self, pending: _Pending) -> dict[str, Any]:
        if pending.outcome == "degenerate":
            return {"status": "degenerate", "reward": 0.0}
        if pending.record is not None:
            return {"status": pending.record.status, "reward": float(pending.record.reward)}
        value = pending.future.result()
        if pending.claim is not None:
            fields = {**value, "reward": _finite(value["reward"])}
            record = self.store.complete(pending.claim, **fields, extra={"run": self.run_id})
            self._in_flight_keys.pop(pending.rule.key, None)
            return {"status": record.status, "reward": record.reward}
        return {"status": value["status"], "reward": _finite(value["reward"])}

    # ---- the loop ------------------------------------------------------------------------
    def run(self, progress: Callable[[Counters], None] | None = None, backend=None) -> Counters:
        """Go on until ``budget`` evaluations are paid (or ``max_samples`` samples are drawn).
        ``backend`` replaces the configured one (anything with ``submit(jobs) -> futures``)."""
        backend = backend or make_backend(self.config)
        in_flight: collections.deque[_Batch] = collections.deque()
        depth = (
            1
            if self.config.backend == "inline"
            else max(1, math.ceil(self.config.workers / self.config.batch))
        )
        try:
            while True:
                paid = self.counters.evaluated + sum(
                    p.outcome == "evaluated" for b in in_flight for p in b.pending
                )
                drawn = self.counters.samples + sum(len(b.pending) for b in in_flight)
                can_sample = paid < self.config.budget and drawn < self.config.sample_limit
                if can_sample and len(in_flight) < depth:
                    batch = self._new_batch(backend, paid)
                    if batch is not None:
                        batch.step = self.step + 1 + len(in_flight)
                        in_flight.append(batch)
                        continue
                if not in_flight:
                    break
                self._finish(in_flight.popleft())
                if progress is not None:
                    progress(self.counters)
        finally:
            backend.close()
            self.store.close()
        return self.counters


@dataclass(frozen=True)
class _LoggedRecord:
    """A result read back from the sample log (stands in for a store record)."""

    status: str
    reward: float


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _poll(store: RewardStore, identity: tuple, every: float = 1.0) -> futures.Future:
    """A future resolved when another worker finishes evaluating ``identity``."""
    future: futures.Future = futures.Future()
    path = store.path

    def wait() -> None:
        with RewardStore(path) as reader:
            while (record := reader.get(*identity)) is None:
                time.sleep(every)
        future.set_result({"status": record.status, "reward": record.reward})

    threading.Thread(target=wait, daemon=True).start()
    return future


# --------------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------------
def leaderboard(run_dir: str | Path, n: int = 10) -> list[dict[str, Any]]:
    """The run's distinct rules by reward: ``{"dsl", "key", "reward", "status", "latex"}``."""
    best: dict[str, dict[str, Any]] = {}
    for line in read_samples(run_dir):
        if line["outcome"] != "degenerate" and line["key"] not in best:
            best[line["key"]] = line
    ranked = sorted(best.values(), key=lambda line: (-line["reward"], line["dsl"]))[:n]
    return [
        {
            "dsl": line["dsl"],
            "key": line["key"],
            "reward": line["reward"],
            "status": line["status"],
            "latex": parse(line["dsl"]).latex(),
        }
        for line in ranked
    ]


def status(run_dir: str | Path) -> dict[str, Any]:
    """Counts of a run: samples, unique keys, evaluated, from_store, degenerate, diverged,
    failed, best reward, controller steps."""
    load_config(run_dir)
    lines = read_samples(run_dir)
    checkpoint = load_checkpoint(run_dir)
    counters = Counters.of(lines, int(checkpoint["step"]) if checkpoint else 0)
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
    return {name: summary[name] for name in order}


def steps(run_dir: str | Path) -> Iterator[tuple[int, list[float]]]:
    """(controller step, rewards of its samples) in order."""
    by_step: dict[int, list[float]] = collections.defaultdict(list)
    for line in read_samples(run_dir):
        by_step[line["step"]].append(line["reward"])
    yield from sorted(by_step.items())
