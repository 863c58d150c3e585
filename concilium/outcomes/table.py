"""An outcome table: every expert's quality, cost, latency (and answer) on every query.

The in-memory layout is dense, queries × experts, which is what the evaluation harness simulates
routers over and what the predictive router learns from. On disk it is RouterBench's wide layout,
one row per query::

    sample_id, prompt, eval_name, <expert>, <expert>|total_cost, <expert>|latency_ms,
    <expert>|confidence, <expert>|model_response, ...

`<expert>` holds the quality in [0, 1]; the other per-expert columns are optional (latency
defaults to 0, confidence to unknown). CSV is read with the standard library; Parquet with pyarrow
(the ``parquet`` extra: ``pip install 'concilium[parquet]'``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from concilium.errors import InvalidInput

COST, LATENCY, CONFIDENCE, RESPONSE = "|total_cost", "|latency_ms", "|confidence", "|model_response"
_FIXED = ("sample_id", "prompt", "eval_name")


@dataclass(slots=True)
class OutcomeTable:
    """Dense outcomes of `experts` on `prompts`. Arrays are [Q, E]; NaN confidence = unknown."""

    sample_ids: list[str]
    prompts: list[str]
    families: list[str]  # the task family of each query (RouterBench's eval_name)
    experts: list[str]
    quality: np.ndarray
    cost: np.ndarray
    latency_ms: np.ndarray
    confidence: np.ndarray
    answers: list[list[str]] | None = None  # [Q][E], when the responses were kept
    embeddings: np.ndarray | None = field(default=None, repr=False)  # [Q, dim], filled lazily

    def __post_init__(self) -> None:
        q, e = len(self.prompts), len(self.experts)
        if len(self.sample_ids) != q or len(self.families) != q:
            raise InvalidInput("sample_ids, prompts and families must have the same length")
        if len(set(self.experts)) != e:
            raise InvalidInput("expert names in an outcome table must be unique")
        for name in ("quality", "cost", "latency_ms", "confidence"):
            arr = getattr(self, name)
            if arr.shape != (q, e):
                raise InvalidInput(f"{name} has shape {arr.shape}, expected {(q, e)}")
        if np.isnan(self.quality).any() or np.isnan(self.cost).any():
            raise InvalidInput("quality and cost must be known for every query and expert")

    def __len__(self) -> int:
        return len(self.prompts)

    def column(self, expert: str) -> int:
        try:
            return self.experts.index(expert)
        except ValueError:
            raise InvalidInput(f"expert {expert!r} is not in the outcome table") from None

    def subset(self, rows: Sequence[int] | np.ndarray) -> OutcomeTable:
        """The table restricted to `rows` (in that order)."""
        idx = np.asarray(rows, dtype=np.int64)
        return OutcomeTable(
            sample_ids=[self.sample_ids[i] for i in idx],
            prompts=[self.prompts[i] for i in idx],
            families=[self.families[i] for i in idx],
            experts=list(self.experts),
            quality=self.quality[idx],
            cost=self.cost[idx],
            latency_ms=self.latency_ms[idx],
            confidence=self.confidence[idx],
            answers=None if self.answers is None else [self.answers[i] for i in idx],
            embeddings=None if self.embeddings is None else self.embeddings[idx],
        )

    def select_experts(self, names: Sequence[str]) -> OutcomeTable:
        cols = [self.column(n) for n in names]
        return OutcomeTable(
            sample_ids=list(self.sample_ids),
            prompts=list(self.prompts),
            families=list(self.families),
            experts=list(names),
            quality=self.quality[:, cols],
            cost=self.cost[:, cols],
            latency_ms=self.latency_ms[:, cols],
            confidence=self.confidence[:, cols],
            answers=None if self.answers is None else [[r[c] for c in cols] for r in self.answers],
            embeddings=self.embeddings,
        )

    # -- RouterBench layout ----------------------------------------------------------------------
    def rows(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for i in range(len(self)):
            row: dict[str, object] = {
                "sample_id": self.sample_ids[i],
                "prompt": self.prompts[i],
                "eval_name": self.families[i],
            }
            for j, e in enumerate(self.experts):
                row[e] = float(self.quality[i, j])
                row[e + COST] = float(self.cost[i, j])
                row[e + LATENCY] = float(self.latency_ms[i, j])
                conf = float(self.confidence[i, j])
                row[e + CONFIDENCE] = "" if math.isnan(conf) else conf
                if self.answers is not None:
                    row[e + RESPONSE] = self.answers[i][j]
            out.append(row)
        return out

    def write(self, path: Path) -> Path:
        """Write CSV (or Parquet for a .parquet suffix) in the RouterBench layout."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        if path.suffix == ".parquet":
            pa, pq = _pyarrow(path)
            columns = list(rows[0]) if rows else list(_FIXED)
            # an unknown value is '' in a CSV cell, a null in Parquet (a column of floats and
            # '' is no Arrow column)
            cells = {c: [None if r.get(c) == "" else r.get(c) for r in rows] for c in columns}
            pq.write_table(pa.table(cells), path)
            return path
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(_FIXED))
            w.writeheader()
            w.writerows(rows)
        return path

    @classmethod
    def read(cls, path: Path) -> OutcomeTable:
        """Read a RouterBench-layout CSV or Parquet file; InvalidInput names what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"outcome table {path} does not exist", field="path")
        if path.suffix == ".parquet":
            header, records = _read_parquet(path)
        else:
            header, records = _read_csv(path)
        return cls.from_records(header, records, source=str(path))

    @classmethod
    def from_records(
        cls, header: Sequence[str], records: Sequence[dict[str, object]], *, source: str = "table"
    ) -> OutcomeTable:
        if not header:
            raise InvalidInput(f"{source} is empty (no header row)")
        if "prompt" not in header:
            raise InvalidInput(f"{source}: RouterBench layout needs a 'prompt' column")
        experts = [
            c for c in header if "|" not in c and c not in _FIXED and c + COST in set(header)
        ]
        if not experts:
            raise InvalidInput(
                f"{source}: no expert columns (an expert needs '<name>' and '<name>{COST}')"
            )
        _check_expert_columns(header, experts, source)
        if not records:
            raise InvalidInput(f"{source}: no rows (an outcome table needs at least one query)")
        q, e = len(records), len(experts)
        arrays = {k: np.zeros((q, e)) for k in ("quality", "cost", "latency_ms")}
        conf = np.full((q, e), np.nan)
        answers: list[list[str]] | None = (
            [] if all(x + RESPONSE in header for x in experts) else None
        )
        for i, r in enumerate(records):
            for j, x in enumerate(experts):
                arrays["quality"][i, j] = _number(r.get(x), source, i, x)
                arrays["cost"][i, j] = _number(r.get(x + COST), source, i, x + COST)
                lat = r.get(x + LATENCY)
                arrays["latency_ms"][i, j] = _number(lat, source, i, x + LATENCY, default=0.0)
                c = r.get(x + CONFIDENCE)
                conf[i, j] = _number(c, source, i, x + CONFIDENCE, default=math.nan)
            if answers is not None:
                answers.append([str(r.get(x + RESPONSE, "")) for x in experts])
        return cls(
            sample_ids=_unique_ids([_sample_id(r, i) for i, r in enumerate(records)], source),
            prompts=[str(r["prompt"]) for r in records],
            families=[str(r.get("eval_name") or "") for r in records],
            experts=experts,
            quality=arrays["quality"],
            cost=arrays["cost"],
            latency_ms=arrays["latency_ms"],
            confidence=conf,
            answers=answers,
        )


def _number(v: object, source: str, row: int, col: str, *, default: float | None = None) -> float:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        if default is None:
            raise InvalidInput(f"{source}: row {row} has no value in column {col!r}")
        return default
    try:
        x = float(v)  # type: ignore[arg-type]  # float() of an arbitrary cell
    except (TypeError, ValueError):
        raise InvalidInput(f"{source}: row {row}, column {col!r}: {v!r} is not a number") from None
    if col.endswith(CONFIDENCE):
        return x  # NaN: unknown
    where = f"{source}: row {row}, column {col!r}"
    if not math.isfinite(x):
        raise InvalidInput(f"{where}: {x} is not a finite number")
    if col.endswith(COST) and x < 0:
        raise InvalidInput(f"{where}: negative cost {x}")
    if col.endswith(LATENCY) and x < 0:
        raise InvalidInput(f"{where}: negative latency {x}")
    if "|" not in col and not 0.0 <= x <= 1.0:
        raise InvalidInput(f"{where}: quality {x} is outside [0, 1]")
    return x


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, object]]]:
    """(header, rows) of a UTF-8 CSV file (a byte-order mark is dropped)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except UnicodeDecodeError as e:
        raise InvalidInput(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", field="path"
        ) from None
    except csv.Error as e:
        raise InvalidInput(f"{path}: not a readable CSV file: {e}", field="path") from None


