"""Registry.register with real model / adapter directories: artifacts, rejection atomicity."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from concilium.errors import AdapterRejected, Conflict
from concilium.registry.registry import Registry
from tests.registry.conftest import TinyMoe, tiny_registry


def _registry(tmp_path: Path, tiny_moe: TinyMoe) -> Registry:
    return tiny_registry(tmp_path / "home", tiny_moe)


def test_lora_is_copied_content_addressed_with_profile(tmp_path: Path, tiny_moe: TinyMoe) -> None:
    reg = _registry(tmp_path, tiny_moe)
    rec = reg.register(
        {
            "kind": "lora",
            "name": "ad",
            "base": "tiny",
            "path": str(tiny_moe.lora_dir),
            "examples": ["a", "b"],
        }
    )
    stored = reg.runtime_path(rec)
    assert stored is not None and stored.parent == reg.artifacts.root
    assert sorted(p.name for p in stored.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert rec.artifacts["lora"]["rank"] == 4
    assert rec.artifacts["lora"]["num_params"] == tiny_moe.lora_params
    assert rec.artifacts["profile"]["latency_ms_per_token"] == 2.0  # inherited from the base
    assert reg.get("tiny").artifacts["profile"]["measured"] is True
    # the same content registered under a second name is stored once
    rec2 = reg.register(
        {"kind": "lora", "name": "ad2", "base": "tiny", "path": str(tiny_moe.lora_dir)}
    )
    assert rec2.artifacts["adapter"] == rec.artifacts["adapter"]
    with pytest.raises(Conflict):
        reg.remove("tiny")  # adapters still use it


def test_lora_registration_builds_arrow_prototypes_and_leaves_others_alone(
    tmp_path: Path, tiny_moe: TinyMoe
) -> None:
    reg = _registry(tmp_path, tiny_moe)
    first = reg.register(
        {"kind": "lora", "name": "ad", "base": "tiny", "path": str(tiny_moe.lora_dir)}
    )
    protos = reg.token_routing(first)
    assert protos and all(abs(float(np.linalg.norm(p)) - 1) < 1e-5 for p in protos.values())
    assert reg.token_routing(reg.get("tiny")) == {}
    other = tmp_path / "other"
    shutil.copytree(tiny_moe.lora_dir, other)
    from safetensors.numpy import load_file, save_file

    # a different adapter on the same base: its B weights rescaled element-wise, so its
    # content (artifact) and its prototypes (directions of B @ A) both differ from the first's
    weights = other / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    rng = np.random.default_rng(0)
    bs = [k for k in tensors if "lora_B" in k]
    assert bs
    for k in bs:
        tensors[k] = (tensors[k] * rng.uniform(0.2, 3.0, tensors[k].shape)).astype(tensors[k].dtype)
    save_file(tensors, str(weights))
    second = reg.register({"kind": "lora", "name": "ad2", "base": "tiny", "path": str(other)})
    assert second.artifacts["adapter"] != first.artifacts["adapter"]
    assert second.artifacts["arrow"] != first.artifacts["arrow"]
    # the first adapter's record is untouched: same artifacts, same row version, and no write
    # at all after the second adapter's own (a rewrite of it would bump the registry version)
    assert reg.version() == second.version == first.version + 1
    assert reg.get("ad") == first
    assert reg.get("ad").artifacts == first.artifacts and reg.get("ad").version == first.version
    after = reg.token_routing(reg.get("ad"))
    assert after.keys() == protos.keys()
    assert all(np.array_equal(after[k], protos[k]) for k in protos)
    theirs = reg.token_routing(second)
    assert theirs.keys() == protos.keys()
    assert any(not np.allclose(np.abs(theirs[k]), np.abs(protos[k]), atol=1e-4) for k in protos)


def test_rejected_adapter_leaves_registry_and_store_unchanged(
    tmp_path: Path, tiny_moe: TinyMoe
) -> None:
    reg = _registry(tmp_path, tiny_moe)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_moe.lora_dir, bad)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(bad / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = np.full_like(tensors[first], np.nan)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    version = reg.version()
    before = sorted(p.name for p in reg.artifacts.root.iterdir())
    with pytest.raises(AdapterRejected, match=r"non-finite|NaN"):
        reg.register({"kind": "lora", "name": "nan", "base": "tiny", "path": str(bad)})
    assert reg.version() == version and [r.name for r in reg.list()] == ["tiny"]
    assert sorted(p.name for p in reg.artifacts.root.iterdir()) == before
