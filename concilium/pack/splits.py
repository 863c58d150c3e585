"""Per-skill query splits: pilot examples, gate-training examples and held-out evaluation queries.

Payloads are unique across a skill's three splits, so held-out payloads never appear in pilots or
train examples. Each split is drawn from its own template set (see :mod:`concilium.pack.templates`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from concilium.pack.data import unique_queries
from concilium.pack.tasks import SKILLS, Skill

QA = tuple[str, str]


@dataclass(frozen=True, slots=True)
class SkillSplit:
    """The fixed query sets of one skill."""

    skill: Skill
    pilots: tuple[QA, ...]
    train_examples: tuple[QA, ...]
    heldout: tuple[QA, ...]


def skill_split(skill: Skill, seed: int, n_pilots: int, n_train: int, n_heldout: int) -> SkillSplit:
    """Draw one skill's splits from a generator seeded by (seed, skill name)."""
    rng = random.Random(f"{seed}/{skill.name}")
    used: set[str] = set()
    pilots = unique_queries(skill, skill.pilot_templates, n_pilots, rng, used)
    train = unique_queries(skill, skill.train_templates, n_train, rng, used)
    heldout = unique_queries(skill, skill.heldout_templates, n_heldout, rng, used)
    return SkillSplit(skill, tuple(pilots), tuple(train), tuple(heldout))


def make_splits(
    seed: int, n_pilots: int = 12, n_train: int = 48, n_heldout: int = 60
) -> tuple[SkillSplit, ...]:
    """Splits of every skill, in SKILLS order."""
    return tuple(skill_split(s, seed, n_pilots, n_train, n_heldout) for s in SKILLS)
