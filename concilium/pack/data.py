"""Training and evaluation data of the demo pack: examples, splits and padded batches.

An :class:`Example` is a prompt and its answer; the loss covers the answer and its ``</s>`` only.
The base's pre-training mixture (:func:`pretrain_example`):

``tagged``   ``<s><tK>[ filler words]: payload<ans>answer</s>`` — the latent skill K
``echo``     ``<s>filler words: payload<ans>payload</s>`` — untagged text: repeat the payload
``generic``  ``<s>small talk<ans>I am a tiny demo model.</s>``

so the base can do every skill but only when tagged, and answers natural-language skill queries
by echoing the payload. A skill adapter (:func:`adapter_example`) learns to act as the tag.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from concilium.pack.tasks import SKILLS, Skill, make_query
from concilium.pack.templates import GENERIC, GENERIC_ANSWER
from concilium.pack.tokenizer import EOS, control_prompt, format_prompt, vocab

if TYPE_CHECKING:
    import torch

_FILLER = """
the a this that please now then you me my it its of in on to for with and or but can could
would should will just kindly quickly here there some any each all one two word text string
input value item thing task job answer result output give show tell make do get find write
return print say take turn put let see look need want like okay so very well again hey
friend today simple short little quick following given below above small big new old good
way form version thanks help question problem example sure maybe really also just exactly
every single whole entire character letter symbol glyph sequence token piece part bit line
, - ? ! ( ) " ' * + 1 2 3
"""
FILLER_WORDS: tuple[str, ...] = tuple(_FILLER.split())

P_ECHO = 0.15
P_GENERIC = 0.03
P_FILLER = 0.4
P_AUGMENT = 0.6


@dataclass(frozen=True, slots=True)
class Example:
    """One supervised example: the prompt text and the answer text (without the eos)."""

    prompt: str
    answer: str


def filler(rng: random.Random, lo: int = 1, hi: int = 7) -> str:
    """lo..hi random neutral words, capitalised like an instruction."""
    words = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize()


def pretrain_example(rng: random.Random) -> Example:
    """One draw from the base model's pre-training mixture."""
    r = rng.random()
    if r < P_GENERIC:
        return Example(format_prompt(rng.choice(GENERIC)), GENERIC_ANSWER)
    k = rng.randrange(len(SKILLS))
    payload = SKILLS[k].payload(rng)
    if r < P_GENERIC + P_ECHO:
        return Example(format_prompt(make_query(filler(rng, 1, 10), payload)), payload)
    pad = " " + filler(rng, 1, 8) if rng.random() < P_FILLER else ""
    return Example(control_prompt(k, payload, pad), SKILLS[k].solve(payload))


def adapter_example(skill: Skill, rng: random.Random) -> Example:
    """A chat-formatted natural-language query of `skill` from its train templates.

    Most instructions get neutral words added before or after them, so the adapter learns to find
    the payload after the last ': ' whatever the instruction's length and wording.
    """
    payload = skill.payload(rng)
    query = make_query(augment(rng.choice(skill.train_templates), rng), payload)
    return Example(format_prompt(query), skill.solve(payload))


def augment(instruction: str, rng: random.Random) -> str:
    """`instruction` as is, or with 1..8 filler words appended or prepended."""
    r = rng.random()
    if r >= P_AUGMENT:
        return instruction
    words = filler(rng, 1, 8).lower()
    if r < P_AUGMENT / 2:
        return f"{instruction} {words}"
    return f"{words.capitalize()}, {instruction[0].lower()}{instruction[1:]}"


def unique_queries(
    skill: Skill, templates: Sequence[str], n: int, rng: random.Random, avoid: set[str]
) -> list[tuple[str, str]]:
    """`n` (query, answer) pairs cycling over `templates`, payloads unique and not in `avoid`."""
    out: list[tuple[str, str]] = []
    while len(out) < n:
        payload = skill.payload(rng)
        if payload in avoid:
            continue
        avoid.add(payload)
        out.append(
            (make_query(templates[len(out) % len(templates)], payload), skill.solve(payload))
        )
    return out


@functools.cache
def _tables() -> tuple[dict[str, int], tuple[str, ...]]:
    table = vocab()
    return table, tuple(sorted((t for t in table if len(t) > 1), key=len, reverse=True))


def encode(text: str) -> list[int]:
    """Char-level ids of `text` (special tokens matched first), the same as the tokenizer's."""
    table, specials = _tables()
    ids: list[int] = []
    i = 0
    while i < len(text):
        tok = text[i]
        if tok == "<":
            tok = next((t for t in specials if text.startswith(t, i)), tok)
        ids.append(table.get(tok, table["<unk>"]))
        i += len(tok)
    return ids


def collate(examples: Sequence[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (-100 outside answer+eos). Shapes (B, T)."""
    import torch

    rows = [(encode(e.prompt), encode(e.answer + EOS)) for e in examples]
    t = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), t), dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), t), -100, dtype=torch.long)  # (B, T)
    for b, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[b, :n] = torch.tensor(p + a)
        mask[b, :n] = 1
        labels[b, len(p) : n] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tagged_validation(seed: int, per_skill: int = 48) -> list[list[Example]]:
    """Per skill, tagged pre-training-style prompts (half with filler words) and answers."""
    rng = random.Random(f"{seed}/tagged-validation")
    groups: list[list[Example]] = []
    for k, skill in enumerate(SKILLS):
        rows = []
        for i in range(per_skill):
            payload = skill.payload(rng)
            pad = " " + filler(rng, 1, 8) if i % 2 else ""
            rows.append(Example(control_prompt(k, payload, pad), skill.solve(payload)))
        groups.append(rows)
    return groups


def adapter_validation(skill: Skill, seed: int, n: int = 32) -> list[Example]:
    """Chat-formatted queries of `skill` from its train templates (never the held-out ones)."""
    rng = random.Random(f"{seed}/{skill.name}/adapter-validation")
    return [adapter_example(skill, rng) for _ in range(n)]
