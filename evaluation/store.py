"""The reward store: one SQLite row per evaluated (rule key, protocol, task, seed).

Many worker processes share one store file. Each opens its own :class:`RewardStore` (its own
connection); SQLite in WAL mode lets readers run beside one writer, every write is a short
``BEGIN IMMEDIATE`` transaction, and a busy timeout makes writers queue instead of failing.

Work is shared through leases. ``claim`` atomically returns either the finished result (use it),
``None`` (another worker holds a live lease: skip), or a :class:`Claim` (you evaluate it, then
``complete`` or ``release``). A lease that expires — its worker crashed — may be claimed by
someone else; until then the original owner may still complete it.

A result is an :class:`~nos_sym.evaluation.outcome.EvalResult`, stored as it is (one column per
field of the outcome, the sweep as JSON with its learning rates as text) and read back as the same
type inside a :class:`Record`. :meth:`RewardStore.wait` is the one way to wait for another worker's
evaluation, and a :class:`LeaseKeeper` renews the claims of evaluations still running, from a
thread of its own, so a candidate that trains for longer than its lease (a task may take hours)
is never claimed again and paid twice.

A reward's task is its :attr:`~nos_sym.tasks.base.Task.identity` (``name@version/hash``); the
``tasks`` table says what each identity is (name, version, configuration as JSON).

Schema versions: 1 (before tasks) named the data set of the child ConvNet where version 2 names the
task. Opening a version-1 store migrates it in one transaction (:func:`_migrate_v1`): the column
``dataset`` becomes ``task``, each row's data set *D* becomes the identity of the task
``child`` on *D* (the same computation, so its rewards stay valid and are reused), the ``test``
and ``curve`` columns are added, and the ``tasks`` table is created and filled. A store of a
newer version than this nos_sym reads is refused.

Everything is stored as SQL values or JSON text; nothing is pickled. Finished rows are never
overwritten or deleted by this module. A file that is not a reward store (not SQLite, or another
application's SQLite database) is refused before anything is written to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from nos_sym.errors import UserError
from nos_sym.evaluation import outcome
from nos_sym.evaluation.outcome import EvalResult

__all__ = [
    "FINISHED_STATUSES",
    "SCHEMA_VERSION",
    "STATUSES",
    "Claim",
    "ClaimLostError",
    "LeaseKeeper",
    "Record",
    "RewardStore",
    "StoreError",
    "new_owner",
]

STATUSES: tuple[str, ...] = ("running", *outcome.STATUSES)
"""The states of a row: ``running`` while a worker holds its lease, then a result's status."""
FINISHED_STATUSES: frozenset[str] = frozenset(outcome.STATUSES)

SCHEMA_VERSION = 2
APPLICATION_ID = 0x4E4F5352  # "NOSR": marks the file as a nos_sym reward store
DEFAULT_BUSY_TIMEOUT_SECONDS = 60.0
DEFAULT_LEASE_SECONDS = 300.0
"""A claim's lease. Every evaluation in flight is renewed by a :class:`LeaseKeeper` each third of
it, so a long evaluation keeps its claim, and a crashed worker's claim is free again within five
minutes (a rerun of a killed command waits at most that long for it)."""

_TASKS_TABLE = """
CREATE TABLE tasks (
    identity    TEXT PRIMARY KEY,
    description TEXT NOT NULL  -- JSON {"name", "version", "config"}
)"""

_SCHEMA = (
    f"""
CREATE TABLE rewards (
    key           TEXT    NOT NULL,
    protocol      TEXT    NOT NULL,
    task          TEXT    NOT NULL,
    seed          INTEGER NOT NULL,
    dsl           TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ({", ".join(f"'{s}'" for s in STATUSES)})),
    reward        REAL,   -- NULL exactly while running
    best_lr       REAL,
    sweep         TEXT,   -- JSON {{lr: accuracy}}
    seconds       REAL,
    device        TEXT,
    message       TEXT,
    extra         TEXT,   -- JSON
    lease_owner   TEXT,
    lease_expires REAL,   -- unix time
    created       REAL    NOT NULL,
    updated       REAL    NOT NULL,
    test          REAL,   -- the final run's test metric, if the task reports one
    curve         TEXT,   -- JSON [metric, ...] along the final run, if the task reports one
    PRIMARY KEY (key, protocol, task, seed),
    CHECK ((status = 'running') = (reward IS NULL))
)""",
    "CREATE INDEX rewards_by_reward ON rewards (protocol, task, seed, status, reward DESC)",
    _TASKS_TABLE,
)
"""Version 2. A later version may only add (tables, nullable columns, indexes) or, as the
migration from version 1 did, rename what it must in one transaction: no reward is ever lost."""

