"""The committed embedding pack: valid adapters, idempotent install, and `/v1/embeddings` with
`model: "auto"` routed to the domain's expert through the in-process app, with real MiniLM."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.embedpack import install_embed_pack
from concilium.embedpack.manifest import BASE_NAME, load_heldout, load_manifest
from concilium.errors import ConfigError
from concilium.experts.embedder import SentenceEncoder, default_model_dir
from concilium.orchestrator.http import create_app
from concilium.orchestrator.service import EMBEDDER_EXPERT, build_service, seed_registry
from concilium.registry.registry import Registry
from concilium.registry.specs import LoraSpec, parse_spec
from concilium.registry.validate import validate_adapter_dir, validate_model_dir
from tests.conftest import ROOT, HashEncoder

PACK = ROOT / "embed_pack"
DOMAINS = ("graphs", "ml", "numerics", "stdlib", "web")


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


def test_manifest_is_portable_and_adapters_validate() -> None:
    m = load_manifest(PACK)
    assert m["base"]["name"] == BASE_NAME == EMBEDDER_EXPERT and "path" not in m["base"]
    assert "/" not in json.dumps(m["base"]["source"]).replace("\\/", "")  # no machine path
    base = validate_model_dir(default_model_dir())
    names = set()
    for raw in m["experts"]:
        spec = parse_spec(raw)
        assert isinstance(spec, LoraSpec) and spec.task == "embed" and spec.base == BASE_NAME
        assert not Path(spec.path).is_absolute() and len(spec.examples) >= 8
        validate_adapter_dir(PACK / spec.path, base)
        names.add(spec.name)
    assert names == {f"{BASE_NAME}-{d}" for d in DOMAINS}


def test_pilots_are_never_test_queries() -> None:
    pilots = {p for e in load_manifest(PACK)["experts"] for p in e["examples"]}
    held = load_heldout(PACK)
    assert {h.domain for h in held} == set(DOMAINS)
    assert not pilots & {h.query for h in held}
    assert len({h.id for h in held}) == len(held)


def test_install_is_idempotent_and_reuses_a_seeded_base(tmp_path: Path) -> None:
    cfg = load_config(None, home=tmp_path, seed_embedder=True)
    reg = Registry(tmp_path, HashEncoder())
    seed_registry(reg, cfg)  # registers the packaged MiniLM as "minilm" first
    added = install_embed_pack(reg, PACK)
    assert {r.name for r in added} == {f"{BASE_NAME}-{d}" for d in DOMAINS}
    version = reg.version()
    assert install_embed_pack(reg, PACK) == [] and reg.version() == version
    assert len(reg.list()) == 1 + len(DOMAINS)


def test_install_refuses_other_base_weights(tmp_path: Path) -> None:
    pack = tmp_path / "pack"
    shutil.copytree(PACK, pack)
    m = json.loads((pack / "manifest.json").read_text())
    m["base"]["source"]["sha256"] = "0" * 64
    (pack / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="sha256"):
        install_embed_pack(Registry(tmp_path / "home", HashEncoder()), pack)


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, encoder: SentenceEncoder
) -> Iterator[TestClient]:
    home = tmp_path_factory.mktemp("home")
    cfg = load_config(None, home=home, embed_pack=PACK)  # seeded as `make serve` does
    svc = build_service(cfg, encoder=encoder)
    with TestClient(create_app(svc)) as c:
        c.app_state = svc  # type: ignore[attr-defined]
        yield c


def test_the_service_seeds_the_embedding_pack_once(client: TestClient) -> None:
    svc = client.app_state  # type: ignore[attr-defined]
    names = {r.name for r in svc.registry.list()}
    assert names == {EMBEDDER_EXPERT} | {f"{BASE_NAME}-{d}" for d in DOMAINS}
    version = svc.registry.version()
    assert seed_registry(svc.registry, svc.config) == []  # a restart adds nothing
    assert svc.registry.version() == version
    listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert {f"{BASE_NAME}-{d}" for d in DOMAINS} <= listed


@pytest.mark.parametrize(
    ("text", "expert"),
    [
        ("Return the shortest path between two nodes of a directed graph.", "graphs"),
        ("Compute the eigenvalues of a symmetric matrix.", "numerics"),
        ("Send an HTTP GET request and return the response with its headers.", "web"),
    ],
)
def test_auto_embeddings_use_the_routed_expert(client: TestClient, text: str, expert: str) -> None:
    r = client.post("/v1/embeddings", json={"model": "auto", "input": [text, "a second text"]})
    assert r.status_code == 200, r.text
    body = r.json()
    name = f"{BASE_NAME}-{expert}"
    assert body["model"] == name and body["routing"]["expert"] == name
    assert r.headers["x-concilium-expert"] == name
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    svc = client.app_state  # type: ignore[attr-defined]
    adapter = svc.registry.runtime_path(svc.registry.get(name))
    want = svc.backend.encoder(str(default_model_dir()), str(adapter)).encode(
        [text, "a second text"]
    )
    assert got.shape == (2, 384) and np.allclose(got, want, atol=1e-5)
    base = svc.backend.encoder(str(default_model_dir()), None).encode([text])
    assert not np.allclose(got[0], base[0], atol=1e-3)  # the adapter changed the vector
