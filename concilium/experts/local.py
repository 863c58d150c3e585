"""A local Hugging Face causal LM with any number of LoRA adapters, decoding mixed-adapter batches.

One forward serves a batch whose rows use *different* adapters (PEFT's ``adapter_names``), so
concurrent requests for many adapters of one base share the model's matmuls. The decode loop
(`experts/decode.py`) is ours because rows in one batch carry their own sampling parameters; it also
runs logit-level ensembles of adapters (``GenParams.fusion``).

A row whose ``GenParams.token_routing`` is set is a per-token mixture of its candidate adapters
(engine ``"mixture"`` only): they are loaded if needed, its token router is built from their
router artifacts (cached), and it shares the batch's forwards with the single-adapter rows. Its
Generation carries the routing summary.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from concilium.errors import ExpertFailed, ExpertUnavailable, InvalidInput
from concilium.experts.base import Generation, GenParams, Message, TokenRoutingParams
from concilium.experts.decode import GenRequest, Row, decode, end_tokens
from concilium.experts.mixing import FIELD, MixtureRouters, MixtureRow
from concilium.experts.moe.replica import MoEOptions

# finds the super experts of a tiered MoE base (their outliers show on any ordinary text)
CALIBRATION_TEXT = "Reverse this word: planet. Hello, what can you do? Count the letters: 12345."


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
        self.eos_ids = end_tokens(self.tokenizer, getattr(model, "generation_config", None))
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
            elif self._adapters:
                self.model.delete_adapter(name)
            else:  # PEFT keeps its deleted last adapter active: unwrap the base instead
                self.model = self.model.unload().eval()

    # -- generation ----------------------------------------------------------------------------
    def prompt(self, messages: Sequence[Message]) -> str:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return "\n".join(m["content"] for m in messages) + "\n"
        from jinja2 import TemplateError  # what apply_chat_template renders with

        try:
            text = tok.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=False
            )
        except TemplateError as e:  # the template refuses them (a system role, no alternation)
            raise InvalidInput(f"this model's chat template: {e}", field="messages") from None
        return str(text)

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
            return decode(self, requests)

    def generate_stream(self, request: GenRequest, emit: Callable[[str], bool]) -> Generation:
        """Decode one request, calling `emit(delta)` as text becomes final; emit False aborts.
        Every token calls it ("" while nothing new settled), so a consumer that left is heard."""
        with self._lock:
            sent = [0]

            def on_step(rows: Sequence[Row]) -> bool:
                text = rows[0].settled()
                delta, sent[0] = text[sent[0] :], max(len(text), sent[0])
                return emit(delta)

            gen = decode(self, [request], on_step)[0]
            if len(gen.text) > sent[0]:
                emit(gen.text[sent[0] :])
            return gen

    # -- token-level mixtures -----------------------------------------------------------------
    def _rows(
        self, requests: Sequence[GenRequest], loads: Sequence[tuple[str, str]] = ()
    ) -> list[str | MixtureRow | None]:
        """Each row's adapter, or its MixtureRow. Mixture candidates and `loads` (name, dir) are
        loaded here; every other adapter must be resident; all of them must fit the LRU."""
        mixed = [r.params.token_routing for r in requests]
        loaded_here = {n for n, _ in loads}
        singles = {r.adapter for r, m in zip(requests, mixed, strict=True) if m is None}
        singles.discard(None)
        for name in singles - loaded_here:
            if name not in self._adapters:
                raise ExpertFailed(f"adapter {name!r} is not loaded on this replica")
        needed = singles | loaded_here | {n for m in mixed if m is not None for n, _ in m.adapters}
        if len(needed) > self.max_adapters:
            raise ExpertUnavailable(
                f"this batch needs {len(needed)} adapters; the replica holds {self.max_adapters}"
            )
        for name in [n for n in needed if n in self._adapters]:  # keep them through the loads
            self._adapters.move_to_end(name)  # type: ignore[arg-type]
        for name, path in loads:
            self.ensure_adapter(name, path)
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
