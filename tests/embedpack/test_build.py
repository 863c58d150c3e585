"""The build's pieces at tiny size: docstring corpus, splits, pilots, and a trained adapter that
passes the registry's validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from concilium.embedpack.corpus import Domain, Item, extract
from concilium.embedpack.pilots import medoid_pilots
from concilium.embedpack.splits import split_domain
from concilium.embedpack.train import TrainConfig, save_adapter, train_adapter
from concilium.experts.embedder import default_model_dir
from concilium.registry.validate import validate_adapter_dir, validate_model_dir

TINY = Domain("tiny", "json and text wrapping", ("text",), ("json", "textwrap", "difflib"), ())


@pytest.fixture(scope="module")
def items() -> list[Item]:
    return extract(TINY)


def test_corpus_items_are_unique_and_deterministic(items: list[Item]) -> None:
    assert len(items) >= 8 and items == extract(TINY)
    assert len({it.query for it in items}) == len(items)
    for it in items:
        assert it.document.startswith(it.path) and it.query not in it.document
        assert " at 0x" not in it.document
    assert any(it.path == "json.dumps" for it in items)


def test_split_holds_out_a_fixed_disjoint_set(items: list[Item]) -> None:
    a = split_domain("tiny", items, seed=0, n_eval=4, max_train=100)
    assert a == split_domain("tiny", items, seed=0, n_eval=4, max_train=100)
    assert len(a.heldout) == 4 and not set(a.heldout) & set(a.train)
    assert set(a.heldout) | set(a.train) == set(items)
    assert a.heldout != split_domain("tiny", items, seed=1, n_eval=4, max_train=100).heldout
    with pytest.raises(ValueError, match="needs more"):
        split_domain("tiny", items[:3], seed=0, n_eval=4, max_train=10)


def test_medoid_pilots_cover_the_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8, dtype=np.float32)
    vecs = np.concatenate([c + 0.05 * rng.standard_normal((10, 8)) for c in centres])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    texts = [f"t{i}" for i in range(30)]
    pilots = medoid_pilots(texts, vecs.astype(np.float32), 3, seed=0)
    assert sorted(int(p[1:]) // 10 for p in pilots) == [0, 1, 2]
    assert medoid_pilots(texts[:2], vecs[:2], 3, seed=0) == texts[:2]


def test_trained_adapter_passes_registry_validation(items: list[Item], tmp_path: Path) -> None:
    pairs = [(it.query, it.document) for it in items[:6]]
    cfg = TrainConfig(steps=1, batch_size=4, doc_len=32, query_len=16)
    model, fit = train_adapter(default_model_dir(), pairs, cfg, seed=0)
    save_adapter(model, tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    info = validate_adapter_dir(tmp_path / "a", validate_model_dir(default_model_dir()))
    assert info.rank == 8 and info.num_params == fit.lora_params == 6 * 3 * 2 * 8 * 384
    assert str(default_model_dir()) not in (tmp_path / "a" / "adapter_config.json").read_text()
