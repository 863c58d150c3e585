"""Arrow prototypes and PHATGOOSE gates: per adapter, from that adapter alone, others untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from concilium.errors import InvalidInput
from concilium.experts.moe.lora_gates import arrow_prototypes, train_phatgoose_gate
from concilium.experts.moe.lora_patch import load_lora_weights
from concilium.routers.token import build_token_router


@pytest.fixture(scope="module")
def lm(pack_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pack_dir / "base", dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(pack_dir / "base")


def _examples(pack_dir: Path, skill: str, n: int = 16) -> list[tuple[str, str]]:
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    spec = next(e for e in manifest["experts"] if e["name"] == skill)
    return [(e["prompt"], e["completion"]) for e in spec["train_examples"][:n]]


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_arrow_prototype_is_the_top_right_singular_vector(pack_dir: Path):
    weights = load_lora_weights(pack_dir / "adapters" / "reverse")
    protos = arrow_prototypes(pack_dir / "adapters" / "reverse")
    assert set(protos) == set(weights)
    for module, p in protos.items():
        w = weights[module]
        _, s, vh = torch.linalg.svd(w.b @ w.a)  # [Dout, D], the slow way
        assert float(p.norm()) == pytest.approx(1.0, abs=1e-5)
        assert abs(float(p @ vh[0])) == pytest.approx(1.0, abs=1e-4)
        assert float((w.b @ w.a @ p).norm()) == pytest.approx(float(s[0]), rel=1e-4)


def test_phatgoose_gate_trains_only_the_gate(pack_dir: Path, lm: tuple[Any, Any]):
    model, tok = lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {type(m).__name__ for m in model.modules()}
    gates = train_phatgoose_gate(
        model, tok, pack_dir / "adapters" / "uppercase", _examples(pack_dir, "uppercase"), steps=4
    )
    assert set(gates) == set(load_lora_weights(pack_dir / "adapters" / "uppercase"))
    assert all(g.shape == (128,) and float(g.abs().sum()) > 0 for g in gates.values())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {type(m).__name__ for m in model.modules()} == kinds  # patch undone
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_registering_a_new_adapter_changes_no_other_adapters_gate(
    pack_dir: Path, lm: tuple[Any, Any]
):
    model, tok = lm
    old = ("reverse", "caesar")
    digests = {s: _digest(pack_dir / "adapters" / s) for s in old}

    def gate(skill: str) -> dict[str, torch.Tensor]:
        ex = _examples(pack_dir, skill)
        return train_phatgoose_gate(model, tok, pack_dir / "adapters" / skill, ex, steps=3)

    routers = {k: build_token_router({"kind": k}) for k in ("phatgoose", "arrow")}
    for s in old:
        routers["phatgoose"].add_adapter(s, gate(s))
        routers["arrow"].add_adapter(s, arrow_prototypes(pack_dir / "adapters" / s))
    snapshot = {k: {s: r.vectors(s) for s in old} for k, r in routers.items()}
    routers["phatgoose"].add_adapter("spell", gate("spell"))  # the new registration
    routers["arrow"].add_adapter("spell", arrow_prototypes(pack_dir / "adapters" / "spell"))
    for kind, router in routers.items():
        assert router.adapters == [*old, "spell"]
        for s in old:
            now = router.vectors(s)
            assert all(torch.equal(v, now[m]) for m, v in snapshot[kind][s].items())
    for s in old:  # recomputing an old adapter's gate gives the same tensors: nothing drifted
        assert all(torch.equal(v, snapshot["phatgoose"][s][m]) for m, v in gate(s).items())
        assert _digest(pack_dir / "adapters" / s) == digests[s]


def test_gate_training_needs_examples(pack_dir: Path, lm: tuple[Any, Any]):
    with pytest.raises(InvalidInput, match="example"):
        train_phatgoose_gate(*lm, pack_dir / "adapters" / "reverse", [])
