"""Served token-level mixtures on the demo pack: a request mixes its adapters per token."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from concilium.errors import InvalidInput
from concilium.experts.base import Delta, Generation, GenParams, Target, TokenRoutingParams
from concilium.experts.local import GenRequest, LocalCausalLM
from concilium.experts.pool import ExpertPool

SKILLS = ("reverse", "uppercase", "rotate", "caesar")


@pytest.fixture(scope="module")
def pack(pack_dir: Path) -> dict[str, Any]:
    rows = [json.loads(x) for x in (pack_dir / "heldout.jsonl").read_text().splitlines() if x]
    return {"dir": pack_dir.absolute(), "rows": rows}


@pytest.fixture(scope="module")
def lm(pack: dict[str, Any]) -> LocalCausalLM:
    return LocalCausalLM(pack["dir"] / "base", max_adapters=len(SKILLS))


def _cands(pack: dict[str, Any], names: tuple[str, ...] = SKILLS) -> tuple[tuple[str, str], ...]:
    return tuple((n, str(pack["dir"] / "adapters" / n)) for n in names)


def _msgs(pack: dict[str, Any], skill: str, i: int = 0) -> list[dict[str, str]]:
    row = [r for r in pack["rows"] if r["skill"] == skill][i]
    return [{"role": "user", "content": row["query"]}]


def _mix(
    pack: dict[str, Any], router: str, names: tuple[str, ...] = SKILLS, **kw: Any
) -> GenParams:
    tr = TokenRoutingParams(router, kw.pop("top_k", 2), _cands(pack, names), **kw)
    return GenParams(max_tokens=12, token_routing=tr)


def _check_summary(g: Generation, names: tuple[str, ...], router: str) -> None:
    s = g.routing_summary
    assert s is not None and s["router"] == router
    assert s["top_k"] == (len(names) if router == "uniform" else min(2, len(names)))
    assert set(s["adapter_shares"]) == set(names)
    assert sum(s["adapter_shares"].values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in s["adapter_shares"].values())
    assert 0.0 <= s["mean_entropy"] <= math.log(s["top_k"]) + 1e-9
    # every real token is routed once per forward: the prompt, then each token fed back
    assert g.prompt_tokens <= s["tokens"] <= g.prompt_tokens + g.completion_tokens


@pytest.mark.parametrize("router", ["arrow", "uniform"])
def test_mixture_answers_with_a_routing_summary(lm: LocalCausalLM, pack: dict, router: str):  # type: ignore[type-arg]
    g = lm.generate(_msgs(pack, "reverse"), _mix(pack, router, prior=(3.0, 0.0, 0.0, -1.0)))
    assert g.text and g.completion_tokens > 0
    _check_summary(g, SKILLS, router)
    if router == "arrow":  # a learned-free router still spreads tokens over several adapters
        assert sum(v > 0 for v in g.routing_summary["adapter_shares"].values()) >= 2  # type: ignore[index]


@pytest.mark.parametrize(("router", "skill"), [("arrow", "uppercase"), ("uniform", "caesar")])
def test_one_candidate_is_exactly_that_adapter(
    lm: LocalCausalLM,
    pack: dict,  # type: ignore[type-arg]
    router: str,
    skill: str,
):
    """The oracle-like check: a prior concentrated on one adapter reproduces it token for token."""
    lm.ensure_adapter(skill, pack["dir"] / "adapters" / skill)
    msgs = _msgs(pack, skill)
    single = lm.generate(msgs, GenParams(max_tokens=12), skill)
    mixed = lm.generate(msgs, _mix(pack, router, (skill,), prior=(1.0,)))
    assert mixed.text == single.text and mixed.mean_logprob == single.mean_logprob
    assert mixed.routing_summary["adapter_shares"] == {skill: 1.0}  # type: ignore[index]
    assert mixed.routing_summary["mean_entropy"] == 0.0  # type: ignore[index]


def test_mixture_and_single_adapter_rows_share_a_batch(lm: LocalCausalLM, pack: dict):  # type: ignore[type-arg]
    lm.ensure_adapter("reverse", pack["dir"] / "adapters" / "reverse")
    reqs = [
        GenRequest(_msgs(pack, "reverse"), GenParams(max_tokens=12), "reverse"),
        GenRequest(_msgs(pack, "rotate"), _mix(pack, "arrow")),
        GenRequest(_msgs(pack, "uppercase"), GenParams(max_tokens=12), None),
        GenRequest(_msgs(pack, "caesar"), _mix(pack, "uniform", ("caesar",))),
        # the same router as row 1 (routed in one call with it), its own prior
        GenRequest(_msgs(pack, "uppercase"), _mix(pack, "arrow", prior=(0.0, 4.0, 0.0, 0.0))),
    ]
    batched = lm.generate_batch(reqs)
    alone = [lm.generate_batch([r])[0] for r in reqs]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert [g.routing_summary is None for g in batched] == [True, False, True, False, False]
    _same_summary(batched[4], alone[4])
    shares = [batched[i].routing_summary["adapter_shares"] for i in (1, 4)]  # type: ignore[index]
    assert shares[1]["uppercase"] > shares[0]["uppercase"]  # the prior moved the mass
    assert batched[0].text == next(r for r in pack["rows"] if r["skill"] == "reverse")["answer"]
    _same_summary(batched[1], alone[1])


def _same_summary(a: Generation, b: Generation) -> None:
    sa, sb = a.routing_summary, b.routing_summary
    assert sa is not None and sb is not None
    assert {k: v for k, v in sa.items() if k != "adapter_shares"} == pytest.approx(
        {k: v for k, v in sb.items() if k != "adapter_shares"}
    )
    assert sa["adapter_shares"] == pytest.approx(sb["adapter_shares"])


def test_phatgoose_needs_gates_and_uses_the_given_ones(
    lm: LocalCausalLM,
    pack: dict,
    tmp_path: Path,  # type: ignore[type-arg]
):
    from safetensors.torch import save_file

    from concilium.experts.moe.lora_patch import load_lora_weights

    with pytest.raises(InvalidInput, match="no phatgoose gate"):
        lm.generate(_msgs(pack, "reverse"), _mix(pack, "phatgoose"))
    paths = []
    for i, s in enumerate(SKILLS):  # stand-in gates: adapter i's gates all point one way
        w = load_lora_weights(pack["dir"] / "adapters" / s)
        g = torch.Generator().manual_seed(i)
        gates = {m: torch.randn(x.a.shape[1], generator=g) for m, x in w.items()}
        save_file(gates, str(tmp_path / f"{s}.safetensors"))
        paths.append(str(tmp_path / f"{s}.safetensors"))
    g = lm.generate(_msgs(pack, "reverse"), _mix(pack, "phatgoose", vectors=tuple(paths)))
    _check_summary(g, SKILLS, "phatgoose")
    bad = {"model.layers.0.self_attn.q_proj": torch.zeros(3)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(InvalidInput, match="shape"):
        lm.generate(
            _msgs(pack, "reverse"),
            _mix(pack, "arrow", vectors=(*paths[:3], str(tmp_path / "bad.safetensors"))),
        )


def test_bad_token_routing_is_invalid_input(lm: LocalCausalLM, pack: dict):  # type: ignore[type-arg]
    with pytest.raises(InvalidInput, match="valid"):
        lm.generate(_msgs(pack, "reverse"), _mix(pack, "oracle"))
    with pytest.raises(InvalidInput, match="prior"):
        lm.generate(_msgs(pack, "reverse"), _mix(pack, "arrow", prior=(1.0,)))
    with pytest.raises(InvalidInput, match="no candidate"):
        lm.generate(_msgs(pack, "reverse"), _mix(pack, "arrow", ()))


def test_pool_serves_mixtures_batched_and_streamed(pack: dict):  # type: ignore[type-arg]
    base = str(pack["dir"] / "base")
    target = Target(expert="demo-moe:mixture", kind="model", model="demo-moe", model_path=base)
    params = _mix(pack, "arrow")

    async def go() -> tuple[Generation, list[Any]]:
        pool = ExpertPool(max_adapters=len(SKILLS))
        try:
            gen = await pool.chat(target, _msgs(pack, "rotate"), params)
            items = [i async for i in pool.chat_stream(target, _msgs(pack, "rotate"), params)]
        finally:
            await pool.aclose()
        return gen, items

    gen, items = asyncio.run(go())
    _check_summary(gen, SKILLS, "arrow")
    final = items[-1]
    assert isinstance(final, Generation) and final.text == gen.text
    assert "".join(i.text for i in items if isinstance(i, Delta)) == gen.text
    _same_summary(final, gen)


def test_gates_trained_at_registration_serve_a_phatgoose_mixture(
    lm: LocalCausalLM,
    pack: dict,  # type: ignore[type-arg]
    tmp_path: Path,
):
    """What the orchestrator does: candidates' stored dirs and gate artifacts from the registry."""
    from concilium.orchestrator.service import arrow_artifacts, phatgoose_gates
    from concilium.registry.registry import Registry
    from tests.conftest import HashEncoder
    from tests.registry.test_gate_registration import _spec

    reg = Registry(
        tmp_path, HashEncoder(), adapter_routing=arrow_artifacts, gate_trainer=phatgoose_gates(2)
    )
    reg.register({"kind": "model", "name": "demo-moe", "path": str(pack["dir"] / "base")})
    recs = [reg.register(_spec(pack["dir"], s, n_examples=4)) for s in ("reverse", "rotate")]
    assert reg.wait_for_gates(timeout=120)
    recs = [reg.get(r.name) for r in recs]
    # the stored gates are the ones training on each adapter's own examples gives (same seed)
    from safetensors.torch import load_file, save_file

    from concilium.experts.moe.lora_gates import PhatgooseTrainer

    trainer = PhatgooseTrainer(steps=2)
    ours = []
    for r in recs:
        stored = load_file(str(reg.router_artifact(r, "phatgoose")))
        examples = [
            (e["prompt"], e["completion"]) for e in _spec(pack["dir"], r.name, 4)["train_examples"]
        ]
        want = {
            m: torch.from_numpy(g)
            for m, g in trainer(
                pack["dir"] / "base", pack["dir"] / "adapters" / r.name, examples
            ).items()
        }
        assert stored.keys() == want.keys()
        for m, g in want.items():
            torch.testing.assert_close(stored[m], g, atol=1e-6, rtol=1e-5, msg=m)
        assert any(bool(g.abs().max() > 0) for g in want.values())  # trained off the zero init
        save_file(want, str(tmp_path / f"ours-{r.name}.safetensors"))
        ours.append(str(tmp_path / f"ours-{r.name}.safetensors"))
    served = {}
    for router in ("phatgoose", "arrow"):
        tr = TokenRoutingParams(
            router,
            2,
            tuple((r.name, str(reg.runtime_path(r))) for r in recs),
            prior=(2.0, 0.0),
            vectors=tuple(str(reg.router_artifact(r, router)) for r in recs),
        )
        g = lm.generate(_msgs(pack, "reverse"), GenParams(max_tokens=12, token_routing=tr))
        _check_summary(g, ("reverse", "rotate"), router)
        served[router] = g
    # serving the registry's gate files routes exactly as serving the freshly trained gates
    tr = TokenRoutingParams(
        "phatgoose",
        2,
        tuple((r.name, str(reg.runtime_path(r))) for r in recs),
        prior=(2.0, 0.0),
        vectors=tuple(ours),
    )
    g = lm.generate(_msgs(pack, "reverse"), GenParams(max_tokens=12, token_routing=tr))
    assert g.text == served["phatgoose"].text
    _same_summary(g, served["phatgoose"])
