"""A batch row gets what it would alone; streams never send text they must retract."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from concilium.errors import InvalidInput
from concilium.experts import local
from concilium.experts.base import GenParams, Target, TokenRoutingParams
from concilium.experts.batching import MicroBatcher
from concilium.experts.decode import Row
from concilium.experts.local import GenRequest, LocalCausalLM
from concilium.experts.pool import ExpertPool
from tests.conftest import no_hang

SKILL = "reverse"


@pytest.fixture(scope="module")
def query(pack_dir: Path) -> list[dict[str, str]]:
    rows = [json.loads(x) for x in (pack_dir / "heldout.jsonl").read_text().splitlines() if x]
    return [{"role": "user", "content": next(r for r in rows if r["skill"] == SKILL)["query"]}]


def test_a_short_row_beside_a_long_prompt_gets_its_own_token_budget(
    pack_dir: Path, query: list[dict[str, str]]
) -> None:
    lm = LocalCausalLM(pack_dir / "base", max_adapters=1)
    lm.ensure_adapter(SKILL, pack_dir / "adapters" / SKILL)
    alone = lm.generate(query, GenParams(max_tokens=40), SKILL)
    long = [{"role": "user", "content": "x" * (lm.max_context - 6)}]  # leaves ~3 tokens
    assert (
        len(lm.tokenizer(lm.prompt(long))["input_ids"]) > lm.max_context - alone.completion_tokens
    )
    batched = lm.generate_batch(
        [GenRequest(query, GenParams(max_tokens=40), SKILL), GenRequest(long, GenParams(), None)]
    )
    assert (batched[0].text, batched[0].finish_reason) == (alone.text, alone.finish_reason)
    assert batched[1].completion_tokens <= lm.max_context - len(lm.tokenizer(lm.prompt(long))[0])


def test_one_bad_request_in_a_batch_fails_only_itself(
    pack_dir: Path, query: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = str(pack_dir.absolute() / "base")
    adapter = str(pack_dir.absolute() / "adapters" / SKILL)
    good = Target(SKILL, "lora", "demo-moe", base, SKILL, adapter)
    plain = Target("demo-moe", "model", "demo-moe", base)
    too_long = [{"role": "user", "content": "x" * 400}]
    no_gate = GenParams(token_routing=TokenRoutingParams("phatgoose", 1, ((SKILL, adapter),)))

    async def go() -> list[Any]:
        pool = ExpertPool(max_adapters=2, batch_window_ms=500)  # all three share one batch
        try:
            await pool.chat(good, query, GenParams(max_tokens=1))  # loaded before the batch
            return await asyncio.gather(
                pool.chat(good, query, GenParams(max_tokens=40)),
                pool.chat(plain, too_long, GenParams(max_tokens=4)),
                pool.chat(plain, query, no_gate),
                return_exceptions=True,
            )
        finally:
            await pool.aclose()

    batches: list[list[str | None]] = []  # each decode's rows, by adapter
    generate_batch = LocalCausalLM.generate_batch

    def spy(self: LocalCausalLM, requests: Sequence[GenRequest]) -> list[Any]:
        batches.append([r.adapter for r in requests])
        return generate_batch(self, requests)

    monkeypatch.setattr(LocalCausalLM, "generate_batch", spy)
    with no_hang(120, "the pool"):
        ok, long_err, gate_err = asyncio.run(go())
    # the warm-up, then one batch of all three (it fails), then each row again on its own
    assert [len(b) for b in batches] == [1, 3, 1, 1, 1], batches
    assert sorted(map(str, batches[1])) == sorted(map(str, [SKILL, None, None]))
    assert sorted(str(a) for b in batches[2:] for a in b) == sorted(map(str, batches[1]))
    monkeypatch.undo()
    assert isinstance(long_err, InvalidInput) and "exceeds the context" in str(long_err)
    assert isinstance(gate_err, InvalidInput) and "no phatgoose gate" in str(gate_err)
    lm = LocalCausalLM(Path(base), max_adapters=1)
    lm.ensure_adapter(SKILL, adapter)
    assert (
        not isinstance(ok, BaseException)
        and ok.text == lm.generate(query, GenParams(max_tokens=40), SKILL).text
    )


def _byte_tokenizer() -> Any:
    """A byte-level BPE with no merges (GPT-2's alphabet): '€' is three tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["</s>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="</s>")


@pytest.mark.parametrize("stop", [(), ("zz",)])
def test_a_stream_never_sends_half_a_multibyte_character(
    monkeypatch: pytest.MonkeyPatch, stop: tuple[str, ...]
) -> None:
    import torch

    tok = _byte_tokenizer()
    answer = tok("a€b", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def scripted_decode(
        lm: Any, requests: Sequence[GenRequest], on_step: Callable[[Sequence[Row]], bool]
    ) -> list[Any]:  # the decode loop's Row and on_step protocol, with scripted logits
        row = Row(requests[0].params, tok, 16)
        for t in answer:
            logits = torch.full((len(tok),), -1e9)
            logits[t] = 0.0
            row.step(logits)
            if row.done or not on_step([row]):
                break
        return [row.result(0)]

    monkeypatch.setattr(local, "decode", scripted_decode)
    stub = SimpleNamespace(_lock=threading.RLock())
    pieces: list[str] = []
    request = GenRequest([], GenParams(stop=stop))
    gen = LocalCausalLM.generate_stream(stub, request, lambda t: pieces.append(t) or True)  # type: ignore[arg-type]
    assert gen.text == "a€b"
    assert "".join(pieces) == gen.text and "\ufffd" not in "".join(pieces)


def test_cancelling_the_batcher_releases_every_waiter() -> None:
    release = threading.Event()

    def fn(items: list[int]) -> list[int]:
        release.wait(10)
        return items

    async def main() -> list[Any]:
        b: MicroBatcher[int, int] = MicroBatcher(fn, max_batch=1, window_s=0.0)
        running = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.05)  # the first batch is in its worker thread
        queued = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0.01)
        b.cancel()  # the pool's aclose()
        try:
            return await asyncio.gather(running, queued, return_exceptions=True)
        finally:
            release.set()

    with no_hang(5, "the waiters"):
        out = asyncio.run(main())
    assert all(isinstance(o, asyncio.CancelledError) for o in out)


