"""RouterRetriever's late interaction (MaxSim over token embeddings) and its sentence fallback."""

from __future__ import annotations

import numpy as np

from concilium.registry.index import pack_tokens
from concilium.routers.base import Candidate, Query
from concilium.routers.query.late_interaction import TokenBank, bank_for, late_interaction
from concilium.routers.query.retriever import RetrieverConfig, RetrieverRouter

D = 8


def _unit(*hot: int) -> np.ndarray:
    v = np.zeros(D, dtype=np.float32)
    v[list(hot)] = 1.0
    return v / np.linalg.norm(v)


def _cand(name: str, sentence: list[np.ndarray], tokens: list[np.ndarray] | None) -> Candidate:
    flat, offsets = pack_tokens(tokens) if tokens is not None else (None, None)
    return Candidate(
        name,
        "lora",
        "generate",
        np.stack(sentence),
        _unit(7),
        pilot_tokens=flat,
        pilot_token_offsets=offsets,
    )


def _router(**kw: object) -> RetrieverRouter:
    return RetrieverRouter(RetrieverConfig(description_weight=0.0, **kw))  # type: ignore[arg-type]


def _setup() -> tuple[Query, list[Candidate]]:
    """Sentence embeddings favour `a`; every query token has an exact match in `b`'s pilot."""
    q_tokens = np.stack([_unit(0), _unit(1)])
    query = Query("q", _unit(0, 2), tokens=q_tokens)
    a = _cand("a", [_unit(0, 2)], [np.stack([_unit(3), _unit(4)])])
    b = _cand("b", [_unit(5)], [np.stack([_unit(1), _unit(6), _unit(0)])])
    return query, [a, b]


def test_late_interaction_is_maxsim_per_pilot() -> None:
    rng = np.random.default_rng(0)
    pilots = [rng.standard_normal((n, D)).astype(np.float32) for n in (1, 4, 2)]
    q = rng.standard_normal((3, D)).astype(np.float32)
    c = _cand("x", [_unit(0)] * 3, pilots)
    want = [float((q @ p.T).max(axis=1).mean()) for p in pilots]
    got = late_interaction(q, c)
    assert got is not None
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_late_interaction_can_overrule_the_sentence_embeddings() -> None:
    query, cands = _setup()
    assert _router(similarity="sentence").route(query, cands).expert == "a"
    d = _router(similarity="late_interaction").route(query, cands)
    assert d.expert == "b" and "late interaction" in d.reason


def test_without_tokens_everyone_is_scored_by_sentence() -> None:
    query, (a, b) = _setup()
    no_tokens = _cand("b", [_unit(5)], None)
    d = _router().route(query, [a, no_tokens])
    assert d.expert == "a" and "late interaction" not in d.reason
    q_plain = Query("q", query.embedding)  # an encoder without token embeddings
    assert _router().route(q_plain, [a, b]).expert == "a"


def test_rerank_rescores_only_the_best_by_sentence() -> None:
    query, (a, b) = _setup()
    c = _cand("c", [_unit(6)], [np.stack([_unit(0), _unit(1)])])  # tokens match, sentence far
    d = _router(rerank=2).route(query, [a, b, c])
    assert d.expert == "b"  # a and b re-scored (b before c in the sentence tie): b's tokens match
    d = _router(rerank=1).route(query, [a, b, c])  # only a (best by sentence) is re-scored
    assert d.expert == "a"
    assert d.scores["b"] < d.scores["a"] and d.scores["c"] < d.scores["a"]
    # the rest keep their sentence order below it: e is closer than b by sentence
    e = _cand("e", [_unit(2)], [np.stack([_unit(3)])])
    d = _router(rerank=1).route(query, [a, b, c, e])
    assert d.scores["e"] > d.scores["b"]


def test_the_token_bank_agrees_with_the_per_expert_reference() -> None:
    rng = np.random.default_rng(1)
    cands = [
        _cand(
            f"e{k}",
            [_unit(k)] * n,
            [rng.standard_normal((m, D)).astype(np.float32) for m in rng.integers(1, 5, n)],
        )
        for k, n in enumerate((1, 3, 2))
    ]
    cands.append(Candidate("empty", "lora", "generate", np.zeros((0, D), np.float32), _unit(7)))
    q = rng.standard_normal((4, D)).astype(np.float32)
    bank = TokenBank.of(cands)
    got = bank.maxsim(q)
    assert set(got) == {"e0", "e1", "e2"}
    for c in cands[:3]:
        np.testing.assert_allclose(got[c.name], late_interaction(q, c), rtol=1e-6)  # type: ignore[arg-type]
    query = Query("q", _unit(0), tokens=q)
    assert bank_for(query, cands, bank) is bank
    swapped = [cands[0], _cand("e1", [_unit(1)] * 3, [np.ones((1, D), np.float32)] * 3)]
    rebuilt = bank_for(query, swapped, bank)  # re-registered: new arrays, the bank is rebuilt
    assert rebuilt is not None and rebuilt is not bank
    assert set(rebuilt.maxsim(q)) == {"e0", "e1"}
    assert bank_for(Query("q", _unit(0)), cands, bank) is None  # a query without tokens
    no_tokens = Candidate("bare", "lora", "generate", np.stack([_unit(3)]), _unit(3))
    assert bank_for(query, [*cands, no_tokens], bank) is None  # an expert without them
