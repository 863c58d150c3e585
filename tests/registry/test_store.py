"""The SQLite store and the Registry façade, with a real SQLite file."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from concilium.errors import Conflict, ExpertNotFound, SpecError, UnsafeURL
from concilium.registry.registry import Registry, pilot_texts
from concilium.registry.specs import parse_spec
from concilium.registry.store import RegistryStore
from tests.conftest import HashEncoder, remote_spec


def test_add_get_list_remove_bump_version(tmp_path: Path) -> None:
    store = RegistryStore(tmp_path / "r.sqlite")
    assert store.version() == 0
    rec = store.add(parse_spec(remote_spec("a", ["x"])), {"k": 1})
    assert rec.version == 1 and store.version() == 1
    store.add(parse_spec(remote_spec("b", ["y"])), {})
    assert [r.name for r in store.list()] == ["a", "b"]
    assert store.get("a").artifacts == {"k": 1}
    assert store.remove("a") == 3
    with pytest.raises(ExpertNotFound, match="'a'"):
        store.get("a")
    with pytest.raises(ExpertNotFound):
        store.remove("a")


def test_duplicate_name_is_a_conflict_and_changes_nothing(tmp_path: Path) -> None:
    store = RegistryStore(tmp_path / "r.sqlite")
    store.add(parse_spec(remote_spec("a", ["x"])), {})
    with pytest.raises(Conflict, match="already registered"):
        store.add(parse_spec(remote_spec("a", ["z"])), {})
    assert store.version() == 1 and len(store.list()) == 1


def test_survives_restart(tmp_path: Path) -> None:
    RegistryStore(tmp_path / "r.sqlite").add(parse_spec(remote_spec("a", ["x"])), {"v": 2})
    again = RegistryStore(tmp_path / "r.sqlite")
    assert again.get("a").artifacts == {"v": 2} and again.version() == 1


def _register_many(args: tuple[str, str, int]) -> None:
    home, prefix, n = args
    reg = Registry(Path(home), HashEncoder())
    for i in range(n):
        reg.register(remote_spec(f"{prefix}-{i}", [f"query {prefix} {i}"]))


def test_two_processes_registering_at_once_both_land(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.map(_register_many, [(str(tmp_path), "p", 8), (str(tmp_path), "q", 8)])
    reg = Registry(tmp_path, HashEncoder())
    names = {r.name for r in reg.list()}
    assert names == {f"p-{i}" for i in range(8)} | {f"q-{i}" for i in range(8)}
    assert reg.version() == 16


def test_registration_builds_pilot_embeddings_and_index(tmp_path: Path) -> None:
    reg = Registry(tmp_path, HashEncoder())
    reg.register(remote_spec("a", ["reverse the word", "flip it"]))
    reg.register(remote_spec("b", []))  # no pilots: the description stands in
    emb = reg.embeddings(reg.get("a"))
    assert emb["pilots"].shape == (2, 64) and emb["description"].shape == (1, 64)
    assert reg.embeddings(reg.get("b"))["pilots"].shape == (1, 64)
    index = reg.build_index(reg.list())
    assert len(index) == 3 and index.experts == {"a", "b"}


def test_remove_leaves_no_orphaned_index_entries(tmp_path: Path) -> None:
    reg = Registry(tmp_path, HashEncoder())
    reg.register(remote_spec("a", ["one", "two"]))
    reg.register(remote_spec("b", ["three"]))
    reg.remove("a")
    index = reg.build_index(reg.list())
    assert index.experts == {"b"} and len(index) == 1
    assert reg.gc() == []  # a's embeddings are younger than the grace period
    removed = reg.gc(grace_s=0)
    assert reg.get("b").artifacts["embeddings"] not in removed
    assert len(removed) == 1  # a's embeddings


def test_gc_spares_a_fresh_unreferenced_artifact_and_reuse_refreshes_it(tmp_path: Path) -> None:

    reg = Registry(tmp_path, HashEncoder())
    ref = reg.artifacts.put_arrays({"g": np.ones(3, dtype=np.float32)})  # stored, no row yet
    assert reg.gc() == [] and reg.artifacts.path(ref).exists()
    old = reg.artifacts.path(ref)
    os.utime(old, (1.0, 1.0))  # long ago
    assert reg.artifacts.put_arrays({"g": np.ones(3, dtype=np.float32)}) == ref  # reused
    assert reg.gc() == []
    os.utime(old, (1.0, 1.0))
    assert reg.gc() == [ref]


def test_update_artifacts_checks_the_row_it_expects(tmp_path: Path) -> None:
    reg = Registry(tmp_path, HashEncoder())
    reg.register(remote_spec("a", ["one"]))
    emb = reg.get("a").artifacts["embeddings"]
    v = reg.version()
    assert reg.store.update_artifacts("a", {"x": 1}, expect={"embeddings": "other"}) is None
    assert reg.version() == v and "x" not in reg.get("a").artifacts
    assert reg.store.update_artifacts("a", {"x": 1}, expect={"embeddings": emb}) == v + 1
    assert reg.get("a").artifacts["x"] == 1 and reg.get("a").artifacts["embeddings"] == emb
    assert reg.store.update_artifacts("gone", {"x": 1}) is None


def test_bad_specs_are_rejected_and_registry_unchanged(tmp_path: Path) -> None:
    reg = Registry(tmp_path, HashEncoder())
    with pytest.raises(SpecError, match="kind"):
        reg.register({"name": "x", "kind": "plugin"})
    with pytest.raises(SpecError, match="name"):
        reg.register(remote_spec("Bad Name", []))
    with pytest.raises(UnsafeURL):
        reg.register(remote_spec("meta", [], url="http://169.254.169.254/latest"))
    with pytest.raises(SpecError, match="base 'nope'"):
        reg.register({"kind": "lora", "name": "ad", "base": "nope", "path": str(tmp_path)})
    # free-form fields are capped like the pilots: no spec stores megabytes of labels
    with pytest.raises(SpecError, match="categories"):
        reg.register(remote_spec("many", ["q"], categories=[f"c{i}" for i in range(65)]))
    with pytest.raises(SpecError, match="tags"):
        reg.register(remote_spec("long", ["q"], tags=["t" * 201]))
    huge = [{"prompt": "p" * 2001, "completion": "c"}]
    with pytest.raises(SpecError, match="at most 2000") as e:
        reg.register(remote_spec("huge", ["q"], train_examples=huge))
    assert e.value.field == "train_examples.0"
    assert reg.version() == 0 and reg.list() == []


def test_pilot_texts_are_the_examples_then_distinct_training_prompts() -> None:
    train = [{"prompt": f"p{i % 5}", "completion": "x"} for i in range(20)] + [
        {"prompt": "a", "completion": "y"}
    ]
    spec = parse_spec(
        {
            "kind": "remote",
            "name": "r",
            "url": "https://example.com/v1",
            "model_name": "m",
            "examples": ["a", "b", "a"],
            "train_examples": train,
        }
    )
    assert pilot_texts(spec) == ["a", "b", "p0", "p1", "p2", "p3", "p4"]
    capped = pilot_texts(spec, cap=4)
    assert capped[:2] == ["a", "b"] and len(capped) == 4 and len(set(capped)) == 4
    assert pilot_texts(spec, cap=1) == ["a", "b"]  # the examples are never cut
