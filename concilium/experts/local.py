"""A local Hugging Face causal LM with any number of LoRA adapters, decoding mixed-adapter batches.

One forward serves a batch whose rows use *different* adapters (PEFT's ``adapter_names``), so
concurrent requests for many adapters of one base share the model's matmuls. The decode loop is ours
(left padding, explicit position ids, KV cache, per-row temperature / top-p / stop / max_tokens and
token log-probabilities) because rows in one batch carry their own sampling parameters.

A row whose ``GenParams.token_routing`` is set is a per-token mixture of its candidate adapters
(engine ``"mixture"`` only): they are loaded if needed, its token router is built from their
router artifacts (cached), and it shares the batch's forwards with the single-adapter rows. Its
Generation carries the routing summary.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concilium.errors import ExpertFailed, ExpertUnavailable, InvalidInput
from concilium.experts.base import Generation, GenParams, Message, TokenRoutingParams
from concilium.experts.mixing import FIELD, MixtureRouters, MixtureRow
from concilium.experts.moe.replica import MoEOptions

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
# finds the super experts of a tiered MoE base (their outliers show on any ordinary text)
CALIBRATION_TEXT = "Reverse this word: planet. Hello, what can you do? Count the letters: 12345."


@dataclass(frozen=True, slots=True)
class GenRequest:
    """One row of a batch: chat messages, sampling parameters, adapter name (None = base)."""

    messages: Sequence[Message]
    params: GenParams
    adapter: str | None = None  # ignored when params.token_routing is set


class LocalCausalLM:
    """A base model plus an LRU of loaded adapters. Thread-safe (one forward at a time).

    `engine` applies the adapters of a mixed batch: ``"mixture"`` (default) through our MoE-LoRA
    layer, one grouped matmul per module whatever the number of adapters; ``"peft"`` through
    PEFT's ``adapter_names`` (a loop over the batch's adapters; kept as the reference).
    `moe`: a sparse-MoE base runs its expert FFNs on our kernels (`experts.moe.patch`, same
    weights, same outputs; `MoEOptions(backend=None)` keeps the stock modules) and, with
    `resident_experts`, keeps only that many experts per layer in memory (`experts.moe.replica`).
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        max_adapters: int = 64,
        max_context: int | None = None,
        engine: str = "mixture",
        moe: MoEOptions | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        )
        self.model: Any = model.eval()
        from concilium.experts.moe.replica import prepare

        moe = moe or MoEOptions()
        tiered = moe.resident_experts is not None and moe.pin_super_experts
        calibration = (
            self.tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids if tiered else None
        )
        self.moe = prepare(self.model, moe, calibration)
        if engine not in ("mixture", "peft"):
            raise InvalidInput(f"engine {engine!r}: expected 'mixture' or 'peft'")
        self.engine = engine
        self.bank: Any = None
        self.routers: Any = None  # token routers of mixture requests
        if engine == "mixture":
            from concilium.experts.adapters import AdapterBank

            self.bank = AdapterBank(self.model)
            self.routers = MixtureRouters(self.bank)
        self.max_adapters = max_adapters
        self.max_context = max_context or int(
            getattr(model.config, "max_position_embeddings", 2048)
        )
        self._adapters: OrderedDict[str, str] = OrderedDict()  # name -> path, LRU order
        self._lock = threading.RLock()
        self.num_params = sum(p.numel() for p in model.parameters())

    # -- adapters ----------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def ensure_adapter(self, name: str, path: str | Path) -> None:
        """Load an adapter (safetensors, validated at registration) unless resident; LRU-evict."""
        with self._lock:
            if name in self._adapters:
                self._adapters.move_to_end(name)
                return
            while len(self._adapters) >= self.max_adapters:
                self.unload_adapter(next(iter(self._adapters)))
            self._load(name, Path(path))
            self._adapters[name] = str(path)

    def _load(self, name: str, path: Path) -> None:
        from peft import PeftModel

        if not (path / "adapter_model.safetensors").is_file():
            raise InvalidInput(f"adapter {name!r}: {path} has no adapter_model.safetensors")
        if self.bank is not None:
            self.bank.add(name, path)
        elif isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if self._adapters.pop(name, None) is None:
                return
            if self.bank is not None:
                self.bank.remove(name)
            else:
                self.model.delete_adapter(name)

    # -- generation ----------------------------------------------------------------------------
    def prompt(self, messages: Sequence[Message]) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return str(
                tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            )
        return "\n".join(m["content"] for m in messages) + "\n"

    def generate(
        self, messages: Sequence[Message], params: GenParams, adapter: str | None = None
    ) -> Generation:
        return self.generate_batch([GenRequest(messages, params, adapter)])[0]

    def generate_batch(self, requests: Sequence[GenRequest]) -> list[Generation]:
        """Decode all rows together, each with its own adapter (or token-level mixture of
        adapters) and sampling parameters."""
        if not requests:
            return []
        with self._lock:
            return _decode(self, requests)

    def generate_stream(self, request: GenRequest, emit: Callable[[str], bool]) -> Generation:
        """Decode one request, calling `emit(delta)` as text becomes final; emit False aborts."""
        with self._lock:
            sent = [0]

            def on_step(rows: Sequence[_Row]) -> bool:
                text = rows[0].settled()
                if len(text) > sent[0]:
                    delta, sent[0] = text[sent[0] :], len(text)
                    return emit(delta)
                return True

            gen = _decode(self, [request], on_step)[0]
            if len(gen.text) > sent[0]:
                emit(gen.text[sent[0] :])
            return gen

    # -- token-level mixtures -----------------------------------------------------------------
    def _rows(self, requests: Sequence[GenRequest]) -> list[str | MixtureRow | None]:
        """Each row's adapter, or its MixtureRow (candidates loaded: all must fit the LRU)."""
        mixed = [r.params.token_routing for r in requests]
        singles = {r.adapter for r, m in zip(requests, mixed, strict=True) if m is None}
        singles.discard(None)
        for name in singles:
            if name not in self._adapters:
                raise ExpertFailed(f"adapter {name!r} is not loaded on this replica")
        needed = singles | {n for m in mixed if m is not None for n, _ in m.adapters}
        if len(needed) > self.max_adapters:
            raise ExpertUnavailable(
                f"this batch needs {len(needed)} adapters; the replica holds {self.max_adapters}"
            )
        for name in [n for n in needed if n in self._adapters]:  # keep them through the loads
            self._adapters.move_to_end(name)  # type: ignore[arg-type]
        return [
            r.adapter if m is None else self._mixture_row(m)
            for r, m in zip(requests, mixed, strict=True)
        ]

    def _mixture_row(self, tr: TokenRoutingParams) -> MixtureRow:
        if self.bank is None:
            raise InvalidInput("token-level mixtures need engine 'mixture'", field=FIELD)
        if not tr.adapters:
            raise InvalidInput("token_routing names no candidate adapters", field=FIELD)
        for name, path in tr.adapters:
            self.ensure_adapter(name, path)
        return self.routers.row(tr)

    def measure_latency(self, tokens: int = 16) -> dict[str, float]:
        """Latency profile: fixed overhead and per-token time of a short greedy generation (ms)."""
        msgs = [{"role": "user", "content": "profile"}]
        t0 = time.perf_counter()
        self.generate(msgs, GenParams(max_tokens=1))
        t1 = time.perf_counter()
        g = self.generate(msgs, GenParams(max_tokens=tokens, stop=()))
        t2 = time.perf_counter()
        per_token = (t2 - t1) / max(g.completion_tokens, 1) * 1000
        return {"latency_ms_overhead": (t1 - t0) * 1000, "latency_ms_per_token": per_token}


