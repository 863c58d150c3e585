"""MoE-LoRA patched into the demo pack's base model, against PEFT on the same adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from concilium.errors import InvalidInput
from concilium.experts.moe.lora_patch import load_lora_weights, patch_lora_mixture
from concilium.routers.token import TokenPrior, build_token_router, prior_from_scores
from concilium.routers.token.oracle import OracleRouter

SKILLS = ("reverse", "uppercase", "caesar")


@pytest.fixture(scope="module")
def base(pack_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pack_dir / "base", dtype=torch.float32)
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 40, 41, 42, 43, 44, 45, 3], [1, 50, 52, 54, 56, 58, 60, 3]])


def _peft_logits(pack_dir: Path, base: Any, skill: str) -> torch.Tensor:
    from peft import PeftModel

    peft = PeftModel.from_pretrained(base, str(pack_dir / "adapters" / skill)).eval()
    try:
        with torch.no_grad():
            return peft(input_ids=_ids()).logits
    finally:
        peft.unload()  # leaves `base` as it was


def _patched(pack_dir: Path, base: Any, kind: str, **cfg: object) -> Any:
    router = build_token_router({"kind": kind, **cfg})
    for s in SKILLS:
        router.add_adapter(s)
    dirs = {s: pack_dir / "adapters" / s for s in SKILLS}
    return patch_lora_mixture(base, dirs, router), router


def test_load_lora_weights_reads_every_target_module(pack_dir: Path):
    w = load_lora_weights(pack_dir / "adapters" / "reverse")
    assert len(w) == 16 and all(m.startswith("model.layers.") for m in w)
    q = w["model.layers.0.self_attn.q_proj"]
    assert q.a.shape[0] == 8 and q.b.shape[1] == 8 and q.scaling == pytest.approx(2.0)


@pytest.mark.parametrize("skill", ["uppercase", "caesar"])
def test_oracle_mixture_equals_peft_single_adapter(pack_dir: Path, base: Any, skill: str):
    want = _peft_logits(pack_dir, base, skill)
    with torch.no_grad():
        plain = base(input_ids=_ids()).logits
    handle, router = _patched(pack_dir, base, "oracle")
    assert isinstance(router, OracleRouter)
    router.set_target(skill)
    try:
        with torch.no_grad():
            got = base(input_ids=_ids()).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert handle.summary()["adapter_shares"][skill] == pytest.approx(1.0)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=_ids()).logits, plain)  # patch undone


def test_prior_of_one_candidate_makes_any_router_that_adapter(pack_dir: Path, base: Any):
    want = _peft_logits(pack_dir, base, "reverse")
    handle, router = _patched(pack_dir, base, "uniform")
    handle.prior = prior_from_scores(router.adapters, {"reverse": 0.9, "caesar": 0.1}, top_m=1)
    try:
        with torch.no_grad():
            got = base(input_ids=_ids()).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_uniform_mixture_differs_from_every_single_adapter(pack_dir: Path, base: Any):
    handle, _ = _patched(pack_dir, base, "uniform")
    try:
        with torch.no_grad():
            got = base(input_ids=_ids()).logits
    finally:
        handle.remove()
    summary = handle.summary()
    assert summary["mean_entropy"] == pytest.approx(float(torch.log(torch.tensor(3.0))), rel=1e-4)
    for s in SKILLS:
        assert not torch.allclose(got, _peft_logits(pack_dir, base, s), atol=1e-3)


def test_patch_needs_weights_for_every_router_adapter(pack_dir: Path, base: Any):
    router = build_token_router({"kind": "uniform"})
    router.add_adapter("reverse")
    router.add_adapter("ghost")
    with pytest.raises(InvalidInput, match="ghost"):
        patch_lora_mixture(base, {"reverse": pack_dir / "adapters" / "reverse"}, router)


def test_one_prior_per_row_mixes_requests_in_one_batch(pack_dir: Path, base: Any):
    want = [_peft_logits(pack_dir, base, s) for s in ("caesar", "reverse")]
    handle, router = _patched(pack_dir, base, "uniform")
    rows = [prior_from_scores(router.adapters, {s: 1.0}, top_m=1) for s in ("caesar", "reverse")]
    handle.prior = TokenPrior(torch.stack([p.allowed for p in rows]))  # [B, N]
    try:
        with torch.no_grad():
            got = base(input_ids=_ids()).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got[0], want[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1][1], rtol=1e-4, atol=1e-4)


def test_a_patched_layer_takes_an_empty_batch():
    """x [B, 0, D] (no tokens) comes back as [B, 0, Dout]."""
    from torch import nn

    from concilium.experts.moe.lora_mixture import LoRAWeights

    model = nn.Sequential(nn.Linear(8, 5))
    router = build_token_router({"kind": "uniform"})
    router.add_adapter("a")
    handle = patch_lora_mixture(
        model, {"a": {"0": LoRAWeights(torch.randn(2, 8), torch.randn(5, 2), 1.0)}}, router
    )
    with torch.no_grad():
        y = model(torch.randn(2, 0, 8))
    handle.remove()
    assert y.shape == (2, 0, 5)
