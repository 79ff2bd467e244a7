"""Search runs: dedup accounting, budget, resume after SIGKILL, worker crashes, backends, CLI."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nos_sym import parse
from nos_sym.controller.backends import Job
from nos_sym.controller.rundir import TornLogWarning
from nos_sym.controller.search import (
    GpuBackend,
    ProcessBackend,
    SearchConfig,
    SearchError,
    SearchRun,
    leaderboard,
    load_checkpoint,
    read_samples,
    status,
)
from nos_sym.evaluation.outcome import EvalResult
from nos_sym.evaluation.protocol import PROTOCOLS
from nos_sym.evaluation.store import RewardStore
from nos_sym.tasks.child import ChildTask

NOS_SYM = str(Path(sys.executable).with_name("nos-sym"))
# one group over a handful of tokens: duplicates are frequent; synthetic data: ~0.3 s a rule
SMALL = {"space": "small", "dataset": "synthetic", "protocol": "quick", "backend": "inline"}


def config(**overrides) -> SearchConfig:
    return SearchConfig(**{**SMALL, "budget": 6, "batch": 4, "seed": 0, **overrides})


def assert_accounting(run_dir: Path, numeric: bool = False) -> dict:
    summary = status(run_dir)
    lines = read_samples(run_dir)
    assert summary["samples"] == len(lines)
    assert (
        summary["samples"] == summary["evaluated"] + summary["from_store"] + summary["degenerate"]
    )
    live = [line for line in lines if line["outcome"] != "degenerate"]
    evaluated = [line["key"] for line in lines if line["outcome"] == "evaluated"]
    assert len(evaluated) == len(set(evaluated))  # no key paid for twice
    if not numeric:  # (numeric dedup answers some keys by their fingerprint twin instead)
        assert set(evaluated) == {line["key"] for line in live}  # every live key paid once
    for line in lines:
        assert line["reward"] == line["reward"]  # never NaN
    return summary


class InstantBackend:
    """Evaluations that cost nothing (a reward made from the rule's key), so a test can pay for
    hundreds and force duplicates."""

    def __init__(self):
        self.jobs: list[Job] = []

    def submit(self, jobs):
        done = []
        for job in jobs:
            self.jobs.append(job)
            future = concurrent.futures.Future()
            reward = int(parse(job.dsl).key[:6], 16) / 0xFFFFFF
            future.set_result(
                EvalResult(dsl=job.dsl, key=job.key, status="ok", reward=reward, best_lr=0.1)
            )
            done.append(future)
        return done

    def close(self):
        pass


def test_dedup_accounting_with_forced_duplicates(tmp_path):
    run_dir, backend = tmp_path / "run", InstantBackend()
    counters = SearchRun(run_dir, config(algo="random", budget=150, batch=50)).run(backend=backend)
    summary = assert_accounting(run_dir)
    assert summary["evaluated"] == counters.evaluated == len(backend.jobs) == 150
    assert summary["from_store"] > 0 and summary["degenerate"] > 0  # duplicates were forced
    lines = read_samples(run_dir)
    rewards = {}
    for line in lines:
        rewards.setdefault(line["key"], line["reward"])
        assert rewards[line["key"]] == line["reward"]  # a duplicate gets its twin's reward
    with contextlib.closing(sqlite3.connect(run_dir / "store.sqlite")) as db:
        assert db.execute("SELECT COUNT(*) FROM rewards WHERE status = 'ok'").fetchone() == (150,)
    by_step = {}
    for line in lines:
        by_step.setdefault(line["step"], []).append(line)
    # within one batch, a repeated key is paid for once and answered for the others
    repeated = [
        step for step, batch in by_step.items() if len({x["key"] for x in batch}) < len(batch)
    ]
    assert repeated


def test_evolution_run_avoids_what_it_has_met(tmp_path):
    run_dir = tmp_path / "run"
    run = SearchRun(run_dir, config(algo="evolution", population=8, tournament=3, budget=60))
    counters = run.run(backend=InstantBackend())
    summary = assert_accounting(run_dir)
    assert counters.evaluated == summary["evaluated"] == 60
    assert run.algorithm.known is not None and len(run.algorithm.members) == 8
    # children are re-mutated while this run has met them, so few samples repeat a key
    assert summary["from_store"] < summary["evaluated"] // 2, summary


def test_a_search_keeps_the_leases_of_its_evaluations_until_stored(tmp_path, monkeypatch):
    import nos_sym.controller.search as search_module
    from nos_sym.evaluation.store import LeaseKeeper

    held, dropped = [], []

    class Recording(LeaseKeeper):
        def hold(self, claim):
            held.append(claim.key)
            super().hold(claim)

        def drop(self, claim):
            dropped.append(claim.key)
            super().drop(claim)

    monkeypatch.setattr(search_module, "LeaseKeeper", Recording)
    run_dir = tmp_path / "run"
    SearchRun(run_dir, config(algo="random", budget=6)).run(backend=InstantBackend())
    evaluated = [line["key"] for line in read_samples(run_dir) if line["outcome"] == "evaluated"]
    assert sorted(held) == sorted(dropped) == sorted(evaluated) and len(held) == 6


def test_budget_counts_evaluations_and_max_samples_stops(tmp_path):
    run = SearchRun(tmp_path / "a", config(budget=4, batch=3))
    assert run.run().evaluated == 4
    assert status(tmp_path / "a")["evaluated"] == 4
    # a budget bigger than what a few samples can pay: max_samples stops it
    counters = SearchRun(tmp_path / "b", config(budget=50, max_samples=6, batch=3)).run()
    assert counters.samples == 6 and counters.evaluated <= 6


def test_runs_sharing_a_store_never_pay_twice(tmp_path):
    store = str(tmp_path / "shared.sqlite")
    SearchRun(tmp_path / "a", config(store=store, seed=1)).run()
    first = {line["key"] for line in read_samples(tmp_path / "a") if line["outcome"] == "evaluated"}
    SearchRun(tmp_path / "b", config(store=store, seed=1, algo="trpo")).run()
    second = read_samples(tmp_path / "b")
    assert all(line["outcome"] != "evaluated" or line["key"] not in first for line in second)
    assert any(line["outcome"] == "from_store" for line in second)


def test_numeric_dedup_merges_equal_fingerprints(tmp_path):
    run = SearchRun(tmp_path / "run", config(algo="random", dedup="numeric", budget=6, batch=10))
    run.run()
    lines = read_samples(tmp_path / "run")
    fingerprints = [line["fingerprint"] for line in lines if line["outcome"] == "evaluated"]
    assert len(fingerprints) == len(set(fingerprints))
    live = {line["fingerprint"] for line in lines if line["outcome"] != "degenerate"}
    assert live == set(fingerprints)
    assert_accounting(tmp_path / "run", numeric=True)


def test_resume_with_another_config_is_an_error(tmp_path):
    SearchRun(tmp_path / "run", config(budget=1)).run()
    with pytest.raises(SearchError, match="seed: 0 → 1"):
        SearchRun(tmp_path / "run", config(budget=1, seed=1))
    SearchRun(tmp_path / "run", config(budget=2)).run()  # a bigger budget is fine
    assert status(tmp_path / "run")["evaluated"] == 2


def test_bad_run_directories(tmp_path):
    with pytest.raises(SearchError, match="not a search run directory"):
        status(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SearchError, match="damaged"):
        SearchRun(tmp_path)
    with pytest.raises(SearchError, match="--workers"):
        SearchConfig(workers=0)


def _search(run_dir: Path, *extra: str) -> list[str]:
    return [
        NOS_SYM,
        "search",
        "--run-dir",
        str(run_dir),
        "--space",
        "small",
        "--dataset",
        "synthetic",
        "--protocol",
        "quick",
        "--backend",
        "inline",
        "--budget",
        "10",
        "--batch",
        "3",
        "--seed",
        "7",
        *extra,
    ]


def _parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    def flatten(value, prefix=""):
        if isinstance(value, torch.Tensor):
            yield prefix, value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from flatten(item, f"{prefix}/{key}")
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                yield from flatten(item, f"{prefix}/{index}")

    return dict(flatten(load_checkpoint(run_dir)["algorithm"]))


@pytest.mark.parametrize(
    "algo",
    [[], ["--algo", "evolution", "--population", "4", "--tournament", "2"]],
    ids=["trpo", "evolution"],
)
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, algo):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_search(reference, *algo), check=True, capture_output=True, timeout=600)

    process = subprocess.Popen(
        _search(killed, *algo), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        log = killed / "samples.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:  # mid-run, after a step
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.4)  # somewhere inside the next step
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(_search(killed, *algo), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr

    expected, actual = _parameters(reference), _parameters(killed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert leaderboard(killed, 50) == leaderboard(reference, 50)
    assert status(killed) == status(reference)
    assert_accounting(killed)


def crashing_job(job: Job) -> EvalResult:
    """A worker that dies on one rule (os._exit: no exception, the process is gone)."""
    if "exp" in job.dsl:
        os._exit(13)
    return EvalResult(dsl=job.dsl, key=job.key, status="ok", reward=0.5, sweep={0.1: 0.5})


def test_a_dying_worker_marks_its_candidate_failed_and_the_run_goes_on(tmp_path):
    run = SearchRun(tmp_path / "run", config(algo="random", budget=12, batch=6, workers=2))
    counters = run.run(backend=ProcessBackend(2, function=crashing_job))
    assert counters.evaluated == 12
    lines = read_samples(tmp_path / "run")
    for line in (line for line in lines if line["outcome"] == "evaluated"):
        if "exp" in line["dsl"]:  # the culprit
            assert line["status"] == "failed" and line["reward"] == 0.0
        else:  # its pool-mates were tried again, one at a time
            assert line["status"] == "ok" and line["reward"] == 0.5
    assert_accounting(tmp_path / "run")


def test_process_backend_end_to_end(tmp_path):
    run = SearchRun(tmp_path / "run", config(backend="process", workers=2, budget=4, batch=2))
    assert run.run().evaluated == 4
    assert_accounting(tmp_path / "run")


def test_ray_backend_on_a_local_ray(tmp_path):
    ray = pytest.importorskip("ray")
    try:
        run = SearchRun(tmp_path / "run", config(backend="ray", workers=2, budget=3, batch=3))
        assert run.run().evaluated == 3
    finally:
        ray.shutdown()
    assert_accounting(tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_gpu_backend_without_cuda_is_a_clear_error():
    with pytest.raises(SearchError, match="needs CUDA"):
        GpuBackend()


def test_cli_search_top_status_report(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        _search(run_dir, "--budget", "3"), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "report: nos-sym report" in done.stdout
    top = json.loads(
        subprocess.run(
            [NOS_SYM, "top", str(run_dir), "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert top and set(top[0]) == {"dsl", "minimal_dsl", "key", "reward", "status", "latex"}
    assert top == sorted(top, key=lambda row: -row["reward"])
    summary = json.loads(
        subprocess.run(
            [NOS_SYM, "status", str(run_dir), "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert set(summary) == {
        "samples",
        "unique",
        "evaluated",
        "from_store",
        "degenerate",
        "diverged",
        "failed",
        "best_reward",
        "controller_steps",
    }
    for fmt in ("latex", "markdown", "text"):
        assert subprocess.run(
            [NOS_SYM, "top", str(run_dir), "--format", fmt], capture_output=True, check=True
        ).stdout
    report = subprocess.run(
        [NOS_SYM, "report", str(run_dir), "-o", str(tmp_path / "r.png")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "Leaderboard" in (tmp_path / "r.md").read_text() and report.stdout
    bad = subprocess.run(
        [NOS_SYM, "status", str(tmp_path / "nothing")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("field", "value"), [("space", "huge"), ("protocol", "long"), ("dataset", "mnist")]
)
def test_unknown_names_are_refused_before_anything_is_written(tmp_path, field, value):
    with pytest.raises(SearchError, match=f"--{field} must be one of"):
        SearchRun(tmp_path / "run", config(**{field: value}))
    assert not (tmp_path / "run").exists()


# --- damaged run directories ---------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run of 2 steps, paid for instantly."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    SearchRun(run_dir, config(algo="random", budget=8, batch=4)).run(backend=InstantBackend())
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    copy.mkdir()
    for path in run_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"PK\x03\x04 cut short",
        bytes(range(7, 256, 4)),  # garbage
        b"\x80\xa9" + bytes(range(62)),  # a pickle of unknown protocol: torch warns, then fails
    ],
)
def test_a_damaged_checkpoint_is_one_line_and_left_as_it_is(finished_run, tmp_path, content):
    run_dir = _copy(finished_run, tmp_path)
    checkpoint = run_dir / "checkpoint.pt"
    checkpoint.write_bytes(content)
    before = {path.name: _digest(path) for path in run_dir.iterdir()}
    for command in (
        ["status", str(run_dir)],
        ["report", str(run_dir), "-o", str(tmp_path / "r.png")],
        ["search", "--run-dir", str(run_dir), "--backend", "inline"],
    ):
        done = subprocess.run([NOS_SYM, *command], capture_output=True, text=True, timeout=300)
        _one_line_error(done, str(checkpoint), "cannot be read", "move it away")
    top = subprocess.run([NOS_SYM, "top", str(run_dir)], capture_output=True, text=True)
    assert top.returncode == 0 and top.stdout  # the leaderboard needs no checkpoint
    assert {path.name: _digest(path) for path in run_dir.iterdir()} == before
    assert not (tmp_path / "r.png").exists()


def test_a_torn_last_line_is_ignored_and_a_resume_goes_on_after_it(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    log = run_dir / "samples.jsonl"
    complete = log.read_bytes()
    expected = status(finished_run)
    torn = complete + b'{"step": 3, "index": 0, "dsl": "g g'  # an append cut short
    log.write_bytes(torn)
    with pytest.warns(TornLogWarning, match="unterminated last line"):
        assert status(run_dir) == expected
    done = subprocess.run([NOS_SYM, "status", str(run_dir), "--format", "json"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and json.loads(done.stdout) == expected
    assert done.stderr.count("unterminated last line") == 1
    assert log.read_bytes() == torn  # readers leave it as it is

    with pytest.warns(TornLogWarning):
        run = SearchRun(run_dir, config(algo="random", budget=12, batch=4))
    assert log.read_bytes() == complete  # the resume drops the torn tail before appending
    run.run(backend=InstantBackend())
    before, after = read_samples(finished_run), read_samples(run_dir)
    assert len(after) > len(before) and after[: len(before)] == before
    assert all(line["step"] > before[-1]["step"] for line in after[len(before) :])
    assert log.read_bytes().startswith(complete)
    assert_accounting(run_dir)


@pytest.mark.parametrize("where", ["middle", "last"])
def test_damage_elsewhere_in_the_log_stays_an_error(finished_run, tmp_path, where):
    run_dir = _copy(finished_run, tmp_path)
    log = run_dir / "samples.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    lines[2 if where == "middle" else -1] = b"{not json\n"
    log.write_bytes(b"".join(lines))
    with pytest.raises(SearchError, match="not a JSON line"):
        status(run_dir)
    done = subprocess.run([NOS_SYM, "status", str(run_dir)], capture_output=True, text=True)
    _one_line_error(done, "samples.jsonl:")


def test_a_store_that_is_not_sqlite_stops_a_search_before_it_writes(tmp_path):
    store = tmp_path / "store.sqlite"
    store.write_bytes(os.urandom(2048))
    digest = _digest(store)
    done = subprocess.run(
        _search(tmp_path / "run", "--store", str(store)), capture_output=True, text=True
    )
    _one_line_error(done, str(store), "not an SQLite database")
    assert _digest(store) == digest
    assert not (tmp_path / "run" / "config.json").exists()


# --- waiting for another run, the GPU backend's plumbing ----------------------------------------


def test_a_key_another_run_holds_is_waited_for(tmp_path):
    run = SearchRun(tmp_path / "run", config())
    held, dropped = parse("g g id id keep"), parse("m v id sqrt div")
    other = RewardStore(run.store.path)
    claims = {
        rule.key: other.claim(*run._identity(rule.key), dsl=rule.dsl, owner="other", **lease)
        for rule, lease in ((held, {}), (dropped, {"lease_seconds": 0.05}))
    }
    finished = run._wait(held)
    done = EvalResult(dsl=held.dsl, key=held.key, status="ok", reward=0.25)
    other.complete(claims[held.key], done)
    assert finished.result(timeout=60).reward == 0.25
    stopped = run._wait(dropped).result(timeout=60)  # its lease expires: the other run stopped
    assert stopped.status == "failed" and "without a result" in stopped.message
    assert other.claim(*run._identity(dropped.key), dsl=dropped.dsl, owner="next") is not None
    other.close()
    run.store.close()


def test_gpu_backend_plumbing(monkeypatch):
    from nos_sym.evaluation import evaluator

    calls = []

    def batch(dsls, **options):
        calls.append(options)
        if "boom" in dsls:
            raise RuntimeError("boom")
        return [EvalResult(dsl=dsl, key=dsl, status="ok", reward=0.5) for dsl in dsls]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(evaluator, "evaluate_batch", batch)
    backend = GpuBackend()
    task = ChildTask(dataset="synthetic")
    jobs = [Job(dsl=dsl, key=dsl, task=task, protocol="quick", seed=3) for dsl in "ab"]
    assert [future.result().reward for future in backend.submit(jobs)] == [0.5, 0.5]
    quick = PROTOCOLS["quick"]
    assert calls == [{"dataset": "synthetic", "protocol": quick, "seed": 3, "device": "cuda"}]
    failed = backend.submit([*jobs, Job("boom", "boom", "synthetic", "quick", 3)])
    assert [future.result().status for future in failed] == ["failed"] * 3
    assert failed[0].result().message == "RuntimeError: boom"
    assert backend.submit([]) == []
    backend.close()
