"""Bad RouterBench files are InvalidInput naming the problem (never a
traceback), and importing a table never fails inside SQLite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from concilium.errors import InvalidInput
from concilium.outcomes import OutcomeStore, OutcomeTable
from tests.conftest import HashEncoder

HEADER = "sample_id,prompt,eval_name,a,a|total_cost,a|latency_ms\n"


def read(tmp_path: Path, data: bytes) -> OutcomeTable:
    p = tmp_path / "t.csv"
    p.write_bytes(data)
    return OutcomeTable.read(p)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ((HEADER + "1,caf\xe9,x,1,0.1,1\n").encode("latin-1"), "UTF-8"),
        ((HEADER + "1,hi,x,1,0.1,1\n").encode("utf-16"), "UTF-8"),
        ((HEADER + "1," + "x" * 200_000 + ",x,1,0.1,1\n").encode(), "field larger"),
        (HEADER.encode(), "no rows"),
        ((HEADER + "1,hi,x,nan,0.1,1\n").encode(), r"row 0, column 'a': nan"),
        ((HEADER + "1,hi,x,1,0.1,nan\n").encode(), r"column 'a\|latency_ms': nan"),
        ((HEADER + "1,hi,x,1,inf,1\n").encode(), r"column 'a\|total_cost': inf"),
        ((HEADER + "1,hi,x,5,0.1,1\n").encode(), r"quality 5.0 is outside \[0, 1\]"),
        ((HEADER + "1,hi,x,1,0.1,-5\n").encode(), "negative latency"),
        ((HEADER + "q1,hi,x,1,0.1,1\nq1,ho,x,0,0.1,1\n").encode(), "sample_id 'q1'.*rows 0 and 1"),
        (b"prompt,a,a|total_cost,b|total_cost\nhi,1,0.1,0.2\n", "'b|total_cost'.*'b'"),
        (b"prompt,a,a|total_cost,b,b|latency_ms\nhi,1,0.1,1,2\n", "'b|total_cost'"),
    ],
)
def test_bad_files_are_refused_with_a_reason(tmp_path: Path, data: bytes, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        read(tmp_path, data)


def test_a_utf8_bom_does_not_hide_the_first_column(tmp_path: Path) -> None:
    t = read(tmp_path, (HEADER + "q7,hi,x,1,0.1,1\n").encode("utf-8-sig"))
    assert t.sample_ids == ["q7"]


def test_an_unknown_confidence_and_extra_columns_still_load(tmp_path: Path) -> None:
    data = "prompt,oracle_model_to_route_to,a,a|total_cost,a|confidence\nhi,a,1,0.1,nan\n"
    t = read(tmp_path, data.encode())
    assert t.experts == ["a"] and np.isnan(t.confidence[0, 0])


def test_importing_duplicate_sample_ids_is_invalid_input(tmp_path: Path) -> None:
    t = OutcomeTable(
        sample_ids=["q1", "q1"],
        prompts=["reverse cat", "reverse dog"],
        families=["s", "s"],
        experts=["a"],
        quality=np.array([[1.0], [0.0]]),
        cost=np.array([[0.1], [0.1]]),
        latency_ms=np.zeros((2, 1)),
        confidence=np.full((2, 1), np.nan),
    )
    store = OutcomeStore(tmp_path / "outcomes.sqlite")
    with pytest.raises(InvalidInput, match="q1"):
        store.import_table(t, HashEncoder().encode(t.prompts), source="demo")
    assert store.count() == 0


def test_parquet_round_trips_like_csv(tmp_path: Path) -> None:
    from tests.test_evaluation import synthetic

    t = synthetic(4)
    a = OutcomeTable.read(t.write(tmp_path / "t.parquet"))
    b = OutcomeTable.read(t.write(tmp_path / "t.csv"))
    for x in (a, b):
        assert x.experts == t.experts and x.prompts == t.prompts and x.sample_ids == t.sample_ids
        assert np.array_equal(x.quality, t.quality) and np.array_equal(x.cost, t.cost)
        assert np.allclose(x.confidence, t.confidence) and x.answers == t.answers


def test_a_routerbench_parquet_with_nulls_and_numbers_loads(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "rb.parquet"
    columns = {
        "sample_id": ["q1", "q2"],
        "prompt": ["reverse cat", "add 2 and 3"],
        "eval_name": ["strings", None],
        "a": [1.0, 0.0],
        "a|total_cost": [0.001, 0.002],
        "a|confidence": [None, -0.5],
    }
    pq.write_table(pa.table(columns), p)
    t = OutcomeTable.read(p)
    assert t.experts == ["a"] and t.quality[:, 0].tolist() == [1.0, 0.0]
    assert np.isnan(t.confidence[0, 0]) and t.confidence[1, 0] == -0.5


def test_a_damaged_parquet_file_is_invalid_input(tmp_path: Path) -> None:
    p = tmp_path / "t.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InvalidInput, match="not a readable Parquet file"):
        OutcomeTable.read(p)


def test_parquet_without_pyarrow_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    p = tmp_path / "t.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(InvalidInput, match=r"concilium\[parquet\]"):
        OutcomeTable.read(p)


def test_parquet_keeps_unknown_confidences_unknown(tmp_path: Path) -> None:
    from tests.test_evaluation import synthetic

    t = synthetic(2)
    t.confidence[0, 0] = np.nan  # a float column with a hole: a null in Parquet
    t.confidence[:, 1] = np.nan  # a column with nothing known
    back = OutcomeTable.read(t.write(tmp_path / "t.parquet"))
    assert np.isnan(back.confidence[0, 0]) and np.isnan(back.confidence[:, 1]).all()
    known = ~np.isnan(t.confidence)
    assert np.allclose(back.confidence[known], t.confidence[known])


def test_a_parquet_sample_id_of_zero_is_an_id(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "ids.parquet"
    columns = {
        "sample_id": [1, 0],
        "prompt": ["hi", "ho"],
        "a": [1.0, 0.0],
        "a|total_cost": [0.1, 0.1],
    }
    pq.write_table(pa.table(columns), p)
    assert OutcomeTable.read(p).sample_ids == ["1", "0"]
