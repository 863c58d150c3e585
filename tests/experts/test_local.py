"""The local causal LM runtime on the demo pack: mixed-adapter batches, stops, LRU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from concilium.errors import ExpertFailed
from concilium.experts.base import GenParams
from concilium.experts.local import GenRequest, LocalCausalLM
from concilium.experts.moe.replica import MoEOptions


@pytest.fixture(scope="module")
def pack(pack_dir: Path) -> dict:  # type: ignore[type-arg]
    m = json.loads((pack_dir / "manifest.json").read_text())
    rows = [json.loads(x) for x in (pack_dir / "heldout.jsonl").read_text().splitlines() if x]
    return {"dir": pack_dir, "manifest": m, "rows": rows}


@pytest.fixture(scope="module")
def lm(pack: dict) -> LocalCausalLM:  # type: ignore[type-arg]
    lm = LocalCausalLM(pack["dir"] / pack["manifest"]["base"]["path"], max_adapters=3)
    for e in pack["manifest"]["experts"][:3]:
        lm.ensure_adapter(e["name"], pack["dir"] / e["path"])
    return lm


def _row(pack: dict, skill: str) -> dict:  # type: ignore[type-arg]
    return next(r for r in pack["rows"] if r["skill"] == skill)


def test_mixed_adapter_batch_equals_one_forward_per_adapter(lm: LocalCausalLM, pack: dict) -> None:  # type: ignore[type-arg]
    skills = [e["name"] for e in pack["manifest"]["experts"][:3]]
    reqs = [
        GenRequest(
            [{"role": "user", "content": _row(pack, s)["query"]}], GenParams(max_tokens=24), s
        )
        for s in skills
    ]
    reqs.append(GenRequest(reqs[0].messages, GenParams(max_tokens=24), None))  # base row too
    batched = lm.generate_batch(reqs)
    single = [lm.generate(r.messages, r.params, r.adapter) for r in reqs]
    assert [g.text for g in batched] == [g.text for g in single]
    for s, g in zip(skills, batched, strict=False):
        assert g.text == _row(pack, s)["answer"], (s, g)
        assert g.finish_reason == "stop" and g.mean_logprob is not None and g.mean_logprob <= 0
    assert batched[3].text != batched[0].text  # the base is not the adapter


def test_max_tokens_and_stop_strings(lm: LocalCausalLM, pack: dict) -> None:  # type: ignore[type-arg]
    s = pack["manifest"]["experts"][0]["name"]
    row = _row(pack, s)
    msgs = [{"role": "user", "content": row["query"]}]
    g = lm.generate(msgs, GenParams(max_tokens=2), s)
    assert g.completion_tokens == 2 and g.finish_reason == "length"
    full = lm.generate(msgs, GenParams(max_tokens=32), s).text
    g = lm.generate(msgs, GenParams(max_tokens=32, stop=(full[1:3],)), s)
    assert g.text == full[: full.find(full[1:3])] and g.finish_reason == "stop"


def test_sampling_is_seeded(lm: LocalCausalLM, pack: dict) -> None:  # type: ignore[type-arg]
    # the demo base is unsure of this prompt's answer (most are near one-hot even at T = 1.5)
    msgs = [{"role": "user", "content": "x: y"}]
    p = GenParams(max_tokens=12, temperature=1.5, seed=7)
    assert lm.generate(msgs, p).text == lm.generate(msgs, p).text
    greedy = lm.generate(msgs, GenParams(max_tokens=12)).text
    sampled = [
        lm.generate(msgs, GenParams(max_tokens=12, temperature=1.5, seed=s)).text for s in range(5)
    ]
    assert len(set(sampled)) >= 2, sampled  # the seed changes the draw
    assert any(t != greedy for t in sampled), (greedy, sampled)  # it is not argmax


def test_top_p_samples_only_inside_the_nucleus() -> None:
    import torch

    from concilium.experts.decode import Row

    probs = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])  # top_p 0.5: the nucleus is {0, 1}
    drawn = set()
    for seed in range(200):
        row = Row(GenParams(temperature=1.0, top_p=0.5, seed=seed), None, 4, frozenset())
        drawn.add(row._sample(probs.log()))
    assert drawn == {0, 1}  # never outside the nucleus, and not only its most likely token


def test_lru_evicts_and_reloads(pack: dict) -> None:  # type: ignore[type-arg]
    lm = LocalCausalLM(pack["dir"] / pack["manifest"]["base"]["path"], max_adapters=2)
    names = [e["name"] for e in pack["manifest"]["experts"][:3]]
    for n in names:
        lm.ensure_adapter(n, pack["dir"] / "adapters" / n)
    assert lm.adapters == names[1:]
    with pytest.raises(ExpertFailed, match="not loaded"):
        lm.generate([{"role": "user", "content": "x: y"}], GenParams(max_tokens=2), names[0])
    lm.ensure_adapter(names[0], pack["dir"] / "adapters" / names[0])
    row = _row(pack, names[0])
    g = lm.generate([{"role": "user", "content": row["query"]}], GenParams(max_tokens=24), names[0])
    assert g.text == row["answer"] and lm.adapters == [names[2], names[0]]


def test_min_tokens_suppresses_the_end_of_sequence(lm: LocalCausalLM, pack: dict) -> None:  # type: ignore[type-arg]
    s = pack["manifest"]["experts"][0]["name"]
    msgs = [{"role": "user", "content": _row(pack, s)["query"]}]
    short = lm.generate(msgs, GenParams(max_tokens=40), s)
    assert short.completion_tokens < 20
    g = lm.generate(msgs, GenParams(max_tokens=40, min_tokens=30), s)
    assert g.completion_tokens >= 30 and g.text.startswith(short.text)


def test_stream_pieces_add_up_to_the_batch_answer(lm: LocalCausalLM, pack: dict) -> None:  # type: ignore[type-arg]
    s = pack["manifest"]["experts"][0]["name"]
    msgs = [{"role": "user", "content": _row(pack, s)["query"]}]
    full = lm.generate(msgs, GenParams(max_tokens=32), s)
    for params in (GenParams(max_tokens=32), GenParams(max_tokens=32, stop=(full.text[2:4],))):
        pieces: list[str] = []

        def emit(t: str, pieces: list[str] = pieces) -> bool:
            pieces.append(t)
            return True

        gen = lm.generate_stream(GenRequest(msgs, params, s), emit)
        assert "".join(pieces) == gen.text == lm.generate(msgs, params, s).text
        assert len(pieces) >= 1


def test_stream_stops_when_the_consumer_goes_away(lm: LocalCausalLM, pack: dict) -> None:  # type: ignore[type-arg]
    s = pack["manifest"]["experts"][0]["name"]
    msgs = [{"role": "user", "content": _row(pack, s)["query"]}]
    pieces: list[str] = []
    gen = lm.generate_stream(
        GenRequest(msgs, GenParams(max_tokens=32), s), lambda t: pieces.append(t) and False
    )
    assert len(pieces) == 1 and gen.completion_tokens == 1


def test_mixture_engine_matches_peft_logits_and_text(
    pack: dict,  # type: ignore[type-arg]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Our MoE-LoRA mixed batch and PEFT's adapter_names batch agree row for row."""
    import torch

    base = pack["dir"] / pack["manifest"]["base"]["path"]
    experts = pack["manifest"]["experts"][:4]
    lms = {e: LocalCausalLM(base, max_adapters=4, engine=e) for e in ("mixture", "peft")}
    for lm in lms.values():
        for e in experts:
            lm.ensure_adapter(e["name"], pack["dir"] / e["path"])
    reqs = [
        GenRequest(
            [{"role": "user", "content": _row(pack, e["name"])["query"]}],
            GenParams(max_tokens=24),
            a,
        )
        for e in experts
        for a in (e["name"], None)
    ]
    # two different engines: our bank of stacked adapters, and PEFT's wrapped model
    from peft import PeftModel

    assert lms["mixture"].engine == "mixture" and lms["peft"].engine == "peft"
    assert lms["mixture"].bank is not None and lms["peft"].bank is None
    assert lms["mixture"].bank.weights.keys() == {e["name"] for e in experts}
    assert isinstance(lms["peft"].model, PeftModel)
    assert not isinstance(lms["mixture"].model, PeftModel)
    from concilium.experts.moe.lora_mixture import LoRAMixture

    bank = lms["mixture"].bank
    row_sets: list[list[object]] = []
    set_rows, mixture_forward = bank.set_rows, LoRAMixture.forward
    applied = dict.fromkeys(lms, 0)  # LoRA applications through our stacked-adapter kernels
    engine = ["mixture"]

    def spy_set_rows(adapters: list[object]) -> None:
        row_sets.append(list(adapters))
        set_rows(adapters)

    def spy_forward(self: LoRAMixture, *a: object, **kw: object) -> object:
        applied[engine[0]] += 1
        return mixture_forward(self, *a, **kw)

    bank.set_rows = spy_set_rows
    monkeypatch.setattr(LoRAMixture, "forward", spy_forward)
    texts = {}
    for e, lm in lms.items():
        engine[0] = e
        texts[e] = [g.text for g in lm.generate_batch(reqs)]
    assert texts["mixture"] == texts["peft"]
    # the mixture engine decoded the batch through its bank (one row set for the whole batch)
    assert row_sets == [[r.adapter for r in reqs]]
    assert applied["mixture"] > 0 and applied["peft"] == 0
    tok = lms["peft"].tokenizer
    ids = tok(["Reverse this word: abc"], return_tensors="pt")["input_ids"]
    logits = {}
    for e, lm in lms.items():
        from concilium.experts.decode import _adapter_kwargs

        kw = _adapter_kwargs(lm, [GenRequest([], GenParams(), experts[1]["name"])])
        with torch.inference_mode():
            logits[e] = lm.model(input_ids=ids, **kw).logits
    torch.testing.assert_close(logits["mixture"], logits["peft"], atol=1e-4, rtol=1e-4)


