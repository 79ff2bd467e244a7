"""The reward store: round trips, validation, claim/lease semantics, waiting, schema versioning,
damaged files, and eight processes claiming overlapping keys at once."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nos_sym.evaluation.outcome import EvalResult
from nos_sym.evaluation.store import (
    SCHEMA_VERSION,
    STATUSES,
    Claim,
    ClaimLostError,
    LeaseKeeper,
    Record,
    RewardStore,
    StoreError,
    new_owner,
)

RULE = ("key-adam", "protocol-1", "fashion-mnist", 0)
DSL = "m v id sqrt div"


def result(status: str = "ok", reward: float = 0.5, **fields) -> EvalResult:
    return EvalResult(**{"dsl": DSL, "key": RULE[0], "status": status, "reward": reward, **fields})


def counts(path: Path | str) -> dict[str, int]:
    """Rows per status, running included (read with sqlite3 directly)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT status, COUNT(*) FROM rewards GROUP BY status").fetchall()
    return {status: 0 for status in STATUSES} | dict(rows)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RewardStore]:
    with RewardStore(tmp_path / "rewards.sqlite") as opened:
        yield opened


def test_claim_complete_get_round_trip(store: RewardStore) -> None:
    claim = store.claim(*RULE, dsl=DSL, owner="worker-a")
    assert isinstance(claim, Claim) and claim.owner == "worker-a"
    assert store.get(*RULE) is None  # running rows are not results
    assert counts(store.path)["running"] == 1

    sweep = {1e-05: 0.1, 0.001: 0.87, 10.0: 0.0, 0.1234567891: 0.5}
    written = result(
        reward=0.87, best_lr=1e-3, sweep=sweep, seconds=12.5, protocol_hash=RULE[1], seed=RULE[3]
    )
    record = store.complete(claim, written, extra={"epochs": 5, "note": "ünïcode"})
    assert record == store.get(*RULE)
    assert (record.key, record.protocol, record.task, record.seed) == RULE
    assert record.result == written  # the same outcome, sweep keys and order included
    assert list(record.result.sweep) == list(sweep)
    assert record.extra == {"epochs": 5, "note": "ünïcode"}
    assert record.created <= record.updated
    assert counts(store.path) == {
        "running": 0, "ok": 1, "diverged": 0, "degenerate": 0, "failed": 0,
    }  # fmt: skip


def test_the_row_keeps_its_identity_and_json_round_trips(store: RewardStore) -> None:
    claim = store.claim(*RULE, dsl=DSL, owner="worker-a")
    record = store.complete(claim, result(key="", protocol_hash="", sweep={0.1: 0.5}))
    assert (record.result.key, record.result.protocol_hash, record.result.dsl) == (
        RULE[0], RULE[1], DSL,
    )  # fmt: skip
    text = record.result.to_json()
    assert text["sweep"] == {"0.1": 0.5}
    assert EvalResult.from_json(text) == record.result


V1_SCHEMA = (
    """CREATE TABLE rewards (
    key TEXT NOT NULL, protocol TEXT NOT NULL, dataset TEXT NOT NULL, seed INTEGER NOT NULL,
    dsl TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'ok', 'diverged', 'degenerate', 'failed')),
    reward REAL, best_lr REAL, sweep TEXT, seconds REAL, device TEXT, message TEXT, extra TEXT,
    lease_owner TEXT, lease_expires REAL, created REAL NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (key, protocol, dataset, seed),
    CHECK ((status = 'running') = (reward IS NULL)))""",
    "CREATE INDEX rewards_by_reward ON rewards (protocol, dataset, seed, status, reward DESC)",
    "PRAGMA application_id = 1313821522",
    "PRAGMA user_version = 1",
)
"""The schema version 1 stores were written with (before tasks), verbatim."""


