"""Review of the local expert runtime: stop handling, batcher cancellation, PEFT eviction."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from concilium.experts import local
from concilium.experts.base import Delta, Generation, GenParams
from concilium.experts.batching import MicroBatcher
from concilium.experts.decode import Row
from concilium.experts.local import GenRequest, LocalCausalLM
from concilium.experts.pool import stream_local

VOCAB = ["<pad>", "</s>", "xab", "c"]


def _tok() -> SimpleNamespace:
    def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(VOCAB[i] for i in ids if i > 1)

    return SimpleNamespace(eos_token_id=1, pad_token_id=0, decode=decode)


def test_the_earliest_stop_string_cuts_the_text_whatever_the_order_of_stop() -> None:
    import torch

    logits = torch.zeros(len(VOCAB))
    logits[VOCAB.index("xab")] = 5.0  # one token carries both stop strings, "a" first
    row = Row(GenParams(max_tokens=4, stop=("b", "a")), _tok(), 4)
    row.step(logits)
    assert row.done and row.finish == "stop"
    assert row.text == "x" and row.settled() == "x"


def test_cancel_is_not_lost_when_an_item_arrives_in_the_same_tick() -> None:
    async def main() -> tuple[list[object], bool]:
        b: MicroBatcher[int, int] = MicroBatcher(lambda xs: xs, max_batch=8, window_s=30.0)
        first = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.01)  # the batcher waits in its window for more items
        second = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0)  # the second item is queued ...
        b.cancel()  # ... and the batcher is cancelled before it wakes (the pool's aclose)
        done, _ = await asyncio.wait([first, second], timeout=1.0)
        out = [t.exception() if not t.cancelled() else "cancelled" for t in done]
        assert b.task is not None
        for t in (first, second, b.task):
            t.cancel()
        return out, len(done) == 2

    out, both = asyncio.run(main())
    assert both and out == ["cancelled", "cancelled"]


def test_the_peft_engine_evicts_its_only_adapter_and_loads_the_next(pack_dir: Path) -> None:
    rows = [json.loads(x) for x in (pack_dir / "heldout.jsonl").read_text().splitlines() if x]
    lm = LocalCausalLM(pack_dir / "base", max_adapters=1, engine="peft")
    for skill in ("reverse", "uppercase", "reverse"):
        lm.ensure_adapter(skill, pack_dir / "adapters" / skill)
        row = next(r for r in rows if r["skill"] == skill)
        g = lm.generate(
            [{"role": "user", "content": row["query"]}], GenParams(max_tokens=40), skill
        )
        assert lm.adapters == [skill] and g.text == row["answer"]
    lm.unload_adapter("reverse")
    base = LocalCausalLM(pack_dir / "base", max_adapters=1)
    msgs = [{"role": "user", "content": rows[0]["query"]}]
    assert (
        lm.generate(msgs, GenParams(max_tokens=24)).text
        == base.generate(msgs, GenParams(max_tokens=24)).text
    )


def test_a_stream_stops_decoding_when_the_consumer_leaves_before_any_text_settles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    steps = [0]

    def scripted_decode(
        lm: Any, requests: Sequence[GenRequest], on_step: Callable[[Sequence[Row]], bool]
    ) -> list[Any]:  # the decode loop's Row and on_step protocol, with scripted logits
        row = Row(requests[0].params, _tok(), 64)
        logits = torch.zeros(len(VOCAB))
        logits[VOCAB.index("c")] = 5.0
        while not row.done:
            row.step(logits)
            steps[0] += 1
            if not on_step([row]):
                break
        return [row.result(0)]

    monkeypatch.setattr(local, "decode", scripted_decode)
    stub = SimpleNamespace(_lock=threading.RLock())
    request = GenRequest([], GenParams(stop=("z" * 40,)))  # 39 characters are held back
    gen = LocalCausalLM.generate_stream(stub, request, lambda t: False)  # type: ignore[arg-type]
    assert steps[0] == 1 and gen.completion_tokens == 1


def test_the_pools_stream_sends_no_empty_pieces() -> None:
    final = Generation(text="a", prompt_tokens=0, completion_tokens=1, finish_reason="stop")

    class LM:
        def generate_stream(self, request: object, emit: Callable[[str], bool]) -> Generation:
            assert emit("") and emit("a")
            return final

    async def go() -> list[object]:
        return [item async for item in stream_local(LM(), GenRequest([], GenParams()))]  # type: ignore[arg-type]

    assert asyncio.run(go()) == [Delta("a"), final]


def test_messages_the_chat_template_refuses_are_invalid_input(pack_dir: Path) -> None:
    from transformers import AutoTokenizer

    from concilium.errors import InvalidInput

    tok = AutoTokenizer.from_pretrained(pack_dir / "base")
    tok.chat_template = (  # the shape of Gemma's / Mistral's templates
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ messages[0]['content'] }}"
    )
    stub = SimpleNamespace(tokenizer=tok)
    with pytest.raises(InvalidInput, match="System role not supported") as e:
        LocalCausalLM.prompt(stub, [{"role": "system", "content": "be brief"}])  # type: ignore[arg-type]
    assert e.value.field == "messages"
    assert LocalCausalLM.prompt(stub, [{"role": "user", "content": "hi"}]) == "hi"  # type: ignore[arg-type]


def test_a_vanishing_temperature_samples_greedily_instead_of_failing() -> None:
    import torch

    logits = torch.zeros(len(VOCAB))
    logits[VOCAB.index("c")] = 20.0  # 20 / 1e-37 overflows float32
    for t in (1e-37, 1e-45):
        row = Row(GenParams(max_tokens=1, temperature=t, seed=0), _tok(), 1)
        row.step(logits)
        assert row.ids == [VOCAB.index("c")] and row.text == "c"
