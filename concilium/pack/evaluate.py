"""Greedy generation and exact-match scoring for the demo pack.

Works on the base model, a `PeftModel` with its active adapter, or a `PeftModel` with several
adapters loaded and a per-row ``adapter_names`` list (PEFT's mixed-adapter batch; ``"__base__"``
means no adapter for that row).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from concilium.pack.data import encode
from concilium.pack.tokenizer import EOS, PAD, SPECIAL_TOKENS, format_prompt, vocab

if TYPE_CHECKING:
    import torch

BASE = "__base__"


def left_pad(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) of formatted prompts, each (B, T)."""
    import torch

    rows = [encode(p) for p in prompts]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), vocab()[PAD], dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), t), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        ids[b, t - len(r) :] = torch.tensor(r)
        mask[b, t - len(r) :] = 1
    return ids, mask


@functools.cache
def _inverse_vocab() -> dict[int, str]:
    return {i: t for t, i in vocab().items()}


def decode_answer(ids: Sequence[int]) -> str:
    """Text of generated ids up to the first eos, special tokens dropped."""
    inv = _inverse_vocab()
    eos = vocab()[EOS]
    out: list[str] = []
    for i in ids:
        if i == eos:
            break
        tok = inv.get(int(i), "")
        if tok not in SPECIAL_TOKENS:
            out.append(tok)
    return "".join(out)


def generate(
    model: Any,
    queries: Sequence[str],
    max_new_tokens: int,
    *,
    adapter_names: Sequence[str] | None = None,
    batch_size: int = 96,
) -> list[str]:
    """Greedy answers to user `queries` (chat-formatted, stopping at eos).

    `adapter_names` (one per query) routes each row to an adapter of a PeftModel.
    """
    prompts = [format_prompt(q) for q in queries]
    return generate_prompts(
        model, prompts, max_new_tokens, adapter_names=adapter_names, batch_size=batch_size
    )


def generate_prompts(
    model: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    adapter_names: Sequence[str] | None = None,
    batch_size: int = 96,
) -> list[str]:
    """Greedy answers to already formatted prompts, in batches of `batch_size`."""
    import torch

    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size])  # (B, T)
        kwargs: dict[str, Any] = {}
        if adapter_names is not None:
            kwargs["adapter_names"] = list(adapter_names[start : start + batch_size])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=vocab()[EOS],
                pad_token_id=vocab()[PAD],
                **kwargs,
            )  # (B, T + new)
        answers.extend(decode_answer(row[ids.shape[1] :].tolist()) for row in out)
    return answers


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answer."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(p == a for p, a in zip(predictions, answers, strict=True)) / len(answers)


def accuracy(
    model: Any,
    pairs: Sequence[tuple[str, str]],
    max_new_tokens: int,
    *,
    adapter: str | None = None,
) -> float:
    """Exact-match accuracy on (query, answer) pairs, all rows through `adapter` (None = as is)."""
    names = None if adapter is None else [adapter] * len(pairs)
    preds = generate(model, [q for q, _ in pairs], max_new_tokens, adapter_names=names)
    return exact_match(preds, [a for _, a in pairs])