def write_v1_store(path: Path) -> None:
    """A version-1 store as the old code wrote it: sweep keys by ``f"{lr:g}"``, NULL columns, a
    running row, two data sets."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for statement in V1_SCHEMA:
            db.execute(statement)
        db.execute(
            "INSERT INTO rewards (key, protocol, dataset, seed, dsl, status, reward, best_lr, "
            "sweep, seconds, device, message, extra, created, updated) VALUES "
            "('k', 'p', 'fashion-mnist', 0, ?, 'ok', 0.75, 0.01, "
            "'{\"1e-05\": 0.1, \"10\": 0.2}', 1.5, 'cpu', '', '{\"run\": \"r\"}', 1.0, 2.0), "
            "('g', 'p', 'synthetic', 0, 'one one id id add', 'degenerate', 0.0, NULL, NULL, NULL, "
            "NULL, 'Δ ≡ 0', NULL, 1.0, 1.0)",
            (DSL,),
        )
        db.execute(
            "INSERT INTO rewards (key, protocol, dataset, seed, dsl, status, lease_owner, "
            "lease_expires, created, updated) VALUES ('r', 'p', 'synthetic', 1, ?, 'running', "
            "'w', 1.0, 1.0, 1.0)",
            (DSL,),
        )


def test_a_version_1_store_migrates_to_child_task_identities(tmp_path: Path) -> None:
    """Every v1 row becomes a reward of the task ``child`` on its data set, values unchanged."""
    from nos_sym.tasks import ChildTask

    path = tmp_path / "v1.sqlite"
    write_v1_store(path)
    fashion, synthetic = (
        ChildTask(dataset=name).identity for name in ("fashion-mnist", "synthetic")
    )
    for _ in range(2):  # the second open finds version 2: nothing to do
        with RewardStore(path) as store:
            record = store.get("k", "p", fashion, 0)
            assert record is not None and record.extra == {"run": "r"}
            ok = record.result
            assert (ok.status, ok.reward, ok.best_lr, ok.sweep, ok.test, ok.curve) == (
                "ok", 0.75, 0.01, {1e-05: 0.1, 10.0: 0.2}, None, (),
            )  # fmt: skip
            assert store.get("k", "p", "fashion-mnist", 0) is None  # the old name is gone
            degenerate = store.get("g", "p", synthetic, 0).result
            assert (degenerate.status, degenerate.sweep, degenerate.seconds) == (
                "degenerate", {}, 0.0,
            )  # fmt: skip
            assert (degenerate.device, degenerate.message) == ("", "Δ ≡ 0")
            assert isinstance(store.claim("r", "p", synthetic, 1, dsl=DSL, owner="x"), Claim)
            store.release(store.claim("r", "p", synthetic, 1, dsl=DSL, owner="x"))
            assert store.tasks() == {
                fashion: ChildTask(dataset="fashion-mnist").describe(),
                synthetic: ChildTask(dataset="synthetic").describe(),
            }
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert db.execute("SELECT COUNT(*) FROM rewards").fetchone()[0] == 2  # r: released


def test_a_store_of_a_newer_nos_sym_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "v3.sqlite"
    RewardStore(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA user_version = 3")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="schema version 3"):
        RewardStore(path)
    assert path.read_bytes() == before


def test_test_and_curve_round_trip(store: RewardStore) -> None:
    claim = store.claim(*RULE, dsl=DSL, owner="worker-a")
    written = result(reward=0.5, test=0.25, curve=(0.1, 0.4, 0.5))
    record = store.complete(claim, written)
    assert (record.result.test, record.result.curve) == (0.25, (0.1, 0.4, 0.5))
    store.describe_task("t@1/x", {"name": "t", "version": 1, "config": {}})
    store.describe_task("t@1/x", {"name": "other", "version": 9, "config": {}})  # first wins
    assert store.tasks() == {"t@1/x": {"name": "t", "version": 1, "config": {}}}


def test_put_keeps_the_first_result_and_supersedes_a_running_claim(store: RewardStore) -> None:
    claim = store.claim(*RULE, dsl=DSL, owner="worker-a")
    assert isinstance(claim, Claim)
    first = store.put(*RULE, result("degenerate", 0.0, message="Δ ≡ 0"))
    assert first.result.status == "degenerate" and first.result.message == "Δ ≡ 0"
    again = store.put(*RULE, result("ok", 0.5))
    assert again == first == store.get(*RULE)
    with pytest.raises(ClaimLostError, match="not held by 'worker-a'"):
        store.complete(claim, result("ok", 0.9))
    assert store.get(*RULE) == first


@pytest.mark.parametrize(
    ("status", "reward", "match"),
    [
        ("ok", math.nan, "finite"),
        ("ok", math.inf, "finite"),
        ("running", 0.0, "status must be one of"),
        ("bogus", 0.0, "status must be one of"),
        ("diverged", 0.3, "reward 0"),
    ],
)
def test_invalid_results_are_rejected(status: str, reward: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        result(status, reward)


def test_nan_in_sweep_or_extra_is_rejected(store: RewardStore) -> None:
    claim = store.claim(*RULE, dsl=DSL, owner="worker-a")
    with pytest.raises(ValueError):
        store.complete(claim, result(sweep={0.1: math.nan}))
    with pytest.raises(ValueError):
        store.complete(claim, result(), extra={"loss": math.inf})
    assert store.get(*RULE) is None and counts(store.path)["running"] == 1
    assert store.complete(claim, result()).result.reward == 0.5


def test_claim_semantics_held_finished_and_reentrant(store: RewardStore) -> None:
    claim = store.claim(*RULE, dsl=DSL, owner="worker-a")
    assert isinstance(claim, Claim)
    assert store.claim(*RULE, dsl=DSL, owner="worker-b") is None  # held by a live lease
    assert isinstance(store.claim(*RULE, dsl=DSL, owner="worker-a"), Claim)  # re-entrant
    record = store.complete(claim, result("ok", 0.8))
    assert store.claim(*RULE, dsl=DSL, owner="worker-b") == record  # answered from the store
    with pytest.raises(ClaimLostError):
        store.complete(claim, result("ok", 0.1))
    assert store.get(*RULE) == record


def test_expired_lease_is_taken_over_and_the_old_owner_loses_it(store: RewardStore) -> None:
    stale = store.claim(*RULE, dsl=DSL, owner="crashed", lease_seconds=0.05)
    assert isinstance(stale, Claim)
    assert store.claim(*RULE, dsl=DSL, owner="worker-b") is None
    time.sleep(0.1)
    fresh = store.claim(*RULE, dsl=DSL, owner="worker-b")
    assert isinstance(fresh, Claim) and fresh.owner == "worker-b"
    for action in (store.renew, store.release):
        with pytest.raises(ClaimLostError, match="'crashed'"):
            action(stale)
    with pytest.raises(ClaimLostError):
        store.complete(stale, result("ok", 0.1))
    assert store.complete(fresh, result("ok", 0.6)).result.reward == 0.6


def test_expired_but_untaken_lease_can_still_complete(store: RewardStore) -> None:
    claim = store.claim(*RULE, dsl=DSL, owner="slow", lease_seconds=0.01)
    time.sleep(0.05)
    assert store.complete(claim, result("failed", 0.0, message="boom")).result.message == "boom"


def test_renew_extends_and_release_frees(store: RewardStore) -> None:
    claim = store.claim(*RULE, dsl=DSL, owner="worker-a", lease_seconds=0.05)
    renewed = store.renew(claim, lease_seconds=60)
    assert renewed.lease_expires > claim.lease_expires + 50
    time.sleep(0.1)
    assert store.claim(*RULE, dsl=DSL, owner="worker-b") is None  # renewed lease still live
    store.release(renewed)
    assert counts(store.path)["running"] == 0
    assert isinstance(store.claim(*RULE, dsl=DSL, owner="worker-b"), Claim)
    with pytest.raises(ValueError, match="positive"):
        store.claim("k", "p", "d", 0, dsl=DSL, owner="x", lease_seconds=0)


def test_results_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "rewards.sqlite"
    with RewardStore(path) as store:
        written = store.put(*RULE, result("ok", 0.75, sweep={0.01: 0.75}))
    with RewardStore(path) as store:
        assert store.get(*RULE) == written
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_newer_schema_or_foreign_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "rewards.sqlite"
    RewardStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        RewardStore(path)

    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a nos_sym reward store"):
        RewardStore(foreign)


@pytest.mark.parametrize(
    "content",
    [
        bytes(random.Random(0).randrange(256) for _ in range(4096)),
        b"rule,reward\ng g id id keep,0.5\n",
        b"SQLite",  # shorter than the header
    ],
    ids=["random-bytes", "text", "short"],
)
def test_a_file_that_is_not_sqlite_is_refused_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "rewards.sqlite"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="is not an SQLite database"):
        RewardStore(path)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rewards.sqlite"]  # no -wal, no -shm


def test_a_foreign_sqlite_database_is_refused_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.sqlite"
    with contextlib.closing(sqlite3.connect(foreign)) as db, db:
        db.execute("CREATE TABLE t (x)")
        db.execute("PRAGMA application_id = 7")
    before = foreign.read_bytes()
    with pytest.raises(StoreError, match="not a nos_sym reward store"):
        RewardStore(foreign)
    assert foreign.read_bytes() == before  # not switched to WAL


def test_an_empty_file_becomes_a_store(tmp_path: Path) -> None:
    path = tmp_path / "rewards.sqlite"
    path.touch()
    with RewardStore(path) as store:
        assert store.put(*RULE, result()).result.reward == 0.5


def test_wait_returns_the_other_workers_result(store: RewardStore) -> None:
    claim = store.claim(*RULE, dsl=DSL, owner="worker-a")

    def finish() -> None:
        with RewardStore(store.path) as other:
            time.sleep(0.05)
            other.complete(claim, result("ok", 0.7))

    thread = threading.Thread(target=finish)
    thread.start()
    answer = store.wait(*RULE, dsl=DSL, owner="worker-b", every=0.01)
    thread.join()
    assert isinstance(answer, Record) and answer.result.reward == 0.7


def test_wait_takes_over_a_lease_that_expires(store: RewardStore) -> None:
    store.claim(*RULE, dsl=DSL, owner="crashed", lease_seconds=0.05)
    answer = store.wait(*RULE, dsl=DSL, owner="worker-b", every=0.01)
    assert isinstance(answer, Claim) and answer.owner == "worker-b"


def test_eval_result_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        result().reward = 1.0  # type: ignore[misc]


def test_new_owner_is_unique() -> None:
    assert len({new_owner() for _ in range(100)}) == 100


# --- many processes ------------------------------------------------------------------------------

N_WORKERS = 8
N_KEYS = 60
DEGENERATE_EVERY = 7  # these keys are recorded by put(), without a claim


def _claim_everything(path: str, worker: int) -> tuple[str, list[str]]:
    """Go through all keys in a worker-specific order until every one is finished; return this
    worker's owner name and the keys it evaluated (won by claim)."""
    owner = new_owner()
    order = random.Random(worker).sample(range(N_KEYS), N_KEYS)
    won: list[str] = []
    with RewardStore(path) as store:
        while order:
            pending = []
            for index in order:
                key = f"rule-{index}"
                if index % DEGENERATE_EVERY == 0:
                    degenerate = EvalResult(dsl=DSL, key=key, status="degenerate", reward=0.0)
                    store.put(key, "p", "d", 0, degenerate)
                    continue
                outcome = store.claim(key, "p", "d", 0, dsl=DSL, owner=owner)
                if isinstance(outcome, Claim):
                    won.append(key)
                    time.sleep(0.002)  # "evaluate", holding the lease
                    done = EvalResult(dsl=DSL, key=key, status="ok", reward=index / N_KEYS)
                    store.complete(outcome, done, extra={"owner": owner})
                elif outcome is None:
                    pending.append(index)
                store.get(f"rule-{order[0]}", "p", "d", 0)  # readers beside the writers
            order = pending
    return owner, won


