"""Where a search's candidates train: the evaluation backends (inline, process, Ray, GPU).

A backend takes :class:`Job` records and returns one future per job, resolved with the job's
:class:`~nos_sym.evaluation.outcome.EvalResult`; a candidate's failure (an exception, a dead
worker) resolves its future with a ``failed`` result, never an exception, so the run goes on. To
add a backend: a class with ``submit`` and ``close`` (the :class:`Backend` protocol), a name in
:data:`BACKENDS` and a branch in :func:`make_backend`. Jobs and :func:`evaluate_job` are
module-level and picklable, for worker processes and Ray tasks.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from nos_sym.choices import BACKENDS
from nos_sym.errors import SearchError
from nos_sym.evaluation.outcome import EvalResult
from nos_sym.tasks.base import Task

__all__ = [
    "BACKENDS",
    "Backend",
    "GpuBackend",
    "InlineBackend",
    "Job",
    "ProcessBackend",
    "RayBackend",
    "evaluate_job",
    "failed",
    "make_backend",
]

MESSAGE_LIMIT = 2000
"""Characters kept of a failure's message."""


@dataclass(frozen=True)
class Job:
    """One candidate to train: a rule (its DSL and canonical key) on a task, under a protocol
    and seed. The task travels to process and Ray workers pickled (see
    :mod:`nos_sym.tasks.base` for what that asks of your own task)."""

    dsl: str
    key: str
    task: Task
    protocol: str
    seed: int
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads in the worker (None: torch's default)


class Backend(Protocol):
    """What a search run needs of a backend."""

    def submit(self, jobs: Sequence[Job]) -> list[futures.Future[EvalResult]]:
        """Start the jobs; one future per job, in order, never resolved with an exception."""
        ...

    def close(self) -> None:
        """Wait for the running jobs and free the workers."""
        ...


def evaluate_job(job: Job) -> EvalResult:
    """Score one rule on the job's task (runs in a worker)."""
    from nos_sym.tasks.base import evaluate_rule

    if job.threads:
        torch.set_num_threads(job.threads)
    return evaluate_rule(
        job.dsl, task=job.task, protocol=job.protocol, seed=job.seed, device=job.device
    )


def failed(job: Job, error: BaseException | str) -> EvalResult:
    """The ``failed`` result of a job that raised or whose worker died."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return EvalResult(
        dsl=job.dsl,
        key=job.key,
        status="failed",
        reward=0.0,
        message=message[:MESSAGE_LIMIT],
        seed=job.seed,
    )


class InlineBackend:
    """Evaluations in this process, one after another, when submitted (deterministic)."""

    def submit(self, jobs: Sequence[Job]) -> list[futures.Future[EvalResult]]:
        done = []
        for job in jobs:
            future: futures.Future[EvalResult] = futures.Future()
            try:
                future.set_result(evaluate_job(job))
            except Exception as error:  # a candidate's failure never stops the run
                future.set_result(failed(job, error))
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

    def __init__(self, workers: int, function: Callable[[Job], EvalResult] = evaluate_job):
        self.workers = workers
        self.function = function
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self._lock = threading.Lock()
        self._pools = {"main": self._new_pool(workers), "quarantine": self._new_pool(1)}
        self._quarantined: collections.deque[tuple[Job, futures.Future]] = collections.deque()
        self._quarantine_busy = False

    @staticmethod
    def _new_pool(workers: int) -> futures.ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return futures.ProcessPoolExecutor(max_workers=workers, mp_context=context)

    def submit(self, jobs: Sequence[Job]) -> list[futures.Future[EvalResult]]:
        results = []
        for job in jobs:
            outer: futures.Future[EvalResult] = futures.Future()
            self._run(dataclasses.replace(job, threads=self.threads), outer)
            results.append(outer)
        return results

    def _submit(self, pool: str, job: Job) -> futures.Future:
        """Submit to the named pool, rebuilding it first if a dead worker broke it."""
        with self._lock:
            try:
                return self._pools[pool].submit(self.function, job)
            except futures.process.BrokenProcessPool:
                self._pools[pool] = self._new_pool(self.workers if pool == "main" else 1)
                return self._pools[pool].submit(self.function, job)

    def _run(self, job: Job, outer: futures.Future) -> None:
        def finish(inner: futures.Future) -> None:
            try:
                outer.set_result(inner.result())
            except futures.process.BrokenProcessPool:
                self._quarantine(job, outer)
            except Exception as error:
                outer.set_result(failed(job, error))

        self._submit("main", job).add_done_callback(finish)

    def _quarantine(self, job: Job, outer: futures.Future) -> None:
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
                outer.set_result(failed(job, f"worker process died: {error}"))
            except Exception as error:
                outer.set_result(failed(job, error))
            self._next_quarantined()

        self._submit("quarantine", job).add_done_callback(finish)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


class RayBackend:
    """Ray tasks (one CPU each by default): ``ray.init()`` locally, or ``address`` for a cluster.

    A local Ray's workers get this process's ``sys.path`` as their ``PYTHONPATH``, so a task
    defined in any module this process can import (a test file, a script's sibling module) is
    found by name in the workers; on a cluster, the task's module must be importable on every
    node (installed, or shipped with Ray's ``runtime_env``)."""

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
                paths = os.pathsep.join(path for path in sys.path if path)
                ray.init(
                    num_cpus=workers,
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env={"env_vars": {"PYTHONPATH": paths}},
                )
        self._task = ray.remote(num_cpus=1, max_retries=0)(evaluate_job)

    def submit(self, jobs: Sequence[Job]) -> list[futures.Future[EvalResult]]:
        results = []
        for job in jobs:
            outer: futures.Future[EvalResult] = futures.Future()
            inner = self._task.remote(dataclasses.replace(job, threads=1)).future()

            def finish(inner: futures.Future, outer: futures.Future = outer, job: Job = job):
                try:
                    outer.set_result(inner.result())
                except Exception as error:  # a task error or a dead worker
                    outer.set_result(failed(job, error))

            inner.add_done_callback(finish)
            results.append(outer)
        return results

    def close(self) -> None:
        pass


class GpuBackend:
    """The batched GPU evaluator: each submitted batch of candidates (× the sweep's learning
    rates) on the child task is trained together as one stacked model, in a background thread;
    on any other task the batch's jobs run one after another on the GPU, in that thread."""

    def __init__(self):
        if not torch.cuda.is_available():
            raise SearchError("the gpu backend needs CUDA, and torch sees no GPU here")
        self._executor = futures.ThreadPoolExecutor(max_workers=1)

    def submit(self, jobs: Sequence[Job]) -> list[futures.Future[EvalResult]]:
        from nos_sym.evaluation.evaluator import evaluate_batch
        from nos_sym.tasks.child import ChildTask

        if not jobs:
            return []
        first = jobs[0]
        if isinstance(first.task, ChildTask):
            batch = self._executor.submit(
                evaluate_batch,
                [job.dsl for job in jobs],
                dataset=first.task.dataset,
                protocol=first.task.protocol(first.protocol),
                seed=first.seed,
                device="cuda",
            )
        else:
            cuda = [dataclasses.replace(job, device="cuda") for job in jobs]
            batch = self._executor.submit(lambda: [evaluate_job(job) for job in cuda])
        results: list[futures.Future[EvalResult]] = [futures.Future() for _ in jobs]

        def finish(batch: futures.Future) -> None:
            try:
                values = batch.result()
            except Exception as error:
                values = [failed(job, error) for job in jobs]
            for future, value in zip(results, values, strict=True):
                future.set_result(value)

        batch.add_done_callback(finish)
        return results

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def make_backend(name: str, workers: int = 1, ray_address: str | None = None) -> Backend:
    """The backend called ``name`` (one of :data:`BACKENDS`) with ``workers`` workers."""
    if name == "inline":
        return InlineBackend()
    if name == "process":
        return ProcessBackend(workers)
    if name == "ray":
        return RayBackend(workers, ray_address)
    if name == "gpu":
        return GpuBackend()
    raise SearchError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
