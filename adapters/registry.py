"""The adapter registry: the durable source of truth for adapter versions, their lifecycle, aliases and rollouts.

Serving replicas read it to learn which versions an alias routes to; the tuning job registers new versions and reads
captured traffic with feedback; the rollout controller moves versions through their lifecycle and keeps its own
progress here so it can resume after a restart. All of them may be separate processes, so the registry is an
embedded SQLite database (one file) rather than in-memory state:

* WAL journal mode: readers never block the writer and see the last committed state.
* Every write runs in ``BEGIN IMMEDIATE ... COMMIT``: writers from any number of processes serialise on SQLite's
  lock (waiting up to ``busy_timeout``), a crash mid-write rolls the whole transaction back on the next open, and a
  change and the event that records it commit together or not at all. ``synchronous=FULL`` makes a commit survive
  power loss, not just a process crash; registry writes are rare, so the extra fsync costs nothing that matters.
* The schema is an ordered list of migrations; ``PRAGMA user_version`` counts those applied. Opening an older file
  migrates it in one transaction; a file from a newer tsugiki is refused rather than misread.

Trade-off: WAL needs shared memory between the processes, so every process must run on the same host (a local disk
or a volume mounted on that host); SQLite over NFS/SMB is not safe. Several hosts need a server database.

Artifacts (the adapter files) are not in the database: :mod:`tsugiki.adapters.artifacts` stores them
content-addressed, and a version row holds the artifact's URI.

Tables::

    versions   (name, version) -> digest, base_fingerprint, lineage (parent_version, data_hash), tuning_config,
               gate_report, state, artifact_uri, created, updated;   UNIQUE(name, digest)
    events     append-only log (triggers refuse UPDATE and DELETE): id, ts, kind, alias, name, version, actor, payload
    aliases    alias -> routes {version key: weight}, shadow, shadow_share, capture_rate, capture_retention,
               generation (bumped on every change, so replicas can poll cheaply), updated
    feedback   id, ts, request_id, alias, version_key, user, label, preferred, score
    captures   id, ts, request_id, alias, version_key, prompt, output   (oldest beyond the alias's retention deleted)
    rollouts   id, alias, candidate, baseline, stage, state, plan, evidence, started, updated;
               at most one running/paused rollout per alias (a partial unique index)
    outcomes   one row per alias-routed (or shadowed) request: version, ok, latency, confidence, noisy, agree,
               output (truncated); the rollout controller's evidence, newest 200,000 kept; UNIQUE(request_id,
               version_key, shadow, ts), so a re-sent batch (same rows, same replica timestamps) is counted once
               while requests that share a caller-chosen id are all kept (captures likewise per alias, request, ts)
    refreshes  id, alias, state, reason, source, candidate, detail; at most one requested/running per alias
    kv         small durable values (the controller's cursor into the monitor's alarms)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from tsugiki.adapters.artifacts import ArtifactStore, LocalArtifacts
from tsugiki.adapters.format import AdapterRef, artifact_files, content_digest
from tsugiki.adapters.store import check_name
from tsugiki.errors import (
    ConfigError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    TsugikiError,
)

BUSY_TIMEOUT_MS = 30_000
_KEY_RE = re.compile(r"^(?P<name>[^@]+)@v(?P<version>[1-9][0-9]*)$")
_WEIGHT_TOLERANCE = 1e-9


class VersionState(str, Enum):
    """Lifecycle of an adapter version.

    ``candidate``: registered, not serving. ``shadow``: receives copies of traffic, its answers are only compared.
    ``canary``: serves a share of an alias's traffic. ``stable``: the version an alias serves by default.
    ``retired`` and ``rolled_back`` are terminal: the row and artifact stay for audit and lineage.
    """

    candidate = "candidate"
    shadow = "shadow"
    canary = "canary"
    stable = "stable"
    retired = "retired"
    rolled_back = "rolled_back"


TRANSITIONS: Mapping[VersionState, frozenset[VersionState]] = {
    VersionState.candidate: frozenset({VersionState.shadow, VersionState.canary, VersionState.stable,
                                       VersionState.retired, VersionState.rolled_back}),
    VersionState.shadow: frozenset({VersionState.canary, VersionState.stable, VersionState.rolled_back,
                                    VersionState.retired}),
    VersionState.canary: frozenset({VersionState.stable, VersionState.rolled_back}),
    VersionState.stable: frozenset({VersionState.retired}),
    VersionState.retired: frozenset(),
    VersionState.rolled_back: frozenset(),
}
_NOT_ROUTABLE = (VersionState.retired, VersionState.rolled_back)


class RolloutState(str, Enum):
    """Progress of a rollout; ``running`` and ``paused`` are active, the others final."""

    running = "running"
    paused = "paused"
    promoted = "promoted"
    rolled_back = "rolled_back"
    aborted = "aborted"


_ACTIVE_ROLLOUT = (RolloutState.running, RolloutState.paused)


# ---- records ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterVersion:
    """One registered adapter version with its lineage, evaluation evidence and lifecycle state."""

    name: str
    version: int
    digest: str
    base_fingerprint: str
    parent_version: int | None
    data_hash: str | None
    tuning_config: dict[str, Any] = field(hash=False)
    gate_report: dict[str, Any] = field(hash=False)
    state: VersionState
    artifact_uri: str
    created: float
    updated: float

    @property
    def key(self) -> str:
        """``name@vN``: how routes, captures and events name this version."""
        return f"{self.name}@v{self.version}"

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.name, self.version, self.digest)


@dataclass(frozen=True)
class Alias:
    """A stable name applications call, mapped to version keys with traffic weights.

    ``routes`` weights sum to 1; :func:`route` picks one per caller. ``shadow`` (if set) receives a copy of
    ``shadow_share`` of the traffic. ``capture_rate`` is the share of requests whose prompt and output are kept for
    tuning, at most ``capture_retention`` of them (oldest dropped first).
    """

    alias: str
    routes: dict[str, float] = field(hash=False)
    shadow: str | None
    shadow_share: float
    capture_rate: float
    capture_retention: int
    generation: int
    updated: float


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    kind: str
    alias: str | None
    name: str | None
    version: int | None
    actor: str
    payload: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class Feedback:
    """A user's or reviewer's judgement of one response: a ``label`` (e.g. the right intent), the ``preferred``
    output (a corrected or chosen answer) and/or a numeric ``score``."""

    id: int
    ts: float
    request_id: str
    alias: str | None
    version_key: str | None
    user: str | None
    label: str | None
    preferred: str | None
    score: float | None


@dataclass(frozen=True)
class Capture:
    """A captured request with the newest feedback given for it (each field the newest non-null value)."""

    id: int
    ts: float
    request_id: str
    alias: str
    version_key: str
    prompt: str
    output: str
    label: str | None
    preferred: str | None
    score: float | None


@dataclass(frozen=True)
class Refresh:
    """A request to retrain an alias's adapter (from a drift alarm, an Alertmanager webhook or an operator), and
    how it went: ``requested`` -> ``running`` -> ``done`` (a candidate was registered), ``rejected`` (the gate
    failed), ``skipped`` (not enough labelled new data) or ``failed``."""

    id: int
    alias: str
    state: str
    reason: str
    source: str
    candidate: str | None
    detail: dict[str, Any] = field(hash=False)
    started: float
    updated: float

    @property
    def active(self) -> bool:
        return self.state in REFRESH_ACTIVE


REFRESH_ACTIVE = ("requested", "running")
REFRESH_FINAL = ("done", "rejected", "skipped", "failed")
OUTPUT_KEPT_CHARS = 512  # of each outcome's output: enough to compare with a label, bounded per row


@dataclass(frozen=True)
class Rollout:
    """A rollout controller's durable progress: enough to resume after a restart.

    ``candidate`` and ``baseline`` are version keys; ``stage`` indexes the controller's ``plan``; ``evidence`` holds
    what the controller measured so far.
    """

    id: int
    alias: str
    candidate: str
    baseline: str | None
    stage: int
    state: RolloutState
    plan: dict[str, Any] = field(hash=False)
    evidence: dict[str, Any] = field(hash=False)
    started: float
    updated: float

    @property
    def active(self) -> bool:
        return self.state in _ACTIVE_ROLLOUT


# ---- schema ----------------------------------------------------------------------------------------------------------
# Each migration is a tuple of statements, applied in one transaction together with the user_version bump.
# Never edit a released migration: append a new one.
MIGRATIONS: Sequence[tuple[str, ...]] = (
    (  # 1: versions and the event log
        """CREATE TABLE versions (
            name TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            digest TEXT NOT NULL,
            base_fingerprint TEXT NOT NULL,
            parent_version INTEGER,
            data_hash TEXT,
            tuning_config TEXT NOT NULL DEFAULT '{}',
            gate_report TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL,
            artifact_uri TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            PRIMARY KEY (name, version),
            UNIQUE (name, digest)
        )""",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            alias TEXT,
            name TEXT,
            version INTEGER,
            actor TEXT NOT NULL,
            payload TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX events_alias ON events (alias, id)",
        "CREATE INDEX events_name ON events (name, version, id)",
        "CREATE INDEX events_kind ON events (kind, id)",
        "CREATE TRIGGER events_no_update BEFORE UPDATE ON events "
        "BEGIN SELECT RAISE(ABORT, 'events are append-only'); END",
        "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
        "BEGIN SELECT RAISE(ABORT, 'events are append-only'); END",
    ),
    (  # 2: aliases, feedback and captured traffic
        """CREATE TABLE aliases (
            alias TEXT PRIMARY KEY,
            routes TEXT NOT NULL,
            shadow TEXT,
            shadow_share REAL NOT NULL DEFAULT 0 CHECK (shadow_share BETWEEN 0 AND 1),
            capture_rate REAL NOT NULL DEFAULT 0 CHECK (capture_rate BETWEEN 0 AND 1),
            capture_retention INTEGER NOT NULL DEFAULT 0 CHECK (capture_retention >= 0),
            generation INTEGER NOT NULL,
            updated REAL NOT NULL
        )""",
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            alias TEXT,
            version_key TEXT,
            user TEXT,
            label TEXT,
            preferred TEXT,
            score REAL,
            CHECK (label IS NOT NULL OR preferred IS NOT NULL OR score IS NOT NULL)
        )""",
        "CREATE INDEX feedback_request ON feedback (request_id, id)",
        "CREATE INDEX feedback_alias ON feedback (alias, id)",
        """CREATE TABLE captures (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            alias TEXT NOT NULL,
            version_key TEXT NOT NULL,
            prompt TEXT NOT NULL,
            output TEXT NOT NULL
        )""",
        "CREATE INDEX captures_alias ON captures (alias, id)",
    ),
    (  # 3: rollout controller state
        """CREATE TABLE rollouts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            alias TEXT NOT NULL,
            candidate TEXT NOT NULL,
            baseline TEXT,
            stage INTEGER NOT NULL DEFAULT 0 CHECK (stage >= 0),
            state TEXT NOT NULL,
            plan TEXT NOT NULL DEFAULT '{}',
            evidence TEXT NOT NULL DEFAULT '{}',
            started REAL NOT NULL,
            updated REAL NOT NULL
        )""",
        "CREATE UNIQUE INDEX rollouts_one_active ON rollouts (alias) WHERE state IN ('running', 'paused')",
        "CREATE INDEX rollouts_alias ON rollouts (alias, id)",
    ),
    (  # 4: per-request outcomes of alias traffic (rollout evidence), refresh requests, controller cursors
        """CREATE TABLE outcomes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            alias TEXT NOT NULL,
            version_key TEXT NOT NULL,
            shadow INTEGER NOT NULL DEFAULT 0,
            ok INTEGER NOT NULL,
            latency_s REAL,
            confidence REAL,
            noisy INTEGER NOT NULL DEFAULT 0,
            agree INTEGER,
            output TEXT
        )""",
        "CREATE INDEX outcomes_version ON outcomes (version_key, shadow, ts)",
        "CREATE INDEX outcomes_request ON outcomes (request_id)",
        """CREATE TABLE refreshes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            alias TEXT NOT NULL,
            state TEXT NOT NULL,
            reason TEXT NOT NULL,
            source TEXT NOT NULL,
            candidate TEXT,
            detail TEXT NOT NULL DEFAULT '{}',
            started REAL NOT NULL,
            updated REAL NOT NULL
        )""",
        "CREATE UNIQUE INDEX refreshes_one_active ON refreshes (alias) WHERE state IN ('requested', 'running')",
        "CREATE INDEX refreshes_alias ON refreshes (alias, id)",
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL)",
    ),
    (  # 5: a replica re-sends a batch whose commit it did not hear about: outcomes and captures are kept once
        "DELETE FROM outcomes WHERE id NOT IN (SELECT MIN(id) FROM outcomes GROUP BY request_id, version_key, shadow)",
        "CREATE UNIQUE INDEX outcomes_once ON outcomes (request_id, version_key, shadow)",
        "DELETE FROM captures WHERE id NOT IN (SELECT MIN(id) FROM captures GROUP BY alias, request_id)",
        "CREATE UNIQUE INDEX captures_once ON captures (alias, request_id)",
    ),
    (  # 6: request ids are the caller's x-request-id and can repeat: a re-sent row is the same id *and* the time
        # the replica stamped it, so two requests that share an id are both kept
        "DROP INDEX outcomes_once",
        "CREATE UNIQUE INDEX outcomes_once ON outcomes (request_id, version_key, shadow, ts)",
        "DROP INDEX captures_once",
        "CREATE UNIQUE INDEX captures_once ON captures (alias, request_id, ts)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


# ---- routing (pure) --------------------------------------------------------------------------------------------------
def parse_key(key: str) -> tuple[str, int]:
    """``("name", N)`` from a version key ``name@vN``."""
    m = _KEY_RE.match(key) if isinstance(key, str) else None
    if m is None:
        raise InvalidRequestError(f"version key {key!r} is not of the form name@vN (e.g. support-intent@v3)",
                                  param="key", code="invalid_version_key")
    return m["name"], int(m["version"])


def _unit(*parts: str) -> float:
    """A stable hash of ``parts`` mapped to [0, 1): the same on every process, host and Python run."""
    h = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def route_order(routes: Mapping[str, float]) -> list[str]:
    """The order in which :func:`route` lays the routes out on [0, 1): newest version first.

    Sorting by version number (descending, then by key) rather than dict order makes every replica agree. Putting
    the newest version first makes its bucket ``[0, w)``: when a canary's weight grows from 5% to 25% to 50%, its
    range only extends, so every caller already on the canary stays on it and callers only ever move towards it.
    (When the newest version is rolled back to 0 its callers move back, and nobody else moves.)
    """

    def sort_key(k: str) -> tuple[int, str]:
        _, version = parse_key(k)
        return -version, k

    return sorted(routes, key=sort_key)


def route(alias: Alias, caller_key: str) -> str:
    """The version key serving ``caller_key`` (a user, session or tenant id) on ``alias``.

    Sticky: a caller keeps its version for as long as the weights do not change, on every replica, because the
    choice is a stable hash of (alias, caller) compared with cumulative weights in :func:`route_order`.
    Monotone: raising the newest version's weight only moves callers onto it (see :func:`route_order`).
    """
    u = _unit("route", alias.alias, caller_key)
    live = [k for k in route_order(alias.routes) if alias.routes[k] > 0]
    if not live:
        raise InvalidRequestError(f"alias {alias.alias!r} has no route with a positive weight", param="model")
    acc = 0.0
    for k in live:
        acc += alias.routes[k]
        if u < acc:
            return k
    return live[-1]  # weights sum to 1 within rounding; u just under 1 lands on the last bucket


def in_shadow(alias: Alias, caller_key: str) -> bool:
    """Whether a copy of this request also goes to ``alias.shadow``.

    Uses a hash independent of :func:`route`, so the shadowed sample is spread evenly over the routed versions.
    Pass a request id to sample requests, or a caller key to shadow whole callers.
    """
    if alias.shadow is None or alias.shadow_share <= 0:
        return False
    return _unit("shadow", alias.alias, caller_key) < alias.shadow_share


# ---- the registry ----------------------------------------------------------------------------------------------------
def _dumps(value: Mapping[str, Any] | None, what: str) -> str:
    try:
        return json.dumps(dict(value or {}), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"{what} must be a JSON object of plain values: {e}", param=what) from e


def _check_unit_interval(value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InvalidRequestError(f"{what} must be a number in [0, 1], got {value!r}", param=what)
    return float(value)


class Registry:
    """The registry database at ``path``, with artifacts in ``artifacts``.

    Thread-safe and multi-process-safe: each thread gets its own SQLite connection (connections must not be shared
    between threads), and cross-process consistency comes from SQLite's locking. Methods return plain frozen
    records; nothing holds a transaction open between calls.

    Args:
        path: the database file (created, with its directory, if missing). Processes that share a registry open
            the same file; they must run on the same host (see the module docstring).
        artifacts: where adapter files are stored; defaults to :class:`LocalArtifacts` under
            ``<directory of path>/artifacts``.
    """

    def __init__(self, path: str | Path, artifacts: ArtifactStore | None = None) -> None:
        if str(path) == ":memory:":
            raise ConfigError("the registry needs a database file shared by its connections, not ':memory:'")
        self.path = Path(path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.artifacts = artifacts if artifacts is not None else LocalArtifacts(self.path.parent / "artifacts")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    # ---- connections and transactions ----------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise TsugikiError(f"registry {self.path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        # A connection must not cross fork(): a forked child opens its own and leaves the parent's alone.
        if conn is None or self._local.pid != os.getpid():
            with self._db_errors():
                # isolation_level=None: no implicit transactions; _write() issues BEGIN IMMEDIATE itself.
                # check_same_thread=False only so close() can close every thread's connection; each connection is
                # otherwise used by the thread that made it.
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=BUSY_TIMEOUT_MS / 1000)
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("PRAGMA synchronous = FULL")
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _db_errors(self) -> Iterator[None]:
        """Map sqlite3 errors at the boundary: a lock held too long is overload, anything else a server fault."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise OverloadedError(f"registry {self.path} stayed locked by another writer for over "
                                      f"{BUSY_TIMEOUT_MS / 1000:.0f} s; retry") from e
            raise TsugikiError(f"registry {self.path}: {e}") from e
        except sqlite3.DatabaseError as e:
            raise TsugikiError(f"registry {self.path}: {e}") from e

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: ``BEGIN IMMEDIATE`` takes the write lock up front (waiting up to the busy timeout),
        so reads inside it see the latest commit and no other writer can interleave; any error rolls it all back."""
        conn = self._conn()
        with self._db_errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # some errors (disk full, I/O) make SQLite roll back by itself
                    conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._db_errors():
            return self._conn().execute(sql, params).fetchall()

    def _migrate(self) -> None:
        conn = self._conn()
        with self._db_errors():
            self._refuse_newer(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(f"registry {self.path}: SQLite could not enable WAL journaling (got {mode!r}); "
                                  "put the registry on a local filesystem")
        with self._write() as tx:
            # Re-read under the write lock: another process may have migrated since.
            current = self._refuse_newer(tx)
            for i in range(current, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i]:
                    tx.execute(stmt)
            if current < SCHEMA_VERSION:
                tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _refuse_newer(self, conn: sqlite3.Connection) -> int:
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if current > SCHEMA_VERSION:
            raise ConfigError(f"registry {self.path} has schema version {current}, newer than this tsugiki knows "
                              f"({SCHEMA_VERSION}); upgrade tsugiki, or point it at another registry file")
        return current

    @property
    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    def close(self) -> None:
        """Close every connection this object opened. Later calls raise."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- versions ------------------------------------------------------------------------------------------------
    def register(self, name: str, artifact_dir: str | Path, *, base_fingerprint: str, parent_version: int | None = None,
                 data_hash: str | None = None, tuning_config: Mapping[str, Any] | None = None,
                 gate_report: Mapping[str, Any] | None = None,
                 state: VersionState = VersionState.candidate, actor: str = "system") -> AdapterVersion:
        """Store the adapter in ``artifact_dir`` as the next version of ``name``.

        Content identical to an existing version of ``name`` (same digest) returns that version unchanged, whatever
        the other arguments say, so retrying a registration is safe.

        The artifact is uploaded before the version number is assigned and outside the write transaction, so a slow
        upload never holds the database lock. A crash in between leaves an unreferenced, content-addressed artifact
        that the next registration of the same content reuses.
        """
        check_name(name)
        if not isinstance(base_fingerprint, str) or not base_fingerprint:
            raise InvalidRequestError("base_fingerprint must be a non-empty string identifying the base model",
                                      param="base_fingerprint")
        state = VersionState(state)
        artifact_dir = Path(artifact_dir)
        artifact_files(artifact_dir)
        digest = content_digest(artifact_dir)
        existing = self._by_digest(name, digest)
        if existing is not None:
            return existing
        config_json, report_json = _dumps(tuning_config, "tuning_config"), _dumps(gate_report, "gate_report")
        uri = self.artifacts.put(name, artifact_dir, digest)
        with self._write() as tx:
            row = tx.execute("SELECT * FROM versions WHERE name = ? AND digest = ?", (name, digest)).fetchone()
            if row is not None:  # registered by another process while we uploaded
                return self._version(row)
            if parent_version is not None and tx.execute(
                    "SELECT 1 FROM versions WHERE name = ? AND version = ?", (name, parent_version)).fetchone() is None:
                raise NotFoundError(f"parent version {name}@v{parent_version} is not registered",
                                    param="parent_version")
            version = int(tx.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE name = ?",
                                     (name,)).fetchone()[0])
            now = time.time()
            tx.execute("INSERT INTO versions (name, version, digest, base_fingerprint, parent_version, data_hash, "
                       "tuning_config, gate_report, state, artifact_uri, created, updated) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (name, version, digest, base_fingerprint, parent_version, data_hash, config_json, report_json,
                        state.value, uri, now, now))
            self._event(tx, "registered", name=name, version=version, actor=actor,
                        payload={"digest": digest, "state": state.value, "artifact_uri": uri,
                                 "parent_version": parent_version})
            row = tx.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone()
            return self._version(row)

    def get(self, name: str, version: int) -> AdapterVersion:
        rows = self._read("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version))
        if not rows:
            raise NotFoundError(f"adapter version {name}@v{version} is not registered", param="version",
                                code="adapter_version_not_found")
        return self._version(rows[0])

    def versions(self, name: str | None = None) -> list[AdapterVersion]:
        """Every version (of ``name``, if given), ordered by name and version."""
        if name is None:
            rows = self._read("SELECT * FROM versions ORDER BY name, version")
        else:
            rows = self._read("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,))
        return [self._version(r) for r in rows]

    def latest(self, name: str, state: VersionState | None = None) -> AdapterVersion | None:
        """The highest version of ``name`` (in ``state``, if given), or None."""
        if state is None:
            rows = self._read("SELECT * FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,))
        else:
            rows = self._read("SELECT * FROM versions WHERE name = ? AND state = ? ORDER BY version DESC LIMIT 1",
                              (name, VersionState(state).value))
        return self._version(rows[0]) if rows else None

    def fetch(self, name: str, version: int, dest_dir: str | Path) -> Path:
        """Download a version's files into ``dest_dir``, verified against its digest."""
        v = self.get(name, version)
        return self.artifacts.fetch(v.artifact_uri, Path(dest_dir))

    def transition(self, name: str, version: int, new_state: VersionState, *, reason: str, actor: str = "system",
                   data: Mapping[str, Any] | None = None) -> AdapterVersion:
        """Move a version to ``new_state`` if :data:`TRANSITIONS` allows it, logging a ``transition`` event with
        ``reason`` and ``data`` in the same transaction.

        A version an alias still routes to (or shadows to) cannot be retired or rolled back: change the alias first,
        so no replica is left serving a version marked dead.
        """
        new_state = VersionState(new_state)
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidRequestError("a transition needs a reason (it goes into the audit log)", param="reason")
        data_json = _dumps(data, "data")
        key = f"{name}@v{version}"
        with self._write() as tx:
            row = tx.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone()
            if row is None:
                raise NotFoundError(f"adapter version {key} is not registered", param="version",
                                    code="adapter_version_not_found")
            old = VersionState(row["state"])
            if new_state not in TRANSITIONS[old]:
                allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old])) or "nothing (it is final)"
                raise ConflictError(f"{key} cannot go from {old.value} to {new_state.value}; from {old.value} it can "
                                    f"go to {allowed}", param="new_state", code="illegal_transition")
            if new_state in _NOT_ROUTABLE:
                users = [a.alias for a in self._aliases(tx) if key in a.routes or a.shadow == key]
                if users:
                    raise ConflictError(f"{key} cannot become {new_state.value}: alias(es) {', '.join(users)} still "
                                        "route to it; set_alias() without it first", param="new_state")
            now = time.time()
            tx.execute("UPDATE versions SET state = ?, updated = ? WHERE name = ? AND version = ?",
                       (new_state.value, now, name, version))
            self._event(tx, "transition", name=name, version=version, actor=actor,
                        payload={"from": old.value, "to": new_state.value, "reason": reason,
                                 "data": json.loads(data_json)})
            return self._version(tx.execute("SELECT * FROM versions WHERE name = ? AND version = ?",
                                            (name, version)).fetchone())

    def _by_digest(self, name: str, digest: str) -> AdapterVersion | None:
        rows = self._read("SELECT * FROM versions WHERE name = ? AND digest = ?", (name, digest))
        return self._version(rows[0]) if rows else None

    @staticmethod
    def _version(row: sqlite3.Row) -> AdapterVersion:
        return AdapterVersion(
            name=row["name"], version=row["version"], digest=row["digest"], base_fingerprint=row["base_fingerprint"],
            parent_version=row["parent_version"], data_hash=row["data_hash"],
            tuning_config=json.loads(row["tuning_config"]), gate_report=json.loads(row["gate_report"]),
            state=VersionState(row["state"]), artifact_uri=row["artifact_uri"], created=row["created"],
            updated=row["updated"])

    # ---- events --------------------------------------------------------------------------------------------------
    def log_event(self, kind: str, *, alias: str | None = None, name: str | None = None, version: int | None = None,
                  actor: str = "system", payload: Mapping[str, Any] | None = None) -> int:
        """Append an event (e.g. a rollout decision with its evidence); returns its id."""
        if not isinstance(kind, str) or not kind:
            raise InvalidRequestError("event kind must be a non-empty string", param="kind")
        payload_json = _dumps(payload, "payload")
        with self._write() as tx:
            return self._event(tx, kind, alias=alias, name=name, version=version, actor=actor,
                               payload_json=payload_json)

    def events(self, *, alias: str | None = None, name: str | None = None, kind: str | None = None,
               since_id: int | None = None, limit: int = 1000) -> list[Event]:
        """Events matching every given filter, oldest first. Poll with ``since_id`` = the last id seen."""
        where, params = self._filters(alias=alias, name=name, kind=kind, since_id=since_id)
        rows = self._read(f"SELECT * FROM events{where} ORDER BY id LIMIT ?", (*params, int(limit)))
        return [Event(id=r["id"], ts=r["ts"], kind=r["kind"], alias=r["alias"], name=r["name"], version=r["version"],
                      actor=r["actor"], payload=json.loads(r["payload"])) for r in rows]

    @staticmethod
    def _event(tx: sqlite3.Connection, kind: str, *, alias: str | None = None, name: str | None = None,
               version: int | None = None, actor: str = "system", payload: Mapping[str, Any] | None = None,
               payload_json: str | None = None) -> int:
        if payload_json is None:
            payload_json = _dumps(payload, "payload")
        cur = tx.execute("INSERT INTO events (ts, kind, alias, name, version, actor, payload) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (time.time(), kind, alias, name, version, actor, payload_json))
        return int(cur.lastrowid or 0)

    @staticmethod
    def _filters(*, since_id: int | None = None, **eq: Any) -> tuple[str, list[Any]]:
        clauses, params = [], []
        for col, value in eq.items():
            if value is not None:
                clauses.append(f"{col} = ?")
                params.append(value)
        if since_id is not None:
            clauses.append("id > ?")
            params.append(int(since_id))
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    # ---- aliases -------------------------------------------------------------------------------------------------
    def set_alias(self, alias: str, routes: Mapping[str, float], *, shadow: str | None = None,
                  shadow_share: float = 0.0, actor: str = "system", reason: str = "") -> Alias:
        """Create or change ``alias``: ``routes`` maps version keys (``name@vN``) to traffic weights summing to 1.

        Every key must be registered and neither retired nor rolled back; the check and the change happen in one
        transaction, so a concurrent retirement cannot slip in between. Capture settings are kept. Each change bumps
        ``generation`` and logs an ``alias_set`` event with the previous routes.
        """
        check_name(alias)
        if not isinstance(routes, Mapping) or not routes:
            raise InvalidRequestError(f"alias {alias!r} needs at least one route (version key -> weight)",
                                      param="routes")
        clean: dict[str, float] = {}
        for key, w in routes.items():
            parse_key(key)
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise InvalidRequestError(f"route weight for {key!r} must be a finite number >= 0, got {w!r}",
                                          param="routes")
            clean[key] = float(w)
        total = math.fsum(clean.values())
        if abs(total - 1.0) > _WEIGHT_TOLERANCE:
            raise InvalidRequestError(f"route weights of alias {alias!r} sum to {total!r}; they must sum to 1",
                                      param="routes")
        shadow_share = _check_unit_interval(shadow_share, "shadow_share")
        if shadow is None and shadow_share > 0:
            raise InvalidRequestError(f"shadow_share is {shadow_share} but no shadow version is given", param="shadow")
        if shadow is not None:
            parse_key(shadow)
            if shadow in clean:
                raise InvalidRequestError(f"shadow {shadow!r} is also a live route of alias {alias!r}; a shadow only "
                                          "receives copies of traffic", param="shadow")
        with self._write() as tx:
            for key in [*clean, *([shadow] if shadow else [])]:
                name, version = parse_key(key)
                row = tx.execute("SELECT state FROM versions WHERE name = ? AND version = ?",
                                 (name, version)).fetchone()
                if row is None:
                    raise NotFoundError(f"alias {alias!r} routes to {key}, which is not registered", param="routes",
                                        code="adapter_version_not_found")
                if VersionState(row["state"]) in _NOT_ROUTABLE:
                    raise ConflictError(f"alias {alias!r} cannot route to {key}: it is {row['state']}",
                                        param="routes")
            prev = tx.execute("SELECT * FROM aliases WHERE alias = ?", (alias,)).fetchone()
            now = time.time()
            routes_json = json.dumps(clean, sort_keys=True)
            if prev is None:
                generation = 1
                tx.execute("INSERT INTO aliases (alias, routes, shadow, shadow_share, generation, updated) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (alias, routes_json, shadow, shadow_share, generation, now))
            else:
                generation = int(prev["generation"]) + 1
                tx.execute("UPDATE aliases SET routes = ?, shadow = ?, shadow_share = ?, generation = ?, updated = ? "
                           "WHERE alias = ?", (routes_json, shadow, shadow_share, generation, now, alias))
            self._event(tx, "alias_set", alias=alias, actor=actor,
                        payload={"routes": clean, "shadow": shadow, "shadow_share": shadow_share,
                                 "previous": json.loads(prev["routes"]) if prev is not None else None,
                                 "generation": generation, "reason": reason})
            return self._alias(tx.execute("SELECT * FROM aliases WHERE alias = ?", (alias,)).fetchone())

    def get_alias(self, alias: str) -> Alias:
        rows = self._read("SELECT * FROM aliases WHERE alias = ?", (alias,))
        if not rows:
            raise NotFoundError(f"alias {alias!r} does not exist; set_alias() creates it", param="model",
                                code="alias_not_found")
        return self._alias(rows[0])

    def aliases(self) -> list[Alias]:
        return self._aliases(self._conn())

    def delete_alias(self, alias: str, *, actor: str = "system", reason: str = "") -> None:
        """Remove ``alias`` (its captures and events stay). Refused while a rollout on it is active."""
        with self._write() as tx:
            if tx.execute("SELECT 1 FROM aliases WHERE alias = ?", (alias,)).fetchone() is None:
                raise NotFoundError(f"alias {alias!r} does not exist", param="alias", code="alias_not_found")
            active = self._active_rollout(tx, alias)
            if active is not None:
                raise ConflictError(f"alias {alias!r} has an active rollout (id {active.id}, {active.state.value}); "
                                    "finish or abort it first", param="alias")
            tx.execute("DELETE FROM aliases WHERE alias = ?", (alias,))
            self._event(tx, "alias_deleted", alias=alias, actor=actor, payload={"reason": reason})

    def set_capture(self, alias: str, rate: float, retention: int, *, actor: str = "system") -> Alias:
        """Keep ``rate`` of ``alias``'s requests (prompt and output) for tuning, at most ``retention`` of them."""
        rate = _check_unit_interval(rate, "rate")
        if isinstance(retention, bool) or not isinstance(retention, int) or retention < 0:
            raise InvalidRequestError(f"capture retention must be an integer >= 0, got {retention!r}",
                                      param="retention")
        with self._write() as tx:
            prev = tx.execute("SELECT generation FROM aliases WHERE alias = ?", (alias,)).fetchone()
            if prev is None:
                raise NotFoundError(f"alias {alias!r} does not exist; set_alias() creates it", param="alias",
                                    code="alias_not_found")
            tx.execute("UPDATE aliases SET capture_rate = ?, capture_retention = ?, generation = generation + 1, "
                       "updated = ? WHERE alias = ?", (rate, retention, time.time(), alias))
            self._delete_old_captures(tx, alias, retention)
            self._event(tx, "capture_set", alias=alias, actor=actor, payload={"rate": rate, "retention": retention})
            return self._alias(tx.execute("SELECT * FROM aliases WHERE alias = ?", (alias,)).fetchone())

    def _aliases(self, conn: sqlite3.Connection) -> list[Alias]:
        with self._db_errors():
            return [self._alias(r) for r in conn.execute("SELECT * FROM aliases ORDER BY alias").fetchall()]

    @staticmethod
    def _alias(row: sqlite3.Row) -> Alias:
        return Alias(alias=row["alias"], routes=json.loads(row["routes"]), shadow=row["shadow"],
                     shadow_share=row["shadow_share"], capture_rate=row["capture_rate"],
                     capture_retention=row["capture_retention"], generation=row["generation"],
                     updated=row["updated"])

    # ---- feedback and captures -----------------------------------------------------------------------------------
    def add_feedback(self, request_id: str, *, label: str | None = None, preferred: str | None = None,
                     score: float | None = None, alias: str | None = None, version_key: str | None = None,
                     user: str | None = None) -> int:
        """Record feedback on the response to ``request_id``; returns its id. Committed (durable) on return."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("feedback needs the request_id of the response it is about", param="request_id")
        if label is None and preferred is None and score is None:
            raise InvalidRequestError(f"feedback for request {request_id!r} needs at least one of label, preferred "
                                      "or score", param="label")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                  or not math.isfinite(score)):
            raise InvalidRequestError(f"feedback score must be a finite number, got {score!r}", param="score")
        with self._write() as tx:
            cur = tx.execute("INSERT INTO feedback (ts, request_id, alias, version_key, user, label, preferred, score) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (time.time(), request_id, alias, version_key, user, label, preferred,
                              None if score is None else float(score)))
            return int(cur.lastrowid or 0)

    def feedback(self, *, alias: str | None = None, since_id: int | None = None, limit: int = 10_000,
                 newest: bool = False) -> list[Feedback]:
        """Feedback (on ``alias``, if given; newer than ``since_id``, if given), oldest first: the oldest ``limit``
        of them, or with ``newest`` the newest ``limit``."""
        where, params = self._filters(alias=alias, since_id=since_id)
        order = "DESC" if newest else "ASC"
        rows = self._read(f"SELECT * FROM feedback{where} ORDER BY id {order} LIMIT ?", (*params, int(limit)))
        rows = rows[::-1] if newest else rows
        return [Feedback(id=r["id"], ts=r["ts"], request_id=r["request_id"], alias=r["alias"],
                         version_key=r["version_key"], user=r["user"], label=r["label"], preferred=r["preferred"],
                         score=r["score"]) for r in rows]

    def feedback_count(self, *, alias: str | None = None) -> int:
        """How many feedback records are stored (on ``alias``, if given)."""
        where, params = self._filters(alias=alias)
        return int(self._read(f"SELECT COUNT(*) AS n FROM feedback{where}", params)[0]["n"])

    def capture(self, request_id: str, alias: str, version_key: str, prompt: str, output: str,
                ts: float | None = None) -> int | None:
        """Keep one request's prompt and output for tuning; returns the capture id.

        In the same transaction the oldest captures of ``alias`` beyond its ``capture_retention`` are deleted, so
        the table never outgrows the retention. With a retention of 0 nothing is kept and None is returned.
        Sampling (``capture_rate``) is the caller's decision; the alias must exist. Writing the same
        ``request_id`` with the same ``ts`` again (a re-sent batch) returns the first capture's id.
        """
        parse_key(version_key)
        with self._write() as tx:
            row = tx.execute("SELECT capture_retention FROM aliases WHERE alias = ?", (alias,)).fetchone()
            if row is None:
                raise NotFoundError(f"alias {alias!r} does not exist; captures belong to an alias", param="alias",
                                    code="alias_not_found")
            retention = int(row["capture_retention"])
            if retention == 0:
                return None
            at = time.time() if ts is None else float(ts)
            cur = tx.execute("INSERT OR IGNORE INTO captures (ts, request_id, alias, version_key, prompt, output) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (at, request_id, alias, version_key, prompt, output))
            if cur.rowcount == 0:  # already captured (a re-sent batch): keep the first
                row = tx.execute("SELECT id FROM captures WHERE alias = ? AND request_id = ? AND ts = ?",
                                 (alias, request_id, at)).fetchone()
                return int(row["id"]) if row is not None else None
            self._delete_old_captures(tx, alias, retention)
            return int(cur.lastrowid or 0)

    def captures(self, alias: str, *, labelled_only: bool = False) -> list[Capture]:
        """``alias``'s captures, oldest first, each with its request's newest non-null label, preferred and score.

        ``labelled_only`` keeps captures that have any feedback: what the tuning job turns into training data.
        """
        latest = ("(SELECT {col} FROM feedback f WHERE f.request_id = c.request_id AND f.{col} IS NOT NULL "
                  "ORDER BY f.id DESC LIMIT 1) AS {col}")
        sql = (f"SELECT * FROM (SELECT c.*, {latest.format(col='label')}, {latest.format(col='preferred')}, "
               f"{latest.format(col='score')} FROM captures c WHERE c.alias = ?)")
        if labelled_only:
            sql += " WHERE label IS NOT NULL OR preferred IS NOT NULL OR score IS NOT NULL"
        rows = self._read(sql + " ORDER BY id", (alias,))
        return [Capture(id=r["id"], ts=r["ts"], request_id=r["request_id"], alias=r["alias"],
                        version_key=r["version_key"], prompt=r["prompt"], output=r["output"], label=r["label"],
                        preferred=r["preferred"], score=r["score"]) for r in rows]

    @staticmethod
    def _delete_old_captures(tx: sqlite3.Connection, alias: str, retention: int) -> None:
        # Oldest by id (insertion order), not ts: callers may pass their own timestamps.
        tx.execute("DELETE FROM captures WHERE alias = ? AND id <= (SELECT id FROM captures WHERE alias = ? "
                   "ORDER BY id DESC LIMIT 1 OFFSET ?)", (alias, alias, retention))

    # ---- rollouts ------------------------------------------------------------------------------------------------
    def start_rollout(self, alias: str, candidate: str, baseline: str | None = None, *,
                      plan: Mapping[str, Any] | None = None, stage: int = 0,
                      evidence: Mapping[str, Any] | None = None, actor: str = "system") -> Rollout:
        """Record a new running rollout of ``candidate`` (a version key) on ``alias``, against ``baseline``.

        The database allows one active (running or paused) rollout per alias; a second is a :class:`ConflictError`.
        """
        check_name(alias)
        keys = [candidate] + ([baseline] if baseline is not None else [])
        plan_json = _dumps(plan, "plan")
        with self._write() as tx:
            for key in keys:
                name, version = parse_key(key)
                if tx.execute("SELECT 1 FROM versions WHERE name = ? AND version = ?",
                              (name, version)).fetchone() is None:
                    raise NotFoundError(f"rollout on {alias!r} names {key}, which is not registered",
                                        param="candidate" if key == candidate else "baseline",
                                        code="adapter_version_not_found")
            now = time.time()
            try:
                cur = tx.execute("INSERT INTO rollouts (alias, candidate, baseline, stage, state, plan, evidence, "
                                 "started, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 (alias, candidate, baseline, int(stage), RolloutState.running.value, plan_json,
                                  _dumps(evidence, "evidence"), now, now))
            except sqlite3.IntegrityError as e:
                active = self._active_rollout(tx, alias)
                what = f" (id {active.id}, {active.candidate}, {active.state.value})" if active else ""
                raise ConflictError(f"alias {alias!r} already has an active rollout{what}; finish or abort it first",
                                    param="alias", code="rollout_active") from e
            rollout_id = int(cur.lastrowid or 0)
            self._event(tx, "rollout_started", alias=alias, actor=actor,
                        payload={"rollout_id": rollout_id, "candidate": candidate, "baseline": baseline})
            return self._rollout_by_id(tx, rollout_id)

    def get_rollout(self, alias: str, active_only: bool = True) -> Rollout | None:
        """The newest rollout on ``alias`` (only a running or paused one if ``active_only``), or None."""
        if active_only:
            return self._active_rollout(self._conn(), alias)
        rows = self._read("SELECT * FROM rollouts WHERE alias = ? ORDER BY id DESC LIMIT 1", (alias,))
        return self._rollout(rows[0]) if rows else None

    def rollouts(self, alias: str | None = None) -> list[Rollout]:
        where, params = self._filters(alias=alias)
        return [self._rollout(r) for r in self._read(f"SELECT * FROM rollouts{where} ORDER BY id", params)]

    def update_rollout(self, rollout_id: int, *, stage: int | None = None, state: RolloutState | None = None,
                       plan: Mapping[str, Any] | None = None, evidence: Mapping[str, Any] | None = None,
                       actor: str = "system") -> Rollout:
        """Change the given fields of an active rollout. Stage and state changes are logged as events; evidence
        updates are not (they can be frequent; the rollout row holds the latest)."""
        if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int) or stage < 0):
            raise InvalidRequestError(f"rollout stage must be an integer >= 0, got {stage!r}", param="stage")
        new_state = None if state is None else RolloutState(state)
        plan_json = None if plan is None else _dumps(plan, "plan")
        evidence_json = None if evidence is None else _dumps(evidence, "evidence")
        with self._write() as tx:
            current = self._rollout_by_id(tx, rollout_id)
            if not current.active:
                raise ConflictError(f"rollout {rollout_id} on {current.alias!r} is {current.state.value}; a finished "
                                    "rollout cannot change, start a new one", param="rollout_id")
            sets: dict[str, Any] = {"stage": stage, "state": None if new_state is None else new_state.value,
                                    "plan": plan_json, "evidence": evidence_json}
            sets = {k: v for k, v in sets.items() if v is not None}
            sets["updated"] = time.time()
            tx.execute(f"UPDATE rollouts SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                       (*sets.values(), rollout_id))
            changed: dict[str, Any] = {k: sets[k] for k in ("stage", "state") if k in sets}
            if changed:
                self._event(tx, "rollout_updated", alias=current.alias, actor=actor,
                            payload={"rollout_id": rollout_id, **changed})
            return self._rollout_by_id(tx, rollout_id)

    def _active_rollout(self, conn: sqlite3.Connection, alias: str) -> Rollout | None:
        with self._db_errors():
            row = conn.execute("SELECT * FROM rollouts WHERE alias = ? AND state IN (?, ?) ORDER BY id DESC LIMIT 1",
                               (alias, *(s.value for s in _ACTIVE_ROLLOUT))).fetchone()
        return self._rollout(row) if row is not None else None

    def _rollout_by_id(self, conn: sqlite3.Connection, rollout_id: int) -> Rollout:
        row = conn.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"rollout {rollout_id} does not exist", param="rollout_id")
        return self._rollout(row)

    @staticmethod
    def _rollout(row: sqlite3.Row) -> Rollout:
        return Rollout(id=row["id"], alias=row["alias"], candidate=row["candidate"], baseline=row["baseline"],
                       stage=row["stage"], state=RolloutState(row["state"]), plan=json.loads(row["plan"]),
                       evidence=json.loads(row["evidence"]), started=row["started"], updated=row["updated"])

    # ---- outcomes (rollout evidence) ------------------------------------------------------------------------------
    def record_outcomes(self, rows: Sequence[Mapping[str, Any]], *, keep: int = 200_000) -> int:
        """Append outcome rows of alias-routed requests (one transaction); keeps the newest ``keep`` rows.

        Each row: ``request_id``, ``alias``, ``version_key``, ``ok``; optional ``ts`` (a row written again with
        the same id, version, shadow flag and ``ts`` is a re-send and kept once), ``shadow``, ``latency_s``,
        ``confidence`` (mean token log-prob), ``noisy``, ``agree`` (shadow answer equal to the served one),
        ``output`` (kept to its first 512 characters).
        """
        now = time.time()
        values = []
        for r in rows:
            parse_key(str(r["version_key"]))
            out = r.get("output")
            values.append((float(r.get("ts") or now), str(r["request_id"]), str(r["alias"]), str(r["version_key"]),
                           int(bool(r.get("shadow"))), int(bool(r["ok"])), _opt_float(r.get("latency_s")),
                           _opt_float(r.get("confidence")), int(bool(r.get("noisy"))),
                           None if r.get("agree") is None else int(bool(r["agree"])),
                           None if out is None else str(out)[:OUTPUT_KEPT_CHARS]))
        with self._write() as tx:
            tx.executemany("INSERT OR IGNORE INTO outcomes (ts, request_id, alias, version_key, shadow, ok, latency_s, "
                           "confidence, noisy, agree, output) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
            # feedback that arrived before its request's outcome learns which alias and version it is about
            tx.executemany("UPDATE feedback SET alias = ?, version_key = ? WHERE request_id = ? AND alias IS NULL",
                           [(v[2], v[3], v[1]) for v in values if not v[4]])
            tx.execute("DELETE FROM outcomes WHERE id <= (SELECT MAX(id) FROM outcomes) - ?", (int(keep),))
        return len(values)

    def outcomes(self, version_key: str, *, since: float = 0.0, shadow: bool = False,
                 limit: int = 100_000) -> list[dict[str, Any]]:
        """Outcome rows of ``version_key`` since ``since`` (served or, with ``shadow``, shadowed), oldest first.

        Each row also carries ``correct``: from the newest feedback on its request, the ``score`` (>= 0.5 is
        correct) or else whether the ``label`` equals the output (case and surrounding space ignored); None
        without feedback.
        """
        parse_key(version_key)
        rows = self._read(
            "SELECT o.*, (SELECT f.score FROM feedback f WHERE f.request_id = o.request_id AND f.score IS NOT NULL "
            "ORDER BY f.id DESC LIMIT 1) AS fb_score, (SELECT f.label FROM feedback f WHERE f.request_id = "
            "o.request_id AND f.label IS NOT NULL ORDER BY f.id DESC LIMIT 1) AS fb_label FROM outcomes o "
            "WHERE o.version_key = ? AND o.shadow = ? AND o.ts >= ? ORDER BY o.id LIMIT ?",
            (version_key, int(shadow), float(since), int(limit)))
        out = []
        for r in rows:
            correct: bool | None = None
            # a score judged the served answer; a shadow row is judged only by its own output against the label
            if r["fb_score"] is not None and not r["shadow"]:
                correct = float(r["fb_score"]) >= 0.5
            elif r["fb_label"] is not None and r["output"] is not None:
                correct = r["output"].strip().lower() == str(r["fb_label"]).strip().lower()
            out.append({"ts": r["ts"], "request_id": r["request_id"], "alias": r["alias"],
                        "version_key": r["version_key"], "shadow": bool(r["shadow"]), "ok": bool(r["ok"]),
                        "latency_s": r["latency_s"], "confidence": r["confidence"], "noisy": bool(r["noisy"]),
                        "agree": None if r["agree"] is None else bool(r["agree"]), "output": r["output"],
                        "correct": correct})
        return out

    def outcome_of(self, request_id: str) -> dict[str, Any] | None:
        """The served (not shadow) outcome of ``request_id``: which alias and version answered it."""
        rows = self._read("SELECT alias, version_key FROM outcomes WHERE request_id = ? AND shadow = 0 "
                          "ORDER BY id DESC LIMIT 1", (request_id,))
        return {"alias": rows[0]["alias"], "version_key": rows[0]["version_key"]} if rows else None

    # ---- refreshes -------------------------------------------------------------------------------------------------
    def request_refresh(self, alias: str, *, reason: str, source: str,
                        detail: Mapping[str, Any] | None = None) -> tuple[Refresh, bool]:
        """Ask for a refresh of ``alias``; returns (the refresh, whether it is new). While one is requested or
        running, asking again returns that one: one refresh per alias at a time, enforced by the database."""
        detail_json = _dumps(detail, "detail")
        with self._write() as tx:
            if tx.execute("SELECT 1 FROM aliases WHERE alias = ?", (alias,)).fetchone() is None:
                raise NotFoundError(f"alias {alias!r} does not exist", param="alias", code="alias_not_found")
            active = tx.execute("SELECT * FROM refreshes WHERE alias = ? AND state IN (?, ?)",
                                (alias, *REFRESH_ACTIVE)).fetchone()
            if active is not None:
                return self._refresh(active), False
            now = time.time()
            cur = tx.execute("INSERT INTO refreshes (alias, state, reason, source, detail, started, updated) "
                             "VALUES (?, 'requested', ?, ?, ?, ?, ?)", (alias, reason, source, detail_json, now, now))
            rid = int(cur.lastrowid or 0)
            self._event(tx, "refresh_requested", alias=alias, actor=source,
                        payload={"refresh_id": rid, "reason": reason})
            return self._refresh(tx.execute("SELECT * FROM refreshes WHERE id = ?", (rid,)).fetchone()), True

    def update_refresh(self, refresh_id: int, *, state: str, candidate: str | None = None,
                       detail: Mapping[str, Any] | None = None, actor: str = "controller") -> Refresh:
        """Move a refresh on (``running`` or a final state), merging ``detail`` into its record; logged."""
        if state not in REFRESH_ACTIVE + REFRESH_FINAL:
            raise InvalidRequestError(f"refresh state {state!r} is not one of {REFRESH_ACTIVE + REFRESH_FINAL}",
                                      param="state")
        with self._write() as tx:
            row = tx.execute("SELECT * FROM refreshes WHERE id = ?", (refresh_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"refresh {refresh_id} does not exist", param="refresh_id")
            cur = self._refresh(row)
            if not cur.active:
                raise ConflictError(f"refresh {refresh_id} is {cur.state}; a finished refresh cannot change",
                                    param="refresh_id")
            merged = {**cur.detail, **dict(detail or {})}
            tx.execute("UPDATE refreshes SET state = ?, candidate = COALESCE(?, candidate), detail = ?, updated = ? "
                       "WHERE id = ?", (state, candidate, _dumps(merged, "detail"), time.time(), refresh_id))
            self._event(tx, f"refresh_{state}", alias=cur.alias, actor=actor,
                        payload={"refresh_id": refresh_id, "candidate": candidate,
                                 **{k: v for k, v in dict(detail or {}).items() if k in ("why", "error")}})
            return self._refresh(tx.execute("SELECT * FROM refreshes WHERE id = ?", (refresh_id,)).fetchone())

    def refreshes(self, alias: str | None = None, *, active_only: bool = False) -> list[Refresh]:
        where, params = self._filters(alias=alias)
        if active_only:
            where += (" AND" if where else " WHERE") + " state IN ('requested', 'running')"
        return [self._refresh(r) for r in self._read(f"SELECT * FROM refreshes{where} ORDER BY id", params)]

    @staticmethod
    def _refresh(row: sqlite3.Row) -> Refresh:
        return Refresh(id=row["id"], alias=row["alias"], state=row["state"], reason=row["reason"],
                       source=row["source"], candidate=row["candidate"], detail=json.loads(row["detail"]),
                       started=row["started"], updated=row["updated"])

    # ---- small durable values (controller cursors) ----------------------------------------------------------------
    def get_value(self, key: str, default: Any = None) -> Any:
        rows = self._read("SELECT value FROM kv WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_value(self, key: str, value: Any) -> None:
        with self._write() as tx:
            tx.execute("INSERT INTO kv (key, value, updated) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                       "value = excluded.value, updated = excluded.updated",
                       (key, json.dumps(value, allow_nan=False), time.time()))


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None
