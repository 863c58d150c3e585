"""The decode loop of `LocalCausalLM`: one mixed-adapter batch, each row with its own sampling.

Left padding, explicit position ids, KV cache, per-row temperature / top-p / stop / max_tokens and
token log-probabilities — ours, because the rows of one batch carry their own parameters.

A request is a *logical* row; the batch holds *physical* rows. Most requests are one physical
row each. A request with ``params.fusion`` (a logit-level ensemble of one model's adapters) is one
physical row per member: every step the members' next-token distributions are mixed with the
gate weights, p(y) = Σₖ wₖ·pₖ(y), one token is chosen from the mixture for the request, and the
same token is fed to all of its members.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from concilium.errors import InvalidInput
from concilium.experts.base import Generation, GenParams, Message

if TYPE_CHECKING:
    from concilium.experts.local import LocalCausalLM
    from concilium.experts.mixing import MixtureRow

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
FUSION_FIELD = "routing.fusion"


@dataclass(frozen=True, slots=True)
class GenRequest:
    """One row of a batch: chat messages, sampling parameters, adapter name (None = base)."""

    messages: Sequence[Message]
    params: GenParams
    adapter: str | None = None  # ignored when params.token_routing or params.fusion is set
    adapter_path: str | None = None  # set: the adapter is (re)loaded if another evicted it


@dataclass(frozen=True, slots=True)
class _Layout:
    """Physical rows of a batch and, per request, its rows and log mixture weights."""

    rows: list[GenRequest]
    loads: list[tuple[str, str]]  # (name, dir) of the fusion members' adapters
    groups: list[list[int]]  # request -> its physical rows
    log_weights: list[Any]  # request -> [members] log weights (tensor), None for a plain row

    @property
    def owner(self) -> list[int]:
        """Physical row -> its request."""
        return [i for i, g in enumerate(self.groups) for _ in g]


def _layout(requests: Sequence[GenRequest]) -> _Layout:
    import torch

    rows: list[GenRequest] = []
    loads: list[tuple[str, str]] = []
    groups: list[list[int]] = []
    log_weights: list[Any] = []
    for r in requests:
        f = r.params.fusion
        if f is None:
            if r.adapter is not None and r.adapter_path is not None:
                loads.append((r.adapter, r.adapter_path))
            groups.append([len(rows)])
            rows.append(r)
            log_weights.append(None)
            continue
        if r.params.token_routing is not None:
            raise InvalidInput(
                "a logit-level ensemble cannot also be a token-level mixture", field=FUSION_FIELD
            )
        plain = dataclasses.replace(r.params, fusion=None)
        loads += f.adapters()
        groups.append(list(range(len(rows), len(rows) + len(f.members))))
        rows += [GenRequest(r.messages, plain, None if m is None else m[0]) for m in f.members]
        total = sum(f.weights)
        log_weights.append(torch.tensor([math.log(max(w / total, 1e-30)) for w in f.weights]))
    return _Layout(rows, loads, groups, log_weights)


def decode(
    lm: LocalCausalLM,
    requests: Sequence[GenRequest],
    on_step: Callable[[Sequence[Row]], bool] | None = None,
) -> list[Generation]:
    """Greedy/sampled decode of all requests; `on_step(rows)` after each token, False stops."""
    import torch

    tok = lm.tokenizer
    lay = _layout(requests)
    prompts = [lm.prompt(r.messages) for r in lay.rows]
    enc = tok(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    ids, attn = enc["input_ids"], enc["attention_mask"]  # [B, T] physical rows
    # each request's own prompt length [N] (not the padded width: positions are per row)
    lens = [int(attn[g[0]].sum()) for g in lay.groups]
    if max(lens) >= lm.max_context:
        raise InvalidInput(
            f"prompt of {max(lens)} tokens exceeds the context of {lm.max_context}",
            field="messages",
        )
    max_new = [
        min(r.params.max_tokens, lm.max_context - n) for r, n in zip(requests, lens, strict=True)
    ]
    kw = _adapter_kwargs(lm, lay.rows, lay.loads)
    mixtures: dict[int, MixtureRow] = dict(lm.bank.mixtures) if lm.bank is not None else {}
    gens = [Row(r.params, tok, n, lm.eos_ids) for r, n in zip(requests, max_new, strict=True)]
    owner = torch.tensor(lay.owner)  # [B]
    with torch.inference_mode():
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        _mark_valid(lm, mixtures, attn.bool())
        out = lm.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **kw)
        for _ in range(max(max_new)):
            logits = out.logits[:, -1, :].float()  # [B, V]
            nxt = torch.stack([g.step(_fused(logits, lay, i)) for i, g in enumerate(gens)])
            if all(g.done for g in gens) or (on_step is not None and not on_step(gens)):
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            live = torch.tensor([[not g.done] for g in gens])
            _mark_valid(lm, mixtures, live[owner])
            out = lm.model(
                input_ids=nxt[owner][:, None],
                attention_mask=attn,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
                **kw,
            )
    prompt_lens = attn[:, : ids.shape[1]].sum(-1).tolist()
    out_gens = [g.result(int(prompt_lens[lay.groups[i][0]])) for i, g in enumerate(gens)]
    for row, mixture in mixtures.items():
        i = lay.owner[row]
        out_gens[i] = dataclasses.replace(out_gens[i], routing_summary=mixture.summary())
    return out_gens


def _fused(logits: Any, lay: _Layout, i: int) -> Any:
    """Request i's next-token logits [V]: its row's, or the log of its members' mixture."""
    import torch

    group, logw = lay.groups[i], lay.log_weights[i]
    if logw is None:
        return logits[group[0]]
    return torch.logsumexp(logw[:, None] + torch.log_softmax(logits[group], -1), dim=0)