def test_eight_processes_claim_overlapping_keys_without_loss_or_duplicates(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "shared.sqlite")
    context = multiprocessing.get_context("spawn")
    with context.Pool(N_WORKERS) as pool:
        results = pool.starmap_async(
            _claim_everything, [(path, worker) for worker in range(N_WORKERS)]
        ).get(timeout=120)

    evaluated = [key for _, won in results for key in won]
    expected = {f"rule-{i}" for i in range(N_KEYS) if i % DEGENERATE_EVERY != 0}
    assert len(evaluated) == len(set(evaluated)), "a key was evaluated twice"
    assert set(evaluated) == expected
    assert sum(1 for _, won in results if won) > 1, "one worker did everything"

    assert counts(path)["running"] == 0
    with RewardStore(path) as store:
        records: dict[str, Record] = {
            f"rule-{i}": store.get(f"rule-{i}", "p", "d", 0) for i in range(N_KEYS)
        }
        for index in range(N_KEYS):
            record = records[f"rule-{index}"].result
            if index % DEGENERATE_EVERY == 0:
                assert record.status == "degenerate" and record.reward == 0.0
            else:
                assert record.status == "ok" and record.reward == index / N_KEYS
    for owner, won in results:
        for key in won:
            assert records[key].extra == {"owner": owner}


