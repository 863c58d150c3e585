"""Logit-level ensembles of one base's adapters (GenParams.fusion) in the local decode loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from concilium.errors import ExpertUnavailable
from concilium.experts.base import GenParams, LogitFusionParams, TokenRoutingParams
from concilium.experts.local import GenRequest, LocalCausalLM


@pytest.fixture(scope="module")
def pack(pack_dir: Path) -> dict:  # type: ignore[type-arg]
    m = json.loads((pack_dir / "manifest.json").read_text())
    rows = [json.loads(x) for x in (pack_dir / "heldout.jsonl").read_text().splitlines() if x]
    names = [e["name"] for e in m["experts"]]
    return {"dir": pack_dir, "manifest": m, "rows": rows, "names": names}


@pytest.fixture(scope="module")
def lm(pack: dict) -> LocalCausalLM:  # type: ignore[type-arg]
    return LocalCausalLM(pack["dir"] / pack["manifest"]["base"]["path"], max_adapters=4)


def _member(pack: dict, name: str) -> tuple[str, str]:  # type: ignore[type-arg]
    return name, str(pack["dir"] / "adapters" / name)


def _msgs(pack: dict, skill: str) -> list[dict[str, str]]:  # type: ignore[type-arg]
    row = next(r for r in pack["rows"] if r["skill"] == skill)
    return [{"role": "user", "content": row["query"]}]


def _fused(members: list[tuple[str, str] | None], weights: list[float], **kw: int) -> GenParams:
    return GenParams(
        max_tokens=kw.get("max_tokens", 24),
        fusion=LogitFusionParams(tuple(members), tuple(weights)),
    )


def test_one_weighted_member_answers_as_that_adapter(lm: LocalCausalLM, pack: dict) -> None:  # type: ignore[type-arg]
    a, b = pack["names"][:2]
    msgs = _msgs(pack, a)
    lm.ensure_adapter(*_member(pack, a))
    alone = lm.generate(msgs, GenParams(max_tokens=24), a)
    fused = lm.generate(msgs, _fused([_member(pack, a), _member(pack, b)], [1.0, 0.0]))
    assert fused.text == alone.text and fused.completion_tokens == alone.completion_tokens
    assert fused.mean_logprob == pytest.approx(alone.mean_logprob, abs=1e-4)


def _reference(
    lm: LocalCausalLM, msgs: list[dict[str, str]], members: list[str | None], w: list[float], n: int
) -> str:
    """Greedy decode of the mixture Σ w·p without a KV cache: one full forward per member per
    step, each member under its own adapter alone."""
    tok = lm.tokenizer
    ids = tok([lm.prompt(msgs)], return_tensors="pt", add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for _ in range(n):
        seq = torch.cat([ids, torch.tensor([out], dtype=ids.dtype)], dim=1)
        probs = 0
        for m, wk in zip(members, w, strict=True):
            kw = {} if m is None else {"adapter_names": [m]}
            if lm.bank is not None:
                lm.bank.set_rows([m])
                kw = {}
            with torch.inference_mode():
                logits = lm.model(input_ids=seq, **kw).logits[0, -1].float()
            probs = probs + wk / sum(w) * torch.softmax(logits, -1)
        nxt = int(torch.as_tensor(probs).argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    return str(tok.decode(out, skip_special_tokens=True))


def test_mixture_matches_an_uncached_reference(lm: LocalCausalLM, pack: dict) -> None:  # type: ignore[type-arg]
    a, b = pack["names"][2:4]
    msgs = _msgs(pack, a)
    w = [0.55, 0.45]
    for m in (a, b):
        lm.ensure_adapter(*_member(pack, m))
    ref = _reference(lm, msgs, [a, b], w, 10)
    got = lm.generate(msgs, _fused([_member(pack, a), _member(pack, b)], w, max_tokens=10))
    assert got.text == ref
    # an even mixture of two skills can answer unlike either member, token by token
    a, b = "reverse", "uppercase"
    msgs = _msgs(pack, a)
    for m in (a, b):
        lm.ensure_adapter(*_member(pack, m))
    got = lm.generate(msgs, _fused([_member(pack, a), _member(pack, b)], [0.5, 0.5]))
    singles = {lm.generate(msgs, GenParams(max_tokens=24), m).text for m in (a, b)}
    assert got.text not in singles
    assert got.text == _reference(lm, msgs, [a, b], [0.5, 0.5], 24)
    # the base itself can be a member
    ref = _reference(lm, msgs, [None, a], [0.3, 0.7], 10)
    got = lm.generate(msgs, _fused([None, _member(pack, a)], [0.3, 0.7], max_tokens=10))
    assert got.text == ref


def test_fused_request_shares_a_batch_with_plain_rows(lm: LocalCausalLM, pack: dict) -> None:  # type: ignore[type-arg]
    a, b, c = pack["names"][:3]
    for m in (a, b, c):
        lm.ensure_adapter(*_member(pack, m))
    plain = [GenRequest(_msgs(pack, s), GenParams(max_tokens=24), s) for s in (a, c)]
    fused = GenRequest(_msgs(pack, b), _fused([_member(pack, b), _member(pack, a)], [0.7, 0.3]))
    batch = lm.generate_batch([plain[0], fused, plain[1]])
    alone = [lm.generate_batch([r])[0] for r in (plain[0], fused, plain[1])]
    assert [g.text for g in batch] == [g.text for g in alone]
    assert batch[0].text == next(r for r in pack["rows"] if r["skill"] == a)["answer"]
    # the prompt is counted once, not once per member
    assert batch[1].prompt_tokens == alone[1].prompt_tokens == plain_prompt_tokens(lm, pack, b)


def plain_prompt_tokens(lm: LocalCausalLM, pack: dict, skill: str) -> int:  # type: ignore[type-arg]
    return lm.generate(_msgs(pack, skill), GenParams(max_tokens=1)).prompt_tokens


def test_members_are_loaded_and_must_fit_the_replica(pack: dict) -> None:  # type: ignore[type-arg]
    lm = LocalCausalLM(pack["dir"] / pack["manifest"]["base"]["path"], max_adapters=2)
    a, b, c = pack["names"][:3]
    g = lm.generate(_msgs(pack, a), _fused([_member(pack, a), _member(pack, b)], [0.6, 0.4]))
    assert sorted(lm.adapters) == sorted([a, b]) and g.text
    with pytest.raises(ExpertUnavailable, match="needs 3 adapters"):
        lm.generate(
            _msgs(pack, a),
            _fused([_member(pack, a), _member(pack, b), _member(pack, c)], [1, 1, 1]),
        )


def test_fusion_params_are_checked() -> None:
    with pytest.raises(ValueError, match="one weight per member"):
        LogitFusionParams((None,), (0.5, 0.5))
    with pytest.raises(ValueError, match="not all 0"):
        LogitFusionParams((None, None), (0.0, 0.0))
    with pytest.raises(ValueError, match=">= 0"):
        LogitFusionParams((None, None), (1.0, -0.1))
    with pytest.raises(ValueError, match=">= 0"):
        LogitFusionParams((None,), (math.nan,))


def test_fusion_and_token_mixture_do_not_combine(lm: LocalCausalLM, pack: dict) -> None:  # type: ignore[type-arg]
    a = pack["names"][0]
    tr = TokenRoutingParams(router="arrow", top_k=1, adapters=(_member(pack, a),))
    p = GenParams(
        max_tokens=4, token_routing=tr, fusion=LogitFusionParams((_member(pack, a),), (1.0,))
    )
    with pytest.raises(Exception, match="cannot also be a token-level mixture"):
        lm.generate(_msgs(pack, a), p)
