"""Per-domain splits: training pairs, pilot queries, and the held-out retrieval set.

The items of a domain are shuffled by a generator seeded with ``(seed, domain)``; the first
``n_eval`` form the held-out set (their documents are the domain's retrieval corpus and their
queries the test queries), the rest are training pairs. Pilots are drawn from the training pairs
only, so no test query or test document is ever trained on or used for routing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from concilium.embedpack.corpus import Item

__all__ = ["DomainSplit", "split_domain"]


@dataclass(frozen=True, slots=True)
class DomainSplit:
    """The fixed item sets of one domain."""

    domain: str
    train: tuple[Item, ...]
    heldout: tuple[Item, ...]


def split_domain(
    domain: str, items: Sequence[Item], *, seed: int, n_eval: int, max_train: int
) -> DomainSplit:
    """Shuffle deterministically; the first `n_eval` items are held out, up to `max_train` train."""
    if len(items) < n_eval + 2:
        raise ValueError(f"domain {domain!r} has {len(items)} items, needs more than {n_eval + 1}")
    order = list(items)
    random.Random(f"{seed}/{domain}").shuffle(order)
    return DomainSplit(
        domain=domain,
        train=tuple(order[n_eval : n_eval + max_train]),
        heldout=tuple(order[:n_eval]),
    )