def _decode(
    lm: LocalCausalLM,
    requests: Sequence[GenRequest],
    on_step: Callable[[Sequence[_Row]], bool] | None = None,
) -> list[Generation]:
    """Greedy/sampled decode of all rows; `on_step(rows)` after each token, False stops early."""
    import torch

    tok = lm.tokenizer
    prompts = [lm.prompt(r.messages) for r in requests]
    enc = tok(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    ids, attn = enc["input_ids"], enc["attention_mask"]  # [B, T]
    budget = lm.max_context - ids.shape[1]
    if budget <= 0:
        raise InvalidInput(
            f"prompt of {ids.shape[1]} tokens exceeds the context of {lm.max_context}",
            field="messages",
        )
    max_new = [min(r.params.max_tokens, budget) for r in requests]
    kw = _adapter_kwargs(lm, requests)
    mixtures: dict[int, MixtureRow] = dict(lm.bank.mixtures) if lm.bank is not None else {}
    gens = [_Row(r.params, tok, n) for r, n in zip(requests, max_new, strict=True)]
    with torch.inference_mode():
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        _mark_valid(lm, mixtures, attn.bool())
        out = lm.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **kw)
        for _ in range(max(max_new)):
            logits = out.logits[:, -1, :].float()  # [B, V]
            nxt = torch.stack([g.step(logits[i]) for i, g in enumerate(gens)])  # [B]
            if all(g.done for g in gens) or (on_step is not None and not on_step(gens)):
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            _mark_valid(lm, mixtures, torch.tensor([[not g.done] for g in gens]))
            out = lm.model(
                input_ids=nxt[:, None],
                attention_mask=attn,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
                **kw,
            )
    prompt_lens = attn[:, : ids.shape[1]].sum(-1).tolist()
    out_gens = [g.result(int(n)) for g, n in zip(gens, prompt_lens, strict=True)]
    for i, row in mixtures.items():
        out_gens[i] = dataclasses.replace(out_gens[i], routing_summary=row.summary())
    return out_gens


