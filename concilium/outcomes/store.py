"""The outcome store: routed requests, their cost and latency, and the quality fed back later.

One SQLite file (``$CONCILIUM_HOME/outcomes.sqlite`` or ``outcomes.path``, WAL) shared by every
gateway process on the node (WAL needs them on one host: on a cluster, one file per node). Live
requests are queued and written by one background thread per process, so logging never adds a
disk write to a request; `feedback` flushes first. Imported outcome tables (RouterBench
layout) become labelled rows, one per (query, expert). The predictive router reads the labelled
rows (`labelled`) and refreshes when `version` moves.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from concilium.errors import Conflict, InvalidInput
from concilium.outcomes.table import OutcomeTable

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    decision_id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    query TEXT,
    embedding BLOB,
    router TEXT,
    strategy TEXT,
    experts TEXT NOT NULL,
    expert TEXT NOT NULL,
    cost REAL,
    latency_ms REAL,
    active_params INTEGER,
    quality REAL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outcomes_labelled ON outcomes (quality) WHERE quality IS NOT NULL;
-- the rows max_rows bounds, oldest first: counted and trimmed on every flush without a scan
CREATE INDEX IF NOT EXISTS outcomes_pending ON outcomes (ts)
    WHERE quality IS NULL AND source = 'live';
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('version', 0);
"""


@dataclass(frozen=True, slots=True)
class Logged:
    """One routed request as the store keeps it."""

    decision_id: str
    query: str | None
    embedding: np.ndarray | None
    router: str
    strategy: str
    experts: tuple[str, ...]  # every expert that ran
    expert: str  # the expert whose answer was returned
    cost: float
    latency_ms: float
    active_params: int | None


@dataclass(frozen=True, slots=True)
class Labelled:
    """Labelled outcomes: embeddings [N, dim], the expert of each row and its quality [N]."""

    embeddings: np.ndarray
    experts: list[str]
    quality: np.ndarray