def test_mixture_engine_rejects_unknown_engines(pack: dict) -> None:  # type: ignore[type-arg]
    from concilium.errors import InvalidInput

    with pytest.raises(InvalidInput, match="engine"):
        LocalCausalLM(pack["dir"] / pack["manifest"]["base"]["path"], engine="vllm")


def test_moe_base_runs_on_our_kernels_with_the_stock_outputs(pack: dict) -> None:  # type: ignore[type-arg]
    base = pack["dir"] / pack["manifest"]["base"]["path"]
    ours = LocalCausalLM(base, max_adapters=1)
    stock = LocalCausalLM(base, max_adapters=1, moe=MoEOptions(backend=None))
    assert ours.moe.patch is not None and stock.moe.patch is None
    e = pack["manifest"]["experts"][0]
    for lm in (ours, stock):
        lm.ensure_adapter(e["name"], pack["dir"] / e["path"])
    msgs = [{"role": "user", "content": _row(pack, e["name"])["query"]}]
    for adapter in (e["name"], None):
        a = ours.generate(msgs, GenParams(max_tokens=24), adapter).text
        assert a == stock.generate(msgs, GenParams(max_tokens=24), adapter).text


def test_a_tiered_moe_base_keeps_half_its_experts_and_answers_the_same(pack: dict) -> None:  # type: ignore[type-arg]
    base = pack["dir"] / pack["manifest"]["base"]["path"]
    full = LocalCausalLM(base, max_adapters=1)
    tiered = LocalCausalLM(base, max_adapters=1, moe=MoEOptions(resident_experts=4))
    assert full.moe.tiers is None and tiered.moe.tiers is not None
    e = pack["manifest"]["experts"][0]
    msgs = [{"role": "user", "content": _row(pack, e["name"])["query"]}]
    for lm in (full, tiered):
        lm.ensure_adapter(e["name"], pack["dir"] / e["path"])
    for adapter in (e["name"], None):
        want = full.generate(msgs, GenParams(max_tokens=24), adapter)
        got = tiered.generate(msgs, GenParams(max_tokens=24), adapter)
        assert got.text == want.text
    stats = tiered.moe.info()
    assert stats["moe_layers"] == 4 and stats["tier_misses"] > 0 and stats["tier_bytes_moved"] > 0
    assert 0 < stats["tier_hit_rate"] < 1 and stats["tier_prefetched"] > 0
    assert all(len(c.resident) <= 4 for c in tiered.moe.tiers.caches)
    tiered.moe.close()


def test_tiering_a_dense_base_or_too_many_experts_is_a_config_error(pack: dict) -> None:  # type: ignore[type-arg]
    from concilium.errors import ConfigError

    base = pack["dir"] / pack["manifest"]["base"]["path"]
    with pytest.raises(ConfigError, match="resident_experts 9"):
        LocalCausalLM(base, max_adapters=1, moe=MoEOptions(resident_experts=9))
