"""Fusing an ensemble's answers with the gate weights (MoE²).

Each member's vote is its gate weight times its own confidence, exp(mean token log-probability)
when the expert reports it (1 otherwise; a NaN one gives no confidence, as −inf does). Answers
are compared after whitespace normalisation:

* where members agree (comparable answers), the answer with the most weight wins — a weighted
  vote, so two cheaper experts that agree can outvote one stronger expert that does not;
* where every answer differs, that reduces to gate-weighted selection: the member with the
  highest weight × confidence answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Vote:
    """One member's answer for fusion."""

    expert: str
    text: str
    gate: float  # the member's gate weight
    mean_logprob: float | None = None

    @property
    def weight(self) -> float:
        lp = self.mean_logprob
        conf = 1.0 if lp is None else 0.0 if math.isnan(lp) else math.exp(min(lp, 0.0))
        return max(self.gate, 0.0) * conf


@dataclass(frozen=True, slots=True)
class Fused:
    """The fused answer: the winning member, the answer's share of the weight, and the tallies."""

    winner: int  # index into the votes of the member whose text is returned
    support: float  # weight of the winning answer / total weight
    tallies: dict[str, float]  # normalised answer → weight
    mode: str  # "vote" when some members agreed, else "select"


def normalise(text: str) -> str:
    return " ".join(text.split())


def fuse(votes: Sequence[Vote]) -> Fused:
    """Weighted vote over normalised answers (gate-weighted selection when all differ)."""
    if not votes:
        raise ValueError("nothing to fuse")
    tallies: dict[str, float] = {}
    for v in votes:
        key = normalise(v.text)
        tallies[key] = tallies.get(key, 0.0) + v.weight
    total = sum(tallies.values())
    best_text = max(tallies, key=lambda k: (tallies[k], -_first(votes, k)))
    members = [i for i, v in enumerate(votes) if normalise(v.text) == best_text]
    winner = max(members, key=lambda i: votes[i].weight)
    agreed = len(tallies) < len(votes)
    return Fused(
        winner=winner,
        support=tallies[best_text] / total if total > 0 else 1.0 / len(tallies),
        tallies=tallies,
        mode="vote" if agreed else "select",
    )


def _first(votes: Sequence[Vote], key: str) -> int:
    """Position of the first member giving `key` (ties go to the higher-ranked member)."""
    return next(i for i, v in enumerate(votes) if normalise(v.text) == key)