_OUTCOME_COLUMNS = (
    "status",
    "reward",
    "best_lr",
    "sweep",
    "seconds",
    "device",
    "message",
    "test",
    "curve",
)
"""The columns of an :class:`EvalResult` (``to_json`` names), in table order."""
_ROW_COLUMNS = (
    "key",
    "protocol",
    "task",
    "seed",
    "dsl",
    *_OUTCOME_COLUMNS,
    "extra",
    "created",
    "updated",
)
_RECORD_COLUMNS = ", ".join(_ROW_COLUMNS)
_PRIMARY_KEY = "key = ? AND protocol = ? AND task = ? AND seed = ?"


class StoreError(UserError, RuntimeError):
    """The store file is not usable (not SQLite, not a reward store, unknown schema version)."""


class ClaimLostError(StoreError):
    """The claim is no longer held by its owner (another worker took over an expired lease)."""


@dataclass(frozen=True)
class Record:
    """A finished evaluation, one row of the store: its identity (rule key, protocol hash, task
    identity, seed), its :class:`EvalResult`, the caller's ``extra`` JSON and the row's timestamps
    (unix time)."""

    key: str
    protocol: str
    task: str
    seed: int
    result: EvalResult
    extra: dict[str, Any] | None
    created: float
    updated: float


@dataclass(frozen=True)
class Claim:
    """The right to evaluate one (key, protocol, task, seed), held by ``owner`` until
    ``lease_expires`` (unix time) or until another worker takes the expired lease over."""

    key: str
    protocol: str
    task: str
    seed: int
    owner: str
    lease_seconds: float
    lease_expires: float