def _adapter_kwargs(lm: LocalCausalLM, requests: Sequence[GenRequest]) -> dict[str, Any]:
    """Forward kwargs for the batch's adapters (the bank, if any, is set up for its rows)."""
    rows = lm._rows(requests)
    if lm.bank is not None:
        lm.bank.set_rows(rows)
        return {}
    if not lm._adapters:
        return {}
    return {"adapter_names": [r.adapter or BASE for r in requests]}


def _mark_valid(lm: LocalCausalLM, mixtures: dict[int, MixtureRow], valid: Any) -> None:
    """Tell the bank which tokens of the next forward are real (mixture statistics only)."""
    if mixtures and lm.bank is not None:
        lm.bank.valid = valid


class _Row:
    """Per-row sampling state: chosen tokens, log-probs, stop handling."""

    def __init__(self, params: GenParams, tok: Any, max_new: int) -> None:
        import torch

        self.params, self.tok, self.max_new = params, tok, max_new
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.done = max_new <= 0
        self.finish = "length"
        self.text = ""
        self.gen = None
        if params.seed is not None:
            self.gen = torch.Generator().manual_seed(params.seed)

    def step(self, logits: Any) -> Any:
        import torch

        pad = torch.tensor(self.tok.pad_token_id)
        if self.done:
            return pad
        if len(self.ids) < self.params.min_tokens and self.tok.eos_token_id is not None:
            logits = logits.clone()
            logits[self.tok.eos_token_id] = float("-inf")
        logp = torch.log_softmax(logits, -1)  # [V]
        nxt = self._sample(logits)
        if nxt == self.tok.eos_token_id:
            self.done, self.finish = True, "stop"
            return pad
        self.ids.append(nxt)
        self.logprobs.append(float(logp[nxt]))
        self._check_stop()
        return torch.tensor(nxt)

    def _sample(self, logits: Any) -> int:
        import torch

        t = self.params.temperature
        if t <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / t, -1)
        if self.params.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(-1) - sp < self.params.top_p
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.gen))

    def _check_stop(self) -> None:
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.params.stop:
            cut = self.text.find(s)
            if cut >= 0:
                self.text, self.done, self.finish = self.text[:cut], True, "stop"
                return
        if len(self.ids) >= self.max_new:
            self.done = True

    def settled(self) -> str:
        """The text that no later stop sequence can retract (all of it once done)."""
        if self.done or not self.params.stop:
            return self.text
        hold = max(len(s) for s in self.params.stop) - 1
        return self.text[: max(len(self.text) - hold, 0)]

    def result(self, prompt_tokens: int) -> Generation:
        if not self.params.stop:
            self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        mean_lp = sum(self.logprobs) / len(self.logprobs) if self.logprobs else None
        return Generation(
            text=self.text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(self.ids),
            finish_reason=self.finish,
            mean_logprob=mean_lp,
        )