def test_concurrent_requests_for_more_adapters_than_the_lru_holds_all_answer(
    pack_dir: Path,
) -> None:
    rows = [json.loads(x) for x in (pack_dir / "heldout.jsonl").read_text().splitlines() if x]
    skills = ["reverse", "uppercase", "rotate"]
    base = str(pack_dir.absolute() / "base")

    def target(s: str) -> Target:
        return Target(s, "lora", "demo-moe", base, s, str(pack_dir.absolute() / "adapters" / s))

    def msgs(s: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": next(r for r in rows if r["skill"] == s)["query"]}]

    async def go() -> list[Any]:
        pool = ExpertPool(max_adapters=2)  # each request loads its adapter, evicting another's
        try:
            return await asyncio.gather(
                *(pool.chat(target(s), msgs(s), GenParams(max_tokens=40)) for s in skills),
                return_exceptions=True,
            )
        finally:
            await pool.aclose()

    with no_hang(120, "the pool"):
        out = asyncio.run(go())
    want = [next(r for r in rows if r["skill"] == s)["answer"] for s in skills]
    assert [getattr(g, "text", g) for g in out] == want


def test_every_eos_id_of_the_generation_config_ends_a_row() -> None:
    import torch

    from concilium.experts.decode import end_tokens

    def text(ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i) for i in ids)

    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0, decode=text)
    eos = end_tokens(tok, SimpleNamespace(eos_token_id=[2, 7]))  # Llama-3 style: eos + eot
    assert eos == {2, 7} and end_tokens(tok, None) == {2}
    logits = torch.zeros(10)
    logits[7] = 5.0  # greedy picks token 7, the generation_config's second eos
    row = Row(GenParams(max_tokens=4, temperature=0), tok, 4, eos)
    row.step(logits)
    assert row.done and row.finish == "stop" and row.ids == []
    # min_tokens masks every eos id, not only the tokenizer's
    row = Row(GenParams(max_tokens=4, temperature=0, min_tokens=1), tok, 4, eos)
    row.step(logits)
    assert not row.done and row.ids == [0]


def test_closing_the_pools_local_stream_stops_the_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's chat_stream closes the decode it wraps at once (not when collected)."""
    from concilium.experts.base import Generation, GenParams, Target
    from concilium.experts.pool import ExpertPool

    stopped = threading.Event()
    resume = threading.Event()  # the decode holds after its first token until the close began
    steps = [0]
    after_resume = [0]  # tokens the consumer accepted once the close was under way

    class SlowLM:
        def generate_stream(self, request: object, emit: object) -> Generation:
            while emit("x"):  # type: ignore[operator]
                steps[0] += 1
                if resume.is_set():
                    after_resume[0] += 1
                    if after_resume[0] > 200:  # never told to stop: fail, not hang
                        break
                elif not resume.wait(30):
                    break
            stopped.set()
            return Generation(text="", prompt_tokens=0, completion_tokens=0, finish_reason="stop")

    async def go() -> None:
        pool = ExpertPool()

        async def ready(target: Target, params: GenParams) -> SlowLM:
            return SlowLM()

        monkeypatch.setattr(pool, "_ready", ready)
        target = Target(expert="m", kind="model", model="m", model_path="-")
        stream = pool.chat_stream(target, [{"role": "user", "content": "hi"}], GenParams())
        await anext(stream)
        closing = asyncio.create_task(stream.aclose())
        await asyncio.sleep(0)  # aclose runs until it awaits the decode: the stop is signalled
        resume.set()
        await closing
        assert stopped.is_set()  # the decode was told to stop before aclose returned
        await pool.aclose()

    with no_hang(60, "the closed stream"):
        asyncio.run(go())
    # not one more token was decoded after the close: the first emit's answer said stop (or,
    # when the decode thread was preempted between queueing "x" and reading the flag, that
    # emit already answered stop: steps 0)
    assert steps[0] <= 1 and after_resume[0] == 0
