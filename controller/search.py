"""The search run: ``nos-sym search``, a dedup-aware loop that survives crashes.

One controller step:

1. sample a batch of rules from the policy (recording their log-probabilities);
2. canonicalize them; a degenerate rule gets reward 0 and is never evaluated;
3. answer every rule whose key the reward store already holds (from an earlier batch, an earlier
   run sharing the store, or an evaluation still in flight), and duplicates within the batch;
4. claim and dispatch only the new keys to the backend (:mod:`nos_sym.controller.backends`);
5. when the batch's results are in, update the controller with every sample's reward
   (duplicates included), append the samples to the log and write a checkpoint.

Every sample is exactly one of ``evaluated`` / ``from_store`` / ``degenerate``, and ``--budget``
counts evaluations paid for. With ``charge_store_hits`` (``nos-sym study``'s arms, which share one
store), the first time this run asks for a key that another run paid for (or is evaluating), the
sample is ``from_store`` with ``"charged": true`` and costs budget as if this run had trained it:
budget spent = evaluated + charged, and still samples = evaluated + from_store + degenerate (a
promotion's line has ``charged``: its seeds answered by another run, charged at its rung's cost).

With ``workers`` K the runner keeps up to ⌈K/batch⌉ batches in flight, each sampled from the
policy of its time; batches are folded into the controller in the order they were sampled, using
the log-probabilities recorded at sampling (so a stale batch is weighted correctly by TRPO's
importance ratio).

A key another run is evaluating is waited for through :meth:`RewardStore.wait`; if that run
stops without a result (its lease released or expired), the sample is ``failed`` (reward 0) and
the key stays free for a later sample.

With ``--rungs`` the samples are rung 0 of a successive-halving funnel
(:mod:`nos_sym.controller.funnel`): the promotions it decides are claimed in the store under
their rung's protocol and trained by the same backend, started before new samples; their results
are appended to the log and never reach the controller (its reward is the rung-0 reward), and
the budget counts training steps, ``budget`` evaluations of the last rung.

The run directory's files (config, sample log, checkpoint) and the readers of a run are
:mod:`nos_sym.controller.rundir`; the names of both modules are re-exported here. A killed run
resumes from its last checkpoint: the samples of the unfinished step are drawn again from the
restored RNG, and the evaluations it had already paid for are answered from the store and still
counted as evaluated.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import json
import math
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nos_sym.controller.algorithms import Algorithm, make_algorithm
from nos_sym.controller.backends import (
    BACKENDS,
    Backend,
    GpuBackend,
    InlineBackend,
    Job,
    ProcessBackend,
    RayBackend,
    evaluate_job,
    failed,
    make_backend,
)
from nos_sym.controller.evolution import RegularizedEvolution
from nos_sym.controller.funnel import Funnel, Promotion, make_rungs, seed_stats
from nos_sym.controller.policy import Samples
from nos_sym.controller.rundir import (
    ALGORITHMS,
    FROZEN,
    OUTCOMES,
    Counters,
    RunFiles,
    SearchConfig,
    SearchError,
    atomic_write,
    check_resumable,
    leaderboard,
    load_checkpoint,
    load_config,
    read_log,
    read_samples,
    status,
    steps,
    write_checkpoint_step,
)
from nos_sym.controller.space import get_space
from nos_sym.dsl import Rule, as_rule
from nos_sym.evaluation.outcome import EvalResult
from nos_sym.evaluation.store import Claim, LeaseKeeper, Record, RewardStore
from nos_sym.tasks.base import Task

__all__ = [
    "ALGORITHMS",
    "BACKENDS",
    "FROZEN",
    "OUTCOMES",
    "Backend",
    "Counters",
    "GpuBackend",
    "InlineBackend",
    "Job",
    "ProcessBackend",
    "RayBackend",
    "RunFiles",
    "SearchConfig",
    "SearchError",
    "SearchRun",
    "evaluate_job",
    "leaderboard",
    "load_checkpoint",
    "load_config",
    "make_backend",
    "read_samples",
    "status",
    "steps",
]


@dataclass
class _Pending:
    """One sample of a batch waiting for its reward."""

    rule: Rule | None  # None: a result read back from the log
    outcome: str
    future: futures.Future[EvalResult] | None = None  # its evaluation (or the one it shares)
    claim: Claim | None = None  # set on the sample that paid for the evaluation
    result: EvalResult | None = None  # already known (finished in the store, or in the log)
    fingerprint: str | None = None
    charged: bool = False  # from_store, but charged to the budget (--charge-store-hits)


@dataclass
class _Running:
    """A promotion in flight: one part per seed of its rung, ``paid`` of them ours to pay."""

    promotion: Promotion
    parts: list[_Pending]
    paid: int
    charged: int = 0  # seeds answered by another run's evaluation, charged as if paid

    @property
    def cost(self) -> int:
        """Seeds charged to the budget: paid, and answered by another run but charged."""
        return self.paid + self.charged


@dataclass
class _Batch:
    step: int
    samples: Samples
    pending: list[_Pending] = field(default_factory=list)


class SearchRun:
    """A search run bound to its directory; :meth:`run` goes on until the budget is paid."""

    def __init__(
        self, run_dir: str | Path, config: SearchConfig | None = None, task: Task | None = None
    ):
        self.files = RunFiles(Path(run_dir))
        # everything is read and checked (config, checkpoint, log, store) before anything is
        # written, so a damaged file stops the run with the directory as it was
        self.config, self.run_id, write_config = self._open(config)
        groups = {} if self.config.groups is None else {"groups": self.config.groups}
        space = get_space(self.config.space, **groups)
        self.task = self._task(task)
        known = self.task.known_protocols
        if self.config.protocol not in known:
            raise SearchError(
                f"--protocol must be one of {', '.join(known)} (task {self.task.name!r})"
            )
        for name in self.config.rungs or ():
            if name not in known:
                raise SearchError(
                    f"--rungs: unknown protocol {name!r}; known: {', '.join(known)}"
                    f" (task {self.task.name!r})"
                )
        self.rungs = make_rungs(
            self.task, self.config.ladder, self.config.eval_seed, self.config.final_seeds
        )
        self.protocol = self.task.protocol(self.config.ladder[0])
        # the budget in training steps: `budget` evaluations of the last rung
        self.limit = self.config.budget * self.rungs[-1].cost
        # without --max-samples: 20 × the rung-0 evaluations the budget buys
        self.sample_limit = (
            self.config.sample_limit
            if self.config.rungs is None or self.config.max_samples is not None
            else 20 * max(self.limit // self.rungs[0].cost, 1)
        )
        self.algorithm: Algorithm = make_algorithm(
            self.config.algo, space, self.config.seed, **self.config.hyperparameters
        )
        checkpoint = load_checkpoint(self.files.root)
        self.step = 0
        if checkpoint is not None:
            self.algorithm.load_state_dict(checkpoint["algorithm"])
            self.step = int(checkpoint["step"])
        lines, torn = read_log(self.files.root)
        self.files.root.mkdir(parents=True, exist_ok=True)
        self.store = RewardStore(self.files.store(self.config))
        self.store.describe_task(self.task.identity, self.task.describe())
        if write_config:
            self._write_config(self.config, self.run_id)
        self.lines = self._truncated_log(lines, torn)
        samples = [line for line in self.lines if "rung" not in line]
        self.counters = Counters.of(samples, self.step)
        # fingerprint → the sample that answers it (--dedup numeric)
        self.fingerprints: dict[str, _Pending] = {
            line["fingerprint"]: _Pending(None, line["outcome"], result=_logged(line))
            for line in samples
            if line.get("fingerprint")
        }
        self.seen_keys = {line["key"] for line in samples}  # keys already counted once
        # the funnel replayed from the log: promotions decided but not logged (in flight at a
        # crash, or waiting for budget) are started again, in the order they were decided
        self.funnel = Funnel(self.rungs, self.config.promote)
        for line in self.lines:
            self.funnel.fold(line)
        self._queue: collections.deque[Promotion] = collections.deque(self.funnel.pending.values())
        self._running: list[_Running] = []
        if isinstance(self.algorithm, RegularizedEvolution):
            # a child this run has already met is mutated again: its reward would come from the
            # store. Judged on the run's own log (restored exactly on resume), not on the store,
            # which may hold rewards a crashed step paid for, so a resumed run samples as the
            # uninterrupted one did.
            self.algorithm.known = lambda dsl: as_rule(dsl).key in self.seen_keys
        self._in_flight_keys: dict[str, futures.Future[EvalResult]] = {}

    # ---- set-up --------------------------------------------------------------------------
    def _open(self, config: SearchConfig | None) -> tuple[SearchConfig, str, bool]:
        """(config, run id, whether config.json is to be written); reads only."""
        if self.files.config.exists():
            saved, run_id = load_config(self.files.root)
            if config is None:
                return saved, run_id, False
            check_resumable(self.files.root, saved, config)
            return config, run_id, True
        if config is None:
            raise SearchError(f"{self.files.root} is not a search run directory")
        return config, f"run-{uuid.uuid4().hex[:12]}", True

    def _task(self, task: Task | None) -> Task:
        """The run's task: the given object (from Python; the config names it by identity), or
        the one the config's spec names."""
        if task is None:
            return self.config.resolved_task()
        if task.identity != self.config.task:
            raise SearchError(
                f"{self.files.root} holds a run on task {self.config.task!r}, not on "
                f"{task.identity!r}; use a new --run-dir"
            )
        return task

    def _write_config(self, config: SearchConfig, run_id: str) -> None:
        text = json.dumps({**dataclasses.asdict(config), "run_id": run_id}, indent=2)
        atomic_write(self.files.config, lambda path: path.write_text(text + "\n"))
        if config.rungs is not None:  # the rungs' declared costs, for the readers of the run
            table = json.dumps({"rungs": [rung.to_json() for rung in self.rungs]}, indent=2)
            atomic_write(self.files.funnel, lambda path: path.write_text(table + "\n"))

    def _truncated_log(self, lines: list[dict[str, Any]], torn: bool) -> list[dict[str, Any]]:
        """The log up to the last checkpointed step (later lines belong to an unfinished step),
        rewritten without those lines and without a torn last line, so that appends go on after
        the last complete line."""
        kept = [line for line in lines if line["step"] <= self.step]
        if torn or len(kept) != len(lines):
            text = "".join(json.dumps(line) + "\n" for line in kept)
            atomic_write(self.files.samples, lambda path: path.write_text(text))
        return kept

    # ---- one batch -----------------------------------------------------------------------
    def _job(self, rule: Rule, rung: int = 0, seed: int | None = None) -> Job:
        return Job(
            dsl=rule.dsl,
            key=rule.key,
            task=self.task,
            protocol=self.rungs[rung].protocol,
            seed=self.config.eval_seed if seed is None else seed,
        )

    def _identity(
        self, key: str, rung: int = 0, seed: int | None = None
    ) -> tuple[str, str, str, int]:
        """A reward's identity in the store: (key, the rung's protocol hash, task, seed)."""
        seed = self.config.eval_seed if seed is None else seed
        return key, self.rungs[rung].hash, self.task.identity, seed

    def _fits(self, spent: int, cost: int) -> bool:
        """Whether ``cost`` more training steps stay within the budget."""
        return spent + cost <= self.limit

    def _classify(self, rule: Rule, spent: int, jobs: list) -> _Pending | None:
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
                rule, "from_store", twin.future, result=twin.result, fingerprint=fingerprint
            )
        pending = self._claim(rule, spent, jobs, first_time, fingerprint)
        if pending is not None and fingerprint is not None:
            self.fingerprints.setdefault(fingerprint, pending)
        return pending

    def _claim(
        self, rule: Rule, spent: int, jobs: list, first_time: bool, fingerprint: str | None
    ) -> _Pending | None:
        """Claim a new key in the store: ours to evaluate, already finished, or someone else's.
        With ``charge_store_hits``, a key this run asks for the first time that another run
        paid for (or is evaluating) is charged as if this run had trained it."""
        answer = self.store.claim(*self._identity(rule.key), dsl=rule.dsl, owner=self.run_id)
        charged = self.config.charge_store_hits and first_time
        if isinstance(answer, Record):
            # paid by this run before a crash, in the step being redone: still ours
            paid_by_us = (answer.extra or {}).get("run") == self.run_id and first_time
            outcome = "evaluated" if paid_by_us else "from_store"
            charged = charged and not paid_by_us
            if (paid_by_us or charged) and not self._fits(spent, self.rungs[0].cost):
                return None
            return _Pending(
                rule, outcome, result=answer.result, fingerprint=fingerprint, charged=charged
            )
        if not self._fits(spent, self.rungs[0].cost):
            if isinstance(answer, Claim):
                self.store.release(answer)
            return None
        if answer is None:  # another run is evaluating it: wait for its result
            future = self._wait(rule)
            pending = _Pending(
                rule, "from_store", future=future, fingerprint=fingerprint, charged=charged
            )
        else:
            future = futures.Future()
            jobs.append((self._job(rule), future))
            self.leases.hold(answer)
            pending = _Pending(
                rule, "evaluated", future=future, claim=answer, fingerprint=fingerprint
            )
        self._in_flight_keys[rule.key] = pending.future
        return pending

    def _new_batch(self, backend: Backend, spent: int) -> _Batch | None:
        samples = self.algorithm.sample(self.config.batch)
        batch = _Batch(step=0, samples=samples)  # numbered by run()
        jobs: list[tuple[Job, futures.Future[EvalResult]]] = []
        for dsl in samples.dsl:
            pending = self._classify(as_rule(dsl), spent, jobs)
            if pending is None:  # the budget is spent: the batch ends here
                break
            spent += _charged(pending) * self.rungs[0].cost
            batch.pending.append(pending)
        if len(batch.pending) < len(samples):
            batch.samples = samples.subset(list(range(len(batch.pending))))
        _submit(backend, jobs)
        return batch if batch.pending else None

    # ---- promotions ----------------------------------------------------------------------
    def _start(self, promotion: Promotion, backend: Backend, spent: int) -> _Running | None:
        """Claim a promotion's seeds at its rung and submit those to pay; None (nothing
        claimed) when what it may have to pay would exceed the budget."""
        rung = self.rungs[promotion.rung]
        rule = as_rule(promotion.dsl)
        identities = [self._identity(rule.key, rung.index, seed) for seed in rung.seeds]

        def ours(answer: Record | Claim | None) -> bool:
            # a record this run paid for is one redone after a crash: still ours (a promotion
            # is started once per run)
            return isinstance(answer, Claim) or (
                isinstance(answer, Record) and (answer.extra or {}).get("run") == self.run_id
            )

        # judged before claiming (a claim released at once would stop another run waiting)
        records = [self.store.get(*identity) for identity in identities]
        charge = self.config.charge_store_hits  # every seed costs, whoever trained it
        at_most = sum(charge or record is None or ours(record) for record in records)
        if not self._fits(spent, at_most * rung.cost):
            return None
        answers = [
            self.store.claim(*identity, dsl=rule.dsl, owner=self.run_id) for identity in identities
        ]
        mine = [ours(answer) for answer in answers]
        parts, jobs = [], []
        for seed, answer, paying in zip(rung.seeds, answers, mine, strict=True):
            outcome = "evaluated" if paying else "from_store"
            if isinstance(answer, Record):
                parts.append(_Pending(rule, outcome, result=answer.result))
            elif answer is None:  # another run is evaluating it
                parts.append(_Pending(rule, outcome, future=self._wait(rule, rung.index, seed)))
            else:
                future: futures.Future[EvalResult] = futures.Future()
                jobs.append((self._job(rule, rung.index, seed), future))
                self.leases.hold(answer)
                parts.append(_Pending(rule, outcome, future=future, claim=answer))
        for job in jobs:  # one seed a submission: the gpu backend trains a batch under one seed
            _submit(backend, [job])
        return _Running(promotion, parts, sum(mine), charge * (len(mine) - sum(mine)))

    def _start_promotions(self, backend: Backend, spent: int) -> int:
        """Start the waiting promotions in the order they were decided, while they fit the
        budget; the training steps committed afterwards."""
        while self._queue:
            running = self._start(self._queue[0], backend, spent)
            if running is None:
                break
            self._queue.popleft()
            self._running.append(running)
            spent += running.cost * self.rungs[running.promotion.rung].cost
        return spent

    def _promotion_lines(self, step: int, wait: bool) -> list[dict[str, Any]]:
        """The log lines of the promotions that are done (``wait``: of all of them), in the
        order they started; their evaluations are stored."""
        lines, still = [], []
        for running in self._running:
            done = all(part.result is not None or part.future.done() for part in running.parts)
            if not (wait or done):
                still.append(running)
                continue
            results = [self._resolved(part) for part in running.parts]
            promotion, rung = running.promotion, self.rungs[running.promotion.rung]
            rewards = [result.reward for result in results]
            lines.append(
                {
                    "step": step,
                    "rung": promotion.rung,
                    "key": promotion.key,
                    "dsl": promotion.dsl,
                    "protocol": rung.protocol,
                    "seeds": list(rung.seeds),
                    "outcome": "evaluated" if running.paid else "from_store",
                    "paid": running.paid,
                    **({"charged": running.charged} if self.config.charge_store_hits else {}),
                    "status": next((r.status for r in results if r.status != "ok"), "ok"),
                    "reward": seed_stats(rewards)[0],
                    "rewards": rewards,
                    "seconds": sum(
                        result.seconds
                        for result, part in zip(results, running.parts, strict=True)
                        if part.outcome == "evaluated"
                    ),
                    **({"fingerprint": promotion.fingerprint} if promotion.fingerprint else {}),
                }
            )
        self._running = still
        return lines

    def _append(self, lines: list[dict[str, Any]]) -> None:
        """Append lines to the sample log, fsynced."""
        with open(self.files.samples, "a") as log:
            log.writelines(json.dumps(line) + "\n" for line in lines)
            log.flush()
            os.fsync(log.fileno())

    def _fold(self, lines: list[dict[str, Any]]) -> None:
        """Fold logged lines into the funnel, in log order; queue the promotions decided."""
        for line in lines:
            self._queue.extend(self.funnel.fold(line))

    def _drain(self) -> None:
        """Wait for the promotions in flight, log them (under the last step) and fold them."""
        lines = self._promotion_lines(self.step, wait=True)
        self._append(lines)
        self._fold(lines)

    @property
    def compute(self) -> float:
        """Compute paid for so far (logged), in evaluations of the last rung."""
        return self.funnel.spent() / self.rungs[-1].cost

    def _finish(self, batch: _Batch) -> None:
        """Wait for a batch, record its evaluations, update the controller, log, checkpoint."""
        lines = []
        for index, pending in enumerate(batch.pending):
            result = None if pending.outcome == "degenerate" else self._resolved(pending)
            lines.append(
                {
                    "step": batch.step,
                    "index": index,
                    "dsl": pending.rule.dsl,
                    "key": pending.rule.key,
                    "outcome": pending.outcome,
                    "status": "degenerate" if result is None else result.status,
                    "reward": 0.0 if result is None else result.reward,
                    **({"fingerprint": pending.fingerprint} if pending.fingerprint else {}),
                    **({"charged": True} if pending.charged else {}),
                }
            )
            if self.config.rungs is not None and pending.outcome == "evaluated":
                lines[-1]["seconds"] = result.seconds  # measured, for the funnel's report
        # the controller's reward is the sample's own (rung 0): promotions never reach it
        rewards = torch.tensor([line["reward"] for line in lines], dtype=torch.float64)
        stats = self.algorithm.update(batch.samples, rewards)
        self.step = batch.step
        promoted = self._promotion_lines(batch.step, wait=False)
        self._append(lines + promoted)
        state = {
            "step": self.step,
            "algorithm": self.algorithm.state_dict(),
            "last_update": {k: float(v) for k, v in stats.items()},
        }
        atomic_write(self.files.checkpoint, lambda path: torch.save(state, path))
        write_checkpoint_step(self.files.root, self.step)
        for line in lines:
            self.counters.add(line)
        self.counters.controller_steps = self.step
        self._fold(lines + promoted)

    def _resolved(self, pending: _Pending) -> EvalResult:
        """The result of an evaluation, waiting for it; the part that paid for it stores it."""
        result = pending.result or pending.future.result()
        if pending.claim is not None:
            record = self.store.complete(pending.claim, result, extra={"run": self.run_id})
            self.leases.drop(pending.claim)
            self._in_flight_keys.pop(pending.rule.key, None)
            result = record.result
        return result

    def _wait(
        self, rule: Rule, rung: int = 0, seed: int | None = None
    ) -> futures.Future[EvalResult]:
        """A future resolved when the run holding the lease on ``rule`` (at ``rung``, ``seed``)
        finishes it; ``failed`` if that run stops without a result (the key is released, free
        for a later sample)."""
        future: futures.Future[EvalResult] = futures.Future()
        identity, path = self._identity(rule.key, rung, seed), self.store.path

        def wait() -> None:
            with RewardStore(path) as reader:  # a connection of this thread's own
                answer = reader.wait(*identity, dsl=rule.dsl, owner=self.run_id)
                if isinstance(answer, Claim):
                    reader.release(answer)
                    message = "the run evaluating it stopped without a result"
                    future.set_result(failed(self._job(rule, rung, seed), message))
                else:
                    future.set_result(answer.result)

        threading.Thread(target=wait, daemon=True).start()
        return future

    # ---- the loop ------------------------------------------------------------------------
    def run(
        self,
        progress: Callable[[Counters], None] | None = None,
        backend: Backend | None = None,
    ) -> Counters:
        """Go on until ``budget`` evaluations (of the last rung) are paid, or ``max_samples``
        samples are drawn; then finish the promotions in flight. ``backend`` replaces the
        configured one."""
        backend = backend or make_backend(
            self.config.backend, self.config.workers, self.config.ray_address
        )
        in_flight: collections.deque[_Batch] = collections.deque()
        self.leases = LeaseKeeper(self.store.path)  # claims of evaluations in flight stay ours
        depth = (
            1
            if self.config.backend == "inline"
            else max(1, math.ceil(self.config.workers / self.config.batch))
        )
        cost = self.rungs[0].cost
        try:
            while True:
                # promotions first (in the order decided), then new samples while they fit
                spent = self._start_promotions(backend, self._spent(in_flight))
                drawn = self.counters.samples + sum(len(b.pending) for b in in_flight)
                can_sample = (
                    not self._queue and self._fits(spent, cost) and drawn < self.sample_limit
                )
                if can_sample and len(in_flight) < depth:
                    batch = self._new_batch(backend, spent)
                    if batch is not None:
                        batch.step = self.step + 1 + len(in_flight)
                        in_flight.append(batch)
                        continue
                if in_flight:
                    self._finish(in_flight.popleft())
                elif self._running:
                    self._drain()
                else:
                    break
                if progress is not None:
                    progress(self.counters)
        finally:
            backend.close()
            self.leases.close()
            self.store.close()
        return self.counters

    def _spent(self, in_flight: collections.deque[_Batch]) -> int:
        """Training steps committed: logged, and in flight (samples and promotions)."""
        samples = sum(_charged(p) for b in in_flight for p in b.pending)
        promotions = sum(r.cost * self.rungs[r.promotion.rung].cost for r in self._running)
        return self.funnel.spent() + samples * self.rungs[0].cost + promotions


def _charged(pending: _Pending) -> bool:
    """Whether a sample costs budget: it paid for its evaluation, or is charged as if it had."""
    return pending.outcome == "evaluated" or pending.charged


def _submit(backend: Backend, jobs: list[tuple[Job, futures.Future[EvalResult]]]) -> None:
    """Submit the jobs and resolve each one's own future with its result."""
    submitted = backend.submit([job for job, _ in jobs])
    for (_, future), result in zip(jobs, submitted, strict=True):
        result.add_done_callback(lambda done, future=future: future.set_result(done.result()))


def _logged(line: dict[str, Any]) -> EvalResult:
    """A result read back from the sample log (which keeps its status and reward)."""
    return EvalResult(
        dsl=line["dsl"], key=line["key"], status=line["status"], reward=line["reward"]
    )