def new_owner() -> str:
    """A worker identity unique across hosts, processes and restarts: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class RewardStore:
    """SQLite-backed rewards, safe to open from many processes at once (one per process)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_seconds: float = DEFAULT_BUSY_TIMEOUT_SECONDS,
    ) -> None:
        self.path = Path(path)
        _check_header(self.path)
        try:
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout_seconds, isolation_level=None
            )
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: cannot open as a reward store ({error})") from None
        try:
            self._check_application()  # before WAL: switching to WAL writes to the file
            self._enable_wal(busy_timeout_seconds)
            self._db.execute("PRAGMA synchronous = FULL")
            self._init_schema()
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise StoreError(f"{self.path}: cannot open as a reward store ({error})") from None
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> RewardStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's connection."""
        self._db.close()

    # --- reads -----------------------------------------------------------------------------------

    def get(self, key: str, protocol: str, task: str, seed: int) -> Record | None:
        """The finished record for this evaluation, or None (absent or still running)."""
        row = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM rewards WHERE {_PRIMARY_KEY} AND status != 'running'",
            (key, protocol, task, seed),
        ).fetchone()
        return _record(row) if row else None

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Every described task: identity → ``{"name", "version", "config"}``."""
        rows = self._db.execute("SELECT identity, description FROM tasks ORDER BY identity")
        return {identity: json.loads(text) for identity, text in rows}

    def describe_task(self, identity: str, description: Mapping[str, Any]) -> None:
        """Record what the task ``identity`` is (once; a known identity is left as it is)."""
        text = json.dumps(dict(description), sort_keys=True, allow_nan=False)
        if self._db.execute("SELECT 1 FROM tasks WHERE identity = ?", (identity,)).fetchone():
            return
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO tasks (identity, description) VALUES (?, ?)",
                (identity, text),
            )

    # --- writes ----------------------------------------------------------------------------------

    def claim(
        self,
        key: str,
        protocol: str,
        task: str,
        seed: int,
        *,
        dsl: str,
        owner: str,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> Record | Claim | None:
        """Atomically decide who evaluates this (key, protocol, task, seed).

        Returns the finished :class:`Record` if there is one; None if another owner holds a
        lease that has not expired; otherwise (no row, an expired lease, or a lease ``owner``
        already holds) a :class:`Claim` on a fresh ``running`` row for ``owner``.
        """
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        with self._write() as db:
            row = db.execute(
                f"SELECT status, lease_owner, lease_expires, created FROM rewards "
                f"WHERE {_PRIMARY_KEY}",
                (key, protocol, task, seed),
            ).fetchone()
            now = time.time()
            if row is not None and row[0] != "running":
                return self.get(key, protocol, task, seed)
            if row is not None and row[1] != owner and row[2] > now:
                return None
            db.execute(
                "INSERT OR REPLACE INTO rewards (key, protocol, task, seed, dsl, status, "
                "lease_owner, lease_expires, created, updated) "
                "VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)",
                (key, protocol, task, seed, dsl, owner, now + lease_seconds, now, now),
            )
        return Claim(key, protocol, task, seed, owner, lease_seconds, now + lease_seconds)

    def renew(self, claim: Claim, lease_seconds: float | None = None) -> Claim:
        """Extend the lease to now + ``lease_seconds`` (default: the claim's own length)."""
        seconds = claim.lease_seconds if lease_seconds is None else lease_seconds
        if not seconds > 0:
            raise ValueError(f"lease_seconds must be positive, got {seconds}")
        with self._write() as db:
            now = time.time()
            self._require_held(db, claim)
            db.execute(
                f"UPDATE rewards SET lease_expires = ?, updated = ? WHERE {_PRIMARY_KEY}",
                (now + seconds, now, *_primary_key(claim)),
            )
        return Claim(*_primary_key(claim), claim.owner, seconds, now + seconds)

    def release(self, claim: Claim) -> None:
        """Give up a claim without a result, so another worker may evaluate the rule."""
        with self._write() as db:
            self._require_held(db, claim)
            db.execute(f"DELETE FROM rewards WHERE {_PRIMARY_KEY}", _primary_key(claim))

    def wait(
        self,
        key: str,
        protocol: str,
        task: str,
        seed: int,
        *,
        dsl: str,
        owner: str,
        every: float = 1.0,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> Record | Claim:
        """:meth:`claim`, waiting (polling every ``every`` seconds) while another worker holds a
        live lease: the finished :class:`Record`, or a :class:`Claim` for ``owner`` once that
        lease is released or has expired (its worker stopped without a result)."""
        identity = (key, protocol, task, seed)
        while (
            answer := self.claim(*identity, dsl=dsl, owner=owner, lease_seconds=lease_seconds)
        ) is None:
            time.sleep(every)
        return answer

    def complete(
        self, claim: Claim, result: EvalResult, *, extra: Mapping[str, Any] | None = None
    ) -> Record:
        """Record the result of a held claim; raises :class:`ClaimLostError` if it is not held.
        The row keeps the claim's identity and the ``dsl`` it was claimed with."""
        values = _outcome_values(result, extra)
        assignments = ", ".join(f"{column} = ?" for column in (*_OUTCOME_COLUMNS, "extra"))
        with self._write() as db:
            self._require_held(db, claim)
            db.execute(
                f"UPDATE rewards SET {assignments}, lease_owner = NULL, lease_expires = NULL, "
                f"updated = ? WHERE {_PRIMARY_KEY}",
                (*values, time.time(), *_primary_key(claim)),
            )
        record = self.get(*_primary_key(claim))
        assert record is not None  # finished rows are never removed
        return record

    def put(
        self,
        key: str,
        protocol: str,
        task: str,
        seed: int,
        result: EvalResult,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> Record:
        """Insert a finished record without a claim (e.g. a degenerate rule, found before any
        training), with ``result.dsl``. A running row is superseded; an existing finished row is
        kept (first result wins) and returned."""
        values = _outcome_values(result, extra)
        with self._write() as db:
            row = db.execute(
                f"SELECT status FROM rewards WHERE {_PRIMARY_KEY}", (key, protocol, task, seed)
            ).fetchone()
            if row is None or row[0] == "running":
                now = time.time()
                db.execute(
                    f"INSERT OR REPLACE INTO rewards ({_RECORD_COLUMNS}) "
                    f"VALUES ({', '.join('?' * len(_ROW_COLUMNS))})",
                    (key, protocol, task, seed, result.dsl, *values, now, now),
                )
        record = self.get(key, protocol, task, seed)
        assert record is not None  # finished rows are never removed
        return record

    # --- internals -------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: takes the write lock up front (waiting up to the
        busy timeout), so read-then-write decisions cannot race."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            if self._db.in_transaction:  # SQLite may already have rolled back
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _enable_wal(self, timeout_seconds: float) -> None:
        """Switch the file to WAL (a persistent setting). The switch ignores the busy timeout
        and fails while another process is opening a fresh file, so retry until the deadline."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    def _check_application(self) -> None:
        """Refuse another application's SQLite file, reading only."""
        application_id = self._db.execute("PRAGMA application_id").fetchone()[0]
        if application_id not in (0, APPLICATION_ID):
            raise StoreError(f"{self.path} is an SQLite file but not a nos_sym reward store")

    def _init_schema(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            application_id = db.execute("PRAGMA application_id").fetchone()[0]
            has_tables = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] > 0
            if version == 0 and application_id == 0 and not has_tables:
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif application_id != APPLICATION_ID:
                raise StoreError(f"{self.path} is an SQLite file but not a nos_sym reward store")
            elif version == 1:
                _migrate_v1(db)
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has reward-store schema version {version}; this nos_sym reads "
                    f"version {SCHEMA_VERSION} (upgrade nos_sym to read a newer store)"
                )

    def _require_held(self, db: sqlite3.Connection, claim: Claim) -> None:
        row = db.execute(
            f"SELECT status, lease_owner FROM rewards WHERE {_PRIMARY_KEY}", _primary_key(claim)
        ).fetchone()
        if row is None or tuple(row) != ("running", claim.owner):
            state = "no row" if row is None else f"status {row[0]!r}, lease owner {row[1]!r}"
            raise ClaimLostError(
                f"claim on {claim.key} ({claim.protocol}, {claim.task}, seed {claim.seed}) "
                f"is not held by {claim.owner!r} any more ({state})"
            )


def _migrate_v1(db: sqlite3.Connection) -> None:
    """Version 1 → 2, inside the caller's transaction (see the module docstring): every row of a
    version-1 store is a reward of the task ``child`` (version 1) on its data set."""
    from nos_sym.tasks.identity import description, task_identity

    db.execute("ALTER TABLE rewards RENAME COLUMN dataset TO task")
    db.execute("ALTER TABLE rewards ADD COLUMN test REAL")
    db.execute("ALTER TABLE rewards ADD COLUMN curve TEXT")
    db.execute(_TASKS_TABLE)
    datasets = [row[0] for row in db.execute("SELECT DISTINCT task FROM rewards")]
    for dataset in datasets:
        identity = task_identity("child", 1, {"dataset": dataset})
        db.execute("UPDATE rewards SET task = ? WHERE task = ?", (identity, dataset))
        text = json.dumps(description("child", 1, {"dataset": dataset}), sort_keys=True)
        db.execute("INSERT INTO tasks (identity, description) VALUES (?, ?)", (identity, text))
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _primary_key(claim: Claim) -> tuple[str, str, str, int]:
    return claim.key, claim.protocol, claim.task, claim.seed


def _check_header(path: Path) -> None:
    """Refuse, before anything is written to it, a file that is not an SQLite database (an empty
    file is one: SQLite makes it a new database).

    The file is read through a read-only SQLite connection, never with ``open()``: closing any
    descriptor of a database file drops every POSIX lock this process holds on it, so a plain
    ``open``/``close`` while another connection of the process (a :class:`LeaseKeeper`'s, a
    waiting thread's) holds a lock lets other processes write under it and corrupts the store.
    """
    try:
        if path.stat().st_size == 0:
            return
    except FileNotFoundError:
        return  # a new store
    except OSError as error:
        raise StoreError(f"{path}: cannot read it ({error.strerror or error})") from None
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as error:
        if "not a database" not in str(error):
            raise StoreError(f"{path}: cannot read it ({error})") from None
        raise StoreError(
            f"{path} is not an SQLite database (no SQLite header), so not a reward store; "
            "give a reward-store file or a new path"
        ) from None


def _outcome_values(result: EvalResult, extra: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """The column values (outcome columns, then extra) of a result."""
    fields = result.to_json()
    fields["sweep"] = _to_json(fields["sweep"])
    fields["curve"] = json.dumps(fields["curve"], allow_nan=False) if fields["curve"] else None
    return (*(fields[column] for column in _OUTCOME_COLUMNS), _to_json(extra))


def _to_json(value: Mapping[str, Any] | None) -> str | None:
    """Strict JSON text (NaN and infinities raise ValueError)."""
    return None if value is None else json.dumps(dict(value), allow_nan=False)


def _record(row: tuple[Any, ...]) -> Record:
    key, protocol, task, seed, dsl, *values, extra, created, updated = row
    columns = dict(zip(_OUTCOME_COLUMNS, values, strict=True))
    for name in ("sweep", "curve"):
        columns[name] = None if columns[name] is None else json.loads(columns[name])
    # a NULL column (a row written without that field) reads as the field's default
    given = {name: value for name, value in columns.items() if value is not None}
    result = EvalResult.from_json(
        {"dsl": dsl, "key": key, "protocol_hash": protocol, "seed": seed, **given}
    )
    return Record(
        key=key,
        protocol=protocol,
        task=task,
        seed=seed,
        result=result,
        extra=None if extra is None else json.loads(extra),
        created=created,
        updated=updated,
    )


class LeaseKeeper:
    """Renews held claims while their evaluations run: every ``lease_seconds / 3`` (or ``every``
    seconds) a daemon thread, with a connection of its own, pushes each held claim's expiry to
    now + its lease length, until :meth:`drop` (after ``complete`` or ``release``) or
    :meth:`close`. A claim another worker took over in the meantime is dropped; its owner's
    ``complete`` then raises :class:`ClaimLostError` as it would without the keeper.

    Usage: ``keeper.hold(claim)`` when dispatching the evaluation, ``keeper.drop(claim)`` once
    its result is stored; ``with LeaseKeeper(path) as keeper:`` closes the thread."""

    def __init__(self, path: str | os.PathLike[str], *, every: float | None = None) -> None:
        self.path = Path(path)
        self.every = every
        self._held: dict[tuple[str, str, str, int], Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LeaseKeeper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def hold(self, claim: Claim) -> None:
        """Keep ``claim``'s lease alive from now on."""
        with self._lock:
            self._held[_primary_key(claim)] = claim
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="nos_sym-lease-keeper", daemon=True
                )
                self._thread.start()

    def drop(self, claim: Claim) -> None:
        """Stop renewing ``claim`` (its result is stored, or it was released)."""
        with self._lock:
            self._held.pop(_primary_key(claim), None)

    def close(self) -> None:
        """Stop the thread (held claims keep the expiry of their last renewal)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _interval(self) -> float:
        with self._lock:
            leases = [claim.lease_seconds for claim in self._held.values()]
        if self.every is not None:
            return self.every
        return min(leases) / 3 if leases else 1.0

    def _run(self) -> None:
        with RewardStore(self.path) as store:
            while not self._stop.wait(self._interval()):
                with self._lock:
                    claims = list(self._held.values())
                for claim in claims:
                    try:
                        renewed = store.renew(claim)
                    except ClaimLostError:
                        self.drop(claim)
                        continue
                    with self._lock:
                        if _primary_key(claim) in self._held:
                            self._held[_primary_key(claim)] = renewed
