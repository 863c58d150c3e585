"""Every token router in TOKEN_ROUTER_CLS honours the contract, with no model loaded."""

from __future__ import annotations

import pytest
import torch

from concilium.errors import ConfigError, InvalidInput
from concilium.routers.token import (
    TOKEN_ROUTER_CLS,
    TokenPrior,
    TokenRouter,
    build_token_router,
    prior_from_scores,
    stack_priors,
)
from concilium.routers.token.oracle import OracleRouter

D, N, T = 16, 6, 9
LAYERS = ("l0.q_proj", "l0.v_proj")
KINDS = sorted(TOKEN_ROUTER_CLS)


def _router(kind: str, n: int = N, **cfg: object) -> TokenRouter:
    g = torch.Generator().manual_seed(0)
    router = build_token_router({"kind": kind, **cfg})
    for i in range(n):
        router.add_adapter(f"a{i}", {layer: torch.randn(D, generator=g) for layer in LAYERS})
    if isinstance(router, OracleRouter):
        router.set_target(f"a{min(2, n - 1)}")
    return router


def _x(t: int = T) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", KINDS)
def test_route_returns_weights_and_indices(kind: str):
    router = _router(kind)
    w, idx = router.route(_x(), LAYERS[0])
    assert w.shape == idx.shape and w.shape[0] == T and 1 <= w.shape[1] <= N
    assert idx.dtype == torch.long and int(idx.min()) >= 0 and int(idx.max()) < N
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(T))
    assert all(len(set(row)) == len(row) for row in idx.tolist())  # no adapter twice per token
    w2, idx2 = router.route(_x(), LAYERS[0])
    assert torch.equal(w, w2) and torch.equal(idx, idx2)


@pytest.mark.parametrize("kind", KINDS)
def test_single_token_and_one_adapter(kind: str):
    router = _router(kind, n=1)
    w, idx = router.route(_x(1), LAYERS[1])
    assert w.shape == (1, 1) and idx.tolist() == [[0]] and float(w) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", sorted(set(KINDS) - {"oracle"}))
def test_prior_restricts_candidates(kind: str):
    router = _router(kind)
    allowed = torch.tensor([False, True, False, True, True, False])
    w, idx = router.route(_x(), LAYERS[0], TokenPrior(allowed))
    assert set(idx.flatten().tolist()) <= {1, 3, 4} and w.shape[1] <= 3
    per_token = torch.zeros(T, N, dtype=torch.bool)
    per_token[:, 5] = True
    per_token[:4, 0] = True  # the first four tokens may also use adapter 0
    w, idx = router.route(_x(), LAYERS[0], TokenPrior(per_token))
    # K follows the tokens with the most candidates; the others' spare slots weigh 0
    assert idx.shape[1] == 2 and set(idx[:4].flatten().tolist()) == {0, 5}
    assert set(idx[4:, 0].tolist()) == {5} and bool((w[4:, 0] == 1).all())
    assert bool((w[4:, 1] == 0).all())


@pytest.mark.parametrize("kind", KINDS)
def test_adding_an_adapter_changes_no_other_adapters_vectors(kind: str):
    router = _router(kind)
    before = {name: router.vectors(name) for name in router.adapters}
    v = torch.randn(D, generator=torch.Generator().manual_seed(7))
    router.add_adapter("new", {LAYERS[0]: v})
    assert router.adapters[-1] == "new" and len(router.adapters) == N + 1
    for name, vecs in before.items():
        after = router.vectors(name)
        assert all(torch.equal(vecs[layer], after[layer]) for layer in LAYERS)
    if isinstance(router, OracleRouter):
        router.set_target("new")
    _, idx = router.route(10 * v[None, :], LAYERS[0])  # a token along the new adapter's vector
    assert int(idx[0, 0]) == N or (kind == "uniform" and N in idx[0].tolist())


@pytest.mark.parametrize("kind", KINDS)
def test_no_adapters_is_refused(kind: str):
    with pytest.raises(InvalidInput, match="no adapters"):
        build_token_router({"kind": kind}).route(_x(), LAYERS[0])


def test_config_names_the_valid_kinds():
    with pytest.raises(ConfigError, match="arrow"):
        build_token_router({"kind": "phatgoos"})
    with pytest.raises(ConfigError):
        build_token_router({"kind": "arrow", "top_k": 0})
    assert build_token_router({"kind": "arrow", "top_k": 3}).config.top_k == 3


def test_prior_from_scores_keeps_the_top_m_and_biases():
    names = ["a", "b", "c", "d"]
    prior = prior_from_scores(names, {"a": 0.1, "b": 0.9, "c": 0.5}, top_m=2, weight=1.0)
    assert prior.allowed.tolist() == [False, True, True, False]
    assert prior.bias is not None and float(prior.bias[1]) > float(prior.bias[2])
    assert prior_from_scores(names, {"a": 1.0}, top_m=3).allowed.tolist() == [1, 0, 0, 0]
    with pytest.raises(InvalidInput):
        prior_from_scores(names, {}, top_m=2)


def test_stack_priors_gives_one_row_per_token():
    p = prior_from_scores(["a", "b", "c"], {"a": 1.0, "b": 0.0}, top_m=1, weight=2.0)
    stacked = stack_priors([p, None], [2, 3], n=3)
    assert stacked.allowed.shape == (5, 3) and stacked.bias is not None
    assert stacked.allowed[:2].tolist() == [[True, False, False]] * 2
    assert bool(stacked.allowed[2:].all()) and float(stacked.bias[2:].abs().sum()) == 0.0