def _check_expert_columns(header: Sequence[str], experts: Sequence[str], source: str) -> None:
    """Every `<name>|<suffix>` column belongs to an expert that has its quality and cost."""
    for c in header:
        name, _, suffix = c.partition("|")
        if "|" + suffix in (COST, LATENCY, CONFIDENCE, RESPONSE) and name not in experts:
            missing = name if name not in header else name + COST
            raise InvalidInput(
                f"{source}: column {c!r} names expert {name!r}, which needs the columns "
                f"{name!r} and {name + COST!r} ({missing!r} is missing)"
            )


def _sample_id(record: dict[str, object], row: int) -> str:
    """The row's sample_id, its row number when it has none (a Parquet id may be the number 0)."""
    sid = record.get("sample_id")
    return str(row if sid is None or sid == "" else sid)


def _unique_ids(ids: list[str], source: str) -> list[str]:
    first: dict[str, int] = {}
    for i, sid in enumerate(ids):
        if sid in first:
            raise InvalidInput(f"{source}: sample_id {sid!r} is in rows {first[sid]} and {i}")
        first[sid] = i
    return ids


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, object]]]:
    """(header, rows) of a Parquet file; nulls read as '' (as an empty CSV cell)."""
    _, pq = _pyarrow(path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise InvalidInput(f"{path}: not a readable Parquet file: {e}", field="path") from None
    records = [{k: ("" if v is None else v) for k, v in r.items()} for r in table.to_pylist()]
    return [str(c) for c in table.column_names], records


def _pyarrow(path: Path) -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InvalidInput(
            f"{path}: reading/writing Parquet needs pyarrow (pip install 'concilium[parquet]'); "
            "CSV works without it"
        ) from None
    return pyarrow, pyarrow.parquet
