"""MoE gating variants: the contract over MOE_GATING_CLS, then each variant's own behaviour."""

from __future__ import annotations

import pytest
import torch

from concilium.errors import ConfigError, InvalidInput
from concilium.experts.moe.layer import get_backend
from concilium.experts.moe.reference import reference_moe
from concilium.routers.token.moe_gating import (
    MOE_GATING_CLS,
    NullExpertConfig,
    TopKSoftmaxConfig,
    TopPConfig,
    active_experts_per_token,
    build_gating,
)

E, T = 8, 32


def logits(t: int = T, cols: int = E, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, cols, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("kind", sorted(MOE_GATING_CLS))
def test_contract(kind: str) -> None:
    """Every gating: [T, K] pair, weights >= 0, real or -1 indices, distinct real experts,
    gradient to the logits, at least one real expert per token."""
    gating = build_gating({"kind": kind})
    lg = logits(cols=E + 4).requires_grad_(True)
    weights, idxs = gating(lg)
    e = gating.num_experts(lg)
    assert weights.shape == idxs.shape and weights.shape[0] == T
    assert (weights >= 0).all() and ((idxs == -1) | ((idxs >= 0) & (idxs < e))).all()
    assert ((idxs >= 0).sum(-1) >= 1).all() or kind == "null_experts"
    for row in idxs.tolist():
        real = [i for i in row if i >= 0]
        assert len(real) == len(set(real))
    (weights * torch.arange(1.0, weights.shape[1] + 1)).sum().backward()
    assert lg.grad is not None and bool(torch.isfinite(lg.grad).all())
    assert float(lg.grad.abs().sum()) > 0  # the weights really depend on the logits


def test_topk_matches_the_transformers_router_formula() -> None:
    lg = logits()
    w, i = build_gating(TopKSoftmaxConfig(top_k=2))(lg)
    p = torch.softmax(lg, -1)
    want_w, want_i = p.topk(2, -1)
    torch.testing.assert_close(i, want_i)
    torch.testing.assert_close(w, want_w / want_w.sum(-1, keepdim=True))
    w_raw, _ = build_gating(TopKSoftmaxConfig(top_k=2, renormalize=False))(lg)
    torch.testing.assert_close(w_raw, want_w)


def test_top_p_takes_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02], [0.3, 0.3, 0.25, 0.15]])
    w, i = build_gating(TopPConfig(p=0.75, max_k=4))(probs.log())
    assert [sorted(x for x in row if x >= 0) for row in i.tolist()] == [[0, 1], [0], [0, 1, 2]]
    torch.testing.assert_close(w.sum(-1), torch.tensor([0.8, 0.9, 0.85]))
    w, i = build_gating(TopPConfig(p=1.0, max_k=2, renormalize=True))(probs.log())
    assert (i >= 0).all() and torch.allclose(w.sum(-1), torch.ones(3))


def test_top_p_uses_more_experts_for_flat_distributions() -> None:
    gating = build_gating(TopPConfig(p=0.6, max_k=E))
    _, sharp = gating(logits() * 5)
    _, flat = gating(logits() * 0.1)
    assert active_experts_per_token(flat, E) > active_experts_per_token(sharp, E) >= 1


def test_null_experts_let_easy_tokens_use_fewer_real_experts() -> None:
    lg = torch.zeros(2, E + 4)
    lg[0, E:] = 5.0  # token 0: the null experts dominate
    lg[1, :4] = 5.0  # token 1: four real experts dominate
    w, i = build_gating(NullExpertConfig(num_null=4, top_k=4))(lg)
    assert (i[0] == -1).all() and (w[0] == 0).all()
    assert sorted(i[1].tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(w[1].sum(), torch.tensor(1.0))
    assert active_experts_per_token(i, E) == 2.0


def test_active_experts_per_token_counts_only_real_slots() -> None:
    idxs = torch.tensor([[0, -1], [3, 5], [-1, -1]])
    assert active_experts_per_token(idxs, 8) == 1.0
    assert active_experts_per_token(idxs[:0], 8) == 0.0


@pytest.mark.parametrize("kind", sorted(MOE_GATING_CLS))
@pytest.mark.parametrize("backend", ["grouped", "decode", "auto"])
def test_gating_output_runs_through_sparse_moe(kind: str, backend: str) -> None:
    """Empty slots (-1) reach the kernels and add nothing: equal to the reference on real slots."""
    gating = build_gating({"kind": kind})
    lg = logits(t=9, cols=E + 4, seed=3)
    weights, idxs = gating(lg)
    g = torch.Generator().manual_seed(4)
    x, w13, w2 = torch.randn(9, 16, generator=g), torch.randn(12, 20, 16), torch.randn(12, 16, 10)
    with torch.no_grad():
        got = get_backend(backend)(x, w13, w2, weights, idxs)
    real = idxs >= 0
    want = reference_moe(x, w13, w2, weights * real, idxs.clamp_min(0))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("config", "field", "says"),
    [
        ({"kind": "topk"}, "kind", "valid kinds: null_experts, top_p, topk_softmax"),
        ({"top_k": 2}, "kind", "valid kinds"),
        ({"kind": "top_p", "p": 1.5}, "p", "p=1.5"),
        ({"kind": "null_experts", "num_nul": 2}, "num_nul", "num_nul=2"),
        ({"kind": "topk_softmax", "top_k": 0}, "top_k", "top_k=0"),
    ],
)
def test_a_bad_config_is_a_config_error_naming_the_field(
    config: dict[str, object], field: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=says) as info:
        build_gating(config)
    assert info.value.field == field


def test_logits_that_do_not_fit_the_config_are_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="top_k=9"):
        build_gating(TopKSoftmaxConfig(top_k=9))(logits())
    with pytest.raises(InvalidInput, match="num_null"):
        build_gating(NullExpertConfig(num_null=8))(logits())