class OutcomeStore:
    """SQLite outcome log + feedback + RouterBench import."""

    def __init__(
        self,
        path: Path,
        *,
        keep_queries: bool = True,
        max_rows: int = 200_000,
        flush_ms: float = 50.0,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep_queries = keep_queries
        self.max_rows = max_rows
        self.flush_s = flush_ms / 1000
        self._lock = threading.Lock()
        with self._connect() as db:
            _wal(db)
            db.executescript(_SCHEMA)
        self._queue: queue.Queue[Logged | threading.Event] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 30000")
        return db

    # -- logging (non-blocking) ------------------------------------------------------------------
    def log(self, item: Logged) -> None:
        """Queue a routed request; the background writer commits it within `flush_ms`."""
        if self._closed:
            return
        self._ensure_writer()
        self._queue.put(item)

    def flush(self, timeout: float = 5.0) -> None:
        """Block until everything queued so far is on disk."""
        if self._writer is None:
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        self.flush()
        self._closed = True

    def _ensure_writer(self) -> None:
        if self._writer is None:
            with self._lock:
                if self._writer is None:
                    self._writer = threading.Thread(
                        target=self._write_loop, name="outcome-writer", daemon=True
                    )
                    self._writer.start()

    def _write_loop(self) -> None:
        db = self._connect()
        while True:
            batch: list[Logged] = []
            events: list[threading.Event] = []
            item = self._queue.get()
            deadline = time.monotonic() + self.flush_s
            while True:
                if isinstance(item, threading.Event):
                    events.append(item)
                    break  # a flush request: write now
                batch.append(item)
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            try:
                if batch:
                    self._insert(db, batch)
            except Exception:  # the writer must outlive any one batch, or logging stops for good
                log.exception("could not log %d outcomes", len(batch))
            for e in events:
                e.set()

    def _insert(self, db: sqlite3.Connection, batch: Sequence[Logged]) -> None:
        now = time.time()
        rows = [
            (
                x.decision_id,
                now,
                x.query if self.keep_queries else None,
                _blob(x.embedding),
                x.router,
                x.strategy,
                json.dumps(list(x.experts)),
                x.expert,
                x.cost,
                x.latency_ms,
                x.active_params,
                None,
                "live",
            )
            for x in batch
        ]
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR IGNORE INTO outcomes VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
            )
            # beyond max_rows unlabelled live rows, the oldest go (labelled rows are what the
            # router learns from; counting them too dropped every new row once they filled it)
            pending = "FROM outcomes WHERE quality IS NULL AND source = 'live'"
            excess = db.execute("SELECT COUNT(*) " + pending).fetchone()[0] - self.max_rows
            if excess > 0:
                db.execute(
                    "DELETE FROM outcomes WHERE decision_id IN "
                    f"(SELECT decision_id {pending} ORDER BY ts LIMIT ?)",
                    (excess,),
                )
        except BaseException:  # never leave the write lock held: feedback would wait on it
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- feedback and reads -----------------------------------------------------------------------
    def feedback(self, decision_id: str, score: float, *, wait_s: float = 0.5) -> bool:
        """Attach a quality score in [0, 1] to a logged decision; False if the id is unknown,
        Conflict if the decision has its score already.

        A decision logged by another gateway process may still sit in that process's queue, so
        an unknown id is re-checked for up to `wait_s`.
        """
        if not 0.0 <= score <= 1.0 or score != score:
            raise InvalidInput(f"score must be in [0, 1], got {score}", field="score")
        self.flush()
        give_up = time.monotonic() + wait_s
        with self._connect() as db:
            while True:
                db.execute("BEGIN IMMEDIATE")
                n, scored = self._score(db, decision_id, score)
                db.execute("COMMIT")
                if scored:
                    raise Conflict(
                        f"decision_id {decision_id!r} has feedback already", field="decision_id"
                    )
                if n or time.monotonic() >= give_up:
                    return bool(n)
                time.sleep(0.05)

    @staticmethod
    def _score(db: sqlite3.Connection, decision_id: str, score: float) -> tuple[int, bool]:
        """(rows scored, whether the decision was scored before); inside a write transaction."""
        n = db.execute(
            "UPDATE outcomes SET quality = ? WHERE decision_id = ? AND quality IS NULL",
            (score, decision_id),
        ).rowcount
        if n:
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'version'")
            return n, False
        row = db.execute("SELECT 1 FROM outcomes WHERE decision_id = ?", (decision_id,))
        return 0, row.fetchone() is not None

    def get(self, decision_id: str) -> dict[str, object] | None:
        self.flush()
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            r = db.execute(
                "SELECT decision_id, ts, query, router, strategy, experts, expert, cost, "
                "latency_ms, active_params, quality, source FROM outcomes WHERE decision_id = ?",
                (decision_id,),
            ).fetchone()
        if r is None:
            return None
        out = dict(r)
        out["experts"] = json.loads(out["experts"])
        return out

    def version(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])

    def count(self, *, labelled: bool | None = None) -> int:
        self.flush()
        where = {None: "", True: " WHERE quality IS NOT NULL", False: " WHERE quality IS NULL"}
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM outcomes" + where[labelled]).fetchone()[0])

    def labelled(self, dim: int) -> Labelled:
        """Every labelled row with an embedding of size `dim` (others are skipped)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT embedding, expert, quality FROM outcomes "
                "WHERE quality IS NOT NULL AND embedding IS NOT NULL"
            ).fetchall()
        keep = [r for r in rows if len(r[0]) == 4 * dim]
        if not keep:
            return Labelled(np.zeros((0, dim), np.float32), [], np.zeros(0, np.float32))
        emb = np.frombuffer(b"".join(r[0] for r in keep), dtype=np.float32).reshape(-1, dim)
        return Labelled(
            embeddings=emb.copy(),
            experts=[r[1] for r in keep],
            quality=np.array([r[2] for r in keep], dtype=np.float32),
        )

    # -- import ---------------------------------------------------------------------------------
    def import_table(self, table: OutcomeTable, embeddings: np.ndarray, *, source: str) -> int:
        """Add every (query, expert) outcome of `table` as a labelled row; returns rows added.

        Re-importing the same table (same `source` and sample ids) replaces its rows.
        """
        if embeddings.shape[0] != len(table):
            raise InvalidInput(f"{embeddings.shape[0]} embeddings for {len(table)} queries")
        repeated = sorted(k for k, n in Counter(table.sample_ids).items() if n > 1)
        if repeated:
            raise InvalidInput(
                f"sample ids must be unique in an imported table: {repeated[:5]} repeat",
                field="sample_id",
            )
        now = time.time()
        rows = []
        for i in range(len(table)):
            blob = _blob(embeddings[i])
            for j, e in enumerate(table.experts):
                rows.append(
                    (
                        f"{source}:{table.sample_ids[i]}:{e}",
                        now,
                        table.prompts[i] if self.keep_queries else None,
                        blob,
                        "import",
                        "single",
                        json.dumps([e]),
                        e,
                        float(table.cost[i, j]),
                        float(table.latency_ms[i, j]),
                        None,
                        float(np.clip(table.quality[i, j], 0.0, 1.0)),
                        f"import:{source}",
                    )
                )
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM outcomes WHERE source = ?", (f"import:{source}",))
            db.executemany("INSERT INTO outcomes VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'version'")
            db.execute("COMMIT")
        return len(rows)


def _blob(v: np.ndarray | None) -> bytes | None:
    return None if v is None else np.ascontiguousarray(v, dtype=np.float32).tobytes()


def _wal(db: sqlite3.Connection) -> None:
    for attempt in range(50):  # SQLite does not apply the busy timeout to the WAL switch
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 49:
                raise
            time.sleep(0.05)