def test_a_kept_lease_outlives_a_long_evaluation(store: RewardStore) -> None:
    """A (simulated) evaluation three times longer than its lease: with the keeper renewing it,
    no other worker can claim the rule, and the owner's result is stored."""
    claim = store.claim(*RULE, dsl=DSL, owner="slow", lease_seconds=0.3)
    with LeaseKeeper(store.path, every=0.05) as keeper:
        keeper.hold(claim)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # the evaluation runs; others keep asking
            assert store.claim(*RULE, dsl=DSL, owner="other", lease_seconds=0.3) is None
            time.sleep(0.05)
        record = store.complete(claim, result(reward=0.75))
        keeper.drop(claim)
    assert (record.result.status, record.result.reward) == ("ok", 0.75)


def test_an_unkept_lease_expires_and_the_keeper_drops_a_lost_claim(store: RewardStore) -> None:
    claim = store.claim(*RULE, dsl=DSL, owner="slow", lease_seconds=0.1)
    time.sleep(0.2)
    taken = store.claim(*RULE, dsl=DSL, owner="other", lease_seconds=60)
    assert isinstance(taken, Claim)  # expired: another worker took it over
    with LeaseKeeper(store.path, every=0.02) as keeper:
        keeper.hold(claim)
        time.sleep(0.2)  # the keeper finds the claim lost and stops renewing it
        assert keeper._held == {}
    with pytest.raises(ClaimLostError):
        store.complete(claim, result())
    assert store.complete(taken, result(reward=0.25)).result.reward == 0.25


def test_opening_a_store_never_opens_its_file_outside_sqlite(tmp_path: Path, monkeypatch) -> None:
    """Closing any descriptor of a database file drops every POSIX lock the process holds on it:
    a plain open()/close() beside a live connection (a LeaseKeeper's) let other processes write
    under that connection's lock and corrupted a store shared by two transfer workers."""
    import builtins
    import io

    path = tmp_path / "store.sqlite"
    RewardStore(path).close()
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if Path(str(file)).resolve() == path.resolve():
            raise AssertionError("the store file was opened outside SQLite")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)
    with RewardStore(path) as store, LeaseKeeper(path) as leases:
        claim = store.claim(*RULE, dsl=DSL, owner="a")
        leases.hold(claim)
        assert store.complete(claim, result()).result.reward == 0.5
