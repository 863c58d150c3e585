"""SQLite registry store: one row per expert, a monotonic registry version, safe across processes.

Writers take SQLite's write lock with ``BEGIN IMMEDIATE`` (WAL mode, busy timeout), so two processes
registering at once both land, one after the other; every change bumps ``registry_version`` in the
same transaction, which is how readers (gateways, routers) notice that they must refresh.
"""

from __future__ import annotations

import builtins
import json
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concilium.errors import Conflict, ExpertNotFound, RegistryError
from concilium.registry.specs import (
    LoraSpec,
    ModelSpec,
    RemoteSpec,
    parse_spec,
    spec_to_dict,
    unicode_problem,
)

AnySpec = ModelSpec | LoraSpec | RemoteSpec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experts (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    artifacts TEXT NOT NULL,
    created_at REAL NOT NULL,
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('registry_version', '0');
"""


@dataclass(frozen=True, slots=True)
class ExpertRecord:
    """One registered expert: its spec and the routing artifacts built for it."""

    spec: AnySpec
    artifacts: dict[str, Any]  # content-addressed refs + cost profile, see artifacts.py
    created_at: float
    version: int  # registry version at which it was added

    @property
    def name(self) -> str:
        return self.spec.name


def store_at(home: Path) -> RegistryStore:
    """The registry's SQLite store inside data dir `home`."""
    return RegistryStore(Path(home) / "registry.sqlite")


class RegistryStore:
    """The expert table in a SQLite file. Cheap to construct; one connection per call."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    def _init_schema(self, wait_s: float = 30.0) -> None:
        """WAL mode + tables. Switching to WAL does not wait on SQLite's busy handler when
        another process is creating the same file at that moment, so that step is retried."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                with self._connect() as db:
                    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                    db.executescript(_SCHEMA)
                return
            except RegistryError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02 + random.random() * 0.05)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as e:
            raise RegistryError(f"cannot open registry {self.path}: {e}") from e
        try:
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        except sqlite3.Error as e:
            raise RegistryError(f"registry {self.path}: {e}") from e
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _bump(db: sqlite3.Connection) -> int:
        row = db.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'registry_version' "
            "RETURNING value"
        ).fetchone()
        return int(row[0])

    def version(self) -> int:
        """The registry version: bumped by every add and remove."""
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'registry_version'").fetchone()
        return int(row[0])

    def add(self, spec: AnySpec, artifacts: dict[str, Any]) -> ExpertRecord:
        """Insert a new expert; Conflict if the name is taken. Returns the stored record."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM experts WHERE name = ?", (spec.name,)).fetchone():
                raise Conflict(f"expert {spec.name!r} is already registered", field="name")
            version = self._bump(db)
            now = time.time()
            db.execute(
                "INSERT INTO experts (name, kind, spec, artifacts, created_at, version) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    spec.name,
                    spec.kind,
                    json.dumps(spec_to_dict(spec)),
                    json.dumps(artifacts),
                    now,
                    version,
                ),
            )
        return ExpertRecord(spec=spec, artifacts=artifacts, created_at=now, version=version)

    def remove(self, name: str) -> int:
        """Delete an expert (refused while adapters use it as base). Returns the new version."""
        if not _storable(name):
            raise ExpertNotFound(f"no expert named {name!r}")
        with self._write() as db:
            if not db.execute("SELECT 1 FROM experts WHERE name = ?", (name,)).fetchone():
                raise ExpertNotFound(f"no expert named {name!r}")
            dependants = [
                r[0]
                for r in db.execute(
                    "SELECT name FROM experts "
                    "WHERE kind = 'lora' AND json_extract(spec, '$.base') = ?",
                    (name,),
                )
            ]
            if dependants:
                raise Conflict(
                    f"expert {name!r} is the base of {sorted(dependants)}; remove those first"
                )
            db.execute("DELETE FROM experts WHERE name = ?", (name,))
            return self._bump(db)

    def update_artifacts(
        self,
        name: str,
        changes: dict[str, Any],
        expect: dict[str, Any] | None = None,
        expect_version: int | None = None,
    ) -> int | None:
        """Merge `changes` into one row's artifacts and bump the version, in one transaction.

        Returns the new version, or None (nothing written) when the row is gone, any `expect`
        entry no longer matches, or the row was not added at `expect_version` (the expert was
        removed or re-registered meanwhile, with the same artifacts or not).
        """
        if not _storable(name):
            return None
        with self._write() as db:
            row = db.execute(
                "SELECT artifacts, version FROM experts WHERE name = ?", (name,)
            ).fetchone()
            if row is None or (expect_version is not None and row[1] != expect_version):
                return None
            current = json.loads(row[0])
            if any(current.get(k) != v for k, v in (expect or {}).items()):
                return None
            current.update(changes)
            db.execute(
                "UPDATE experts SET artifacts = ? WHERE name = ?", (json.dumps(current), name)
            )
            return self._bump(db)

    def get(self, name: str) -> ExpertRecord:
        if not _storable(name):
            raise ExpertNotFound(f"no expert named {name!r}")
        with self._connect() as db:
            row = db.execute(
                "SELECT spec, artifacts, created_at, version FROM experts WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise ExpertNotFound(f"no expert named {name!r}")
        return _record(row)

    def list(self) -> builtins.list[ExpertRecord]:
        """All experts, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT spec, artifacts, created_at, version FROM experts ORDER BY version"
            ).fetchall()
        return [_record(r) for r in rows]

    def snapshot(self) -> tuple[int, builtins.list[ExpertRecord]]:
        """Version and records read in one transaction (consistent with each other)."""
        with self._connect() as db:
            db.execute("BEGIN")
            v = db.execute("SELECT value FROM meta WHERE key = 'registry_version'").fetchone()
            rows = db.execute(
                "SELECT spec, artifacts, created_at, version FROM experts ORDER BY version"
            ).fetchall()
            db.execute("COMMIT")
        return int(v[0]), [_record(r) for r in rows]


def _storable(name: str) -> bool:
    """Whether sqlite3 can bind `name`: one with a lone surrogate raises UnicodeEncodeError, and
    no stored name has one (names are validated), so it names no expert."""
    return unicode_problem(name) is None


def _record(row: tuple[str, str, float, int]) -> ExpertRecord:
    spec_json, art_json, created_at, version = row
    return ExpertRecord(
        spec=parse_spec(json.loads(spec_json), stored=True),
        artifacts=json.loads(art_json),
        created_at=created_at,
        version=version,
    )
