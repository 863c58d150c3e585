"""Register the embedding pack: the packaged MiniLM base (task embed) and one LoRA per domain.

Idempotent: an expert already registered under a pack name is left as it is, so calling this on
every start-up is safe. The base must be the very weights the adapters were trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from concilium.embedpack.manifest import BASE_DISTRIBUTION, load_manifest, weights_sha256
from concilium.errors import ConfigError, Conflict, ExpertNotFound
from concilium.registry.registry import Registry
from concilium.registry.specs import ModelSpec
from concilium.registry.store import ExpertRecord

__all__ = ["install_embed_pack", "resolve_base"]

log = logging.getLogger(__name__)


def resolve_base(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's base spec with `path` set to this machine's copy of the packaged model."""
    from concilium.experts.embedder import default_model_dir

    base = dict(manifest["base"])
    source = base.pop("source", {})
    if source.get("distribution", BASE_DISTRIBUTION) != BASE_DISTRIBUTION:
        raise ConfigError(f"embedding pack base from {source['distribution']!r} is not supported")
    model_dir = default_model_dir()
    _check_weights(model_dir, source.get("sha256"))
    return {**base, "path": str(model_dir)}


def _check_weights(model_dir: Path, want: str | None) -> None:
    if want is not None and (got := weights_sha256(model_dir)) != want:
        raise ConfigError(
            f"the embedding pack's adapters were trained on MiniLM weights sha256 {want[:12]}…, "
            f"but {model_dir} holds {got[:12]}… (rebuild the pack on this installation)"
        )


def install_embed_pack(registry: Registry, pack_dir: Path) -> list[ExpertRecord]:
    """Register the pack's base and domain adapters; returns the newly added records."""
    pack_dir = Path(pack_dir)
    m = load_manifest(pack_dir)
    base = resolve_base(m)
    added = _ensure_base(registry, base)
    for spec in m["experts"]:
        try:
            added.append(registry.register(spec, base_dir=pack_dir))
        except Conflict:
            log.debug("embedding expert %s already registered", spec["name"])
    return added


def _ensure_base(registry: Registry, base: dict[str, Any]) -> list[ExpertRecord]:
    """Register the base unless an expert of that name exists; an existing one must match."""
    try:
        rec = registry.get(base["name"])
    except ExpertNotFound:
        return [registry.register(base)]
    spec = rec.spec
    if not isinstance(spec, ModelSpec) or spec.task != "embed":
        raise ConfigError(
            f"expert {base['name']!r} is already registered as a {spec.kind}/{spec.task} expert; "
            "the embedding pack needs it to be the packaged MiniLM (model, task embed)"
        )
    if Path(spec.path).resolve() != Path(base["path"]).resolve():
        _check_weights(Path(spec.path), weights_sha256(Path(base["path"])))
    return []
