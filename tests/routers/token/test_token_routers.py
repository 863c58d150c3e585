"""Behaviour specific to each token router: what it scores and how the prior bends it."""

from __future__ import annotations

import pytest
import torch

from concilium.errors import InvalidInput
from concilium.routers.token import TokenPrior, build_token_router
from concilium.routers.token.phatgoose import standardise

D = 12


def _basis(i: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), D).float()


def test_phatgoose_picks_the_gate_most_correlated_with_the_token():
    router = build_token_router({"kind": "phatgoose", "top_k": 2})
    g = torch.Generator().manual_seed(0)
    gates = [torch.randn(D, generator=g) for _ in range(4)]
    for i, v in enumerate(gates):
        router.add_adapter(f"a{i}", {"l": v})
    x = torch.stack([3 * gates[2] + 1.0, gates[0] - 5.0])  # scale and shift do not matter
    w, idx = router.route(x, "l")
    assert idx[:, 0].tolist() == [2, 0] and bool((w[:, 0] > w[:, 1]).all())
    assert float(standardise(x).mean()) == pytest.approx(0.0, abs=1e-5)


def test_arrow_ignores_the_sign_and_sharpens_with_temperature():
    cold = build_token_router({"kind": "arrow", "top_k": 2, "temperature": 0.1})
    warm = build_token_router({"kind": "arrow", "top_k": 2, "temperature": 10.0})
    for router in (cold, warm):
        for i in range(3):
            router.add_adapter(f"a{i}", {"l": _basis(i)})
    x = (-2 * _basis(1) + _basis(0))[None, :]
    (wc, ic), (ww, iw) = cold.route(x, "l"), warm.route(x, "l")
    assert ic.tolist() == iw.tolist() == [[1, 0]]
    assert float(wc[0, 0]) > float(ww[0, 0]) > 0.5


def test_an_adapter_without_a_vector_at_a_layer_is_never_chosen():
    router = build_token_router({"kind": "arrow", "top_k": 2})
    router.add_adapter("q-only", {"q": _basis(0)})
    router.add_adapter("both", {"q": _basis(1), "v": _basis(1)})
    router.add_adapter("v-only", {"v": _basis(2)})
    _, idx = router.route(torch.randn(5, D), "v")
    assert set(idx.flatten().tolist()) == {1, 2}


def test_prior_bias_can_overturn_the_local_ranking():
    router = build_token_router({"kind": "arrow", "top_k": 1})
    for i in range(3):
        router.add_adapter(f"a{i}", {"l": _basis(i)})
    x = (_basis(0) + 0.9 * _basis(1))[None, :]
    assert router.route(x, "l")[1].item() == 0
    bias = torch.tensor([0.0, 0.5, 0.0])
    prior = TokenPrior(torch.ones(3, dtype=torch.bool), bias)
    assert router.route(x, "l", prior)[1].item() == 1


def test_uniform_is_an_equal_merge_of_the_candidates():
    router = build_token_router({"kind": "uniform"})
    for i in range(4):
        router.add_adapter(f"a{i}")
    w, idx = router.route(torch.randn(3, D), "any")
    torch.testing.assert_close(w, torch.full((3, 4), 0.25))
    prior = TokenPrior(torch.tensor([True, False, True, False]), torch.tensor([5.0, 0, 0, 0]))
    w, idx = router.route(torch.randn(3, D), "any", prior)
    torch.testing.assert_close(w, torch.full((3, 2), 0.5))
    assert sorted(idx[0].tolist()) == [0, 2]


def test_oracle_routes_everything_to_its_target():
    router = build_token_router({"kind": "oracle"})
    for i in range(3):
        router.add_adapter(f"a{i}")
    with pytest.raises(InvalidInput, match="set_target"):
        router.route(torch.randn(2, D), "l")
    with pytest.raises(InvalidInput, match="unknown adapter"):
        router.set_target("zzz")  # type: ignore[attr-defined]
    router.set_target("a1")  # type: ignore[attr-defined]
    w, idx = router.route(torch.randn(4, D), "l")
    assert idx.tolist() == [[1]] * 4 and w.tolist() == [[1.0]] * 4


def test_a_token_whose_candidates_have_no_vector_here_gets_no_adapter_not_nan():
    """The prior allows only an adapter that does not adapt this layer: weight 0, never NaN."""
    router = build_token_router({"kind": "arrow", "top_k": 2})
    router.add_adapter("q-only", {"q": _basis(0)})
    router.add_adapter("v-only", {"v": _basis(1)})
    w, _ = router.route(torch.randn(3, D), "v", TokenPrior(torch.tensor([True, False])))
    assert not w.isnan().any() and bool((w == 0).all())


@pytest.mark.parametrize("kind", ["arrow", "uniform"])
def test_a_row_routes_the_same_whatever_else_is_in_the_batch(kind: str):
    """A per-token prior mixing requests: a row with one candidate must not cut the K of the
    others (their routing would depend on who shares the batch)."""
    router = build_token_router({"kind": kind, "top_k": 2})
    for i in range(3):
        router.add_adapter(f"a{i}", {"l": _basis(i)})
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    alone_w, alone_i = router.route(x[2:], "l")  # rows 2-3 on their own, no prior
    allowed = torch.ones(4, 3, dtype=torch.bool)
    allowed[:2] = torch.tensor([False, True, False])  # rows 0-1: one candidate only
    w, i = router.route(x, "l", TokenPrior(allowed))
    assert i[:2, 0].tolist() == [1, 1] and bool((w[:2, 0] == 1).all())
    assert bool((w[:2, 1:] == 0).all())  # their spare slots add nothing
    torch.testing.assert_close(w[2:, : alone_w.shape[1]], alone_w)
    assert torch.equal(i[2:, : alone_i.shape[1]], alone_i)


def test_no_tokens_with_a_per_token_prior():
    router = build_token_router({"kind": "phatgoose", "top_k": 2})
    for i in range(3):
        router.add_adapter(f"a{i}", {"l": _basis(i)})
    w, i = router.route(torch.randn(0, D), "l", TokenPrior(torch.ones(0, 3, dtype=torch.bool)))
    assert w.shape[0] == i.shape[0] == 0