def _adapter_kwargs(
    lm: LocalCausalLM, requests: Sequence[GenRequest], loads: Sequence[tuple[str, str]] = ()
) -> dict[str, Any]:
    """Forward kwargs for the batch's adapters (the bank, if any, is set up for its rows)."""
    rows = lm._rows(requests, loads)
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


def end_tokens(tok: Any, generation_config: Any) -> frozenset[int]:
    """The tokenizer's eos id and every eos id a model's generation_config lists (int or list)."""
    ids = [tok.eos_token_id, getattr(generation_config, "eos_token_id", None)]
    flat = [i for x in ids for i in (x if isinstance(x, list | tuple) else [x])]
    return frozenset(int(i) for i in flat if i is not None)


class Row:
    """Per-request sampling state: chosen tokens, log-probs, stop handling."""

    def __init__(
        self, params: GenParams, tok: Any, max_new: int, eos: frozenset[int] | None = None
    ) -> None:
        import torch

        self.params, self.tok, self.max_new = params, tok, max_new
        # every end-of-sequence token (a generation_config may list several: Llama-3's eot too)
        self.eos = eos if eos is not None else end_tokens(tok, None)
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
        if len(self.ids) < self.params.min_tokens and self.eos:
            logits = logits.clone()
            logits[list(self.eos)] = float("-inf")
        logp = torch.log_softmax(logits, -1)  # [V]
        nxt = self._sample(logits)
        if nxt in self.eos:
            self.done, self.finish = True, "stop"
            return pad
        self.ids.append(nxt)
        self.logprobs.append(float(logp[nxt]))
        self._check_stop()
        return torch.tensor(nxt)

    def _sample(self, logits: Any) -> int:
        import torch

        t = self.params.temperature
        scaled = logits / t if t > 0 else logits
        if t <= 0 or not bool(torch.isfinite(scaled.max())):  # t → 0 (past float range): greedy
            return int(logits.argmax())
        probs = torch.softmax(scaled, -1)
        if self.params.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(-1) - sp < self.params.top_p
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.gen))

    def _check_stop(self) -> None:
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        cuts = [c for c in (self.text.find(s) for s in self.params.stop) if c >= 0]
        if cuts:  # the earliest stop string, whichever of them the caller listed first
            self.text, self.done, self.finish = self.text[: min(cuts)], True, "stop"
            return
        if len(self.ids) >= self.max_new:
            self.done = True

    def settled(self) -> str:
        """The text that no later stop sequence can retract (all of it once done)."""
        if self.done:
            return self.text
        text = self.text.rstrip("\ufffd")  # a character whose last bytes are still to come
        if not self.params.stop:
            return text
        hold = max(len(s) for s in self.params.stop) - 1
        return text[: max(len(text) - hold, 0)]

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
