"""The demo skills: tasks with exact, checkable answers.

Each :class:`Skill` has a seeded payload generator, a pure-Python ``solve(payload) -> str`` and
three disjoint template sets (see :mod:`concilium.pack.templates`). A query is
``f"{template}: {payload}"`` — the payload always follows the last ``": "``.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from concilium.pack.templates import TEMPLATES

VOWELS = "aeiou"
CONSONANTS = "".join(c for c in string.ascii_lowercase if c not in VOWELS)

PayloadFn = Callable[[random.Random], str]
SolveFn = Callable[[str], str]


@dataclass(frozen=True, slots=True)
class Skill:
    """One skill: what it does, how to make payloads, how to solve them, how to ask for it."""

    name: str
    description: str
    category: str
    make_payload: PayloadFn
    solve: SolveFn
    max_answer_len: int
    train_templates: tuple[str, ...]
    pilot_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]

    def payload(self, rng: random.Random) -> str:
        """A fresh payload whose answer differs from the payload itself."""
        while True:
            p = self.make_payload(rng)
            if self.solve(p) != p:
                return p


def make_query(template: str, payload: str) -> str:
    """The natural-language query: instruction, a colon, a space, the payload."""
    return f"{template}: {payload}"


def split_query(query: str) -> tuple[str, str]:
    """(instruction, payload) of a query; the payload follows the last ': '."""
    head, sep, payload = query.rpartition(": ")
    if not sep:
        raise ValueError(f"query {query!r} has no ': <payload>' suffix")
    return head, payload


# ---------------------------------------------------------------- payload generators


def word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    """A pronounceable-ish lowercase pseudo-word of lo..hi distinct letters, with a vowel.

    Letters never repeat: a tiny char-level model copies by content, and repeats make that
    ambiguous, so the demo's payloads avoid them (``solve`` handles any input).
    """
    n = rng.randint(lo, hi)
    start = rng.randint(0, 1)
    kinds = [(i + start) % 2 == 1 for i in range(n)]  # True = vowel slot
    if rng.random() < 0.3:  # break the strict alternation now and then
        i = rng.randrange(n)
        kinds[i] = not kinds[i]
    if all(kinds) or not any(kinds) or sum(kinds) > len(VOWELS):
        kinds = [i % 2 == 1 for i in range(n)]
    vowels = iter(rng.sample(VOWELS, sum(kinds)))
    consonants = iter(rng.sample(CONSONANTS, n - sum(kinds)))
    return "".join(next(vowels) if k else next(consonants) for k in kinds)


def mixed_case_word(rng: random.Random) -> str:
    """A pseudo-word with random per-letter case."""
    return "".join(c.upper() if rng.random() < 0.5 else c for c in word(rng))


def digits(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    """A string of lo..hi distinct decimal digits (see `word` for why distinct)."""
    return "".join(rng.sample(string.digits, rng.randint(lo, hi)))


# ---------------------------------------------------------------- solvers


def caesar3(s: str) -> str:
    """Shift lowercase letters three places forward, wrapping z to c."""
    shift = str.maketrans(string.ascii_lowercase, string.ascii_lowercase[3:] + "abc")
    return s.translate(shift)


def increment_digits(s: str) -> str:
    """Every digit plus one, 9 wrapping to 0."""
    return s.translate(str.maketrans("0123456789", "1234567890"))


SKILL_ROWS: tuple[tuple[str, str, str, PayloadFn, SolveFn, int], ...] = (
    # name, description, category, payload, solve, max answer length
    ("reverse", "Reverses a word letter by letter.", "string-reversal", word, lambda s: s[::-1], 7),
    (
        "uppercase",
        "Converts a word to upper case.",
        "case-conversion",
        mixed_case_word,
        str.upper,
        7,
    ),
    (
        "rotate",
        "Moves the first letter of a word to the end.",
        "string-rotation",
        word,
        lambda s: s[1:] + s[0],
        7,
    ),
    (
        "mask-vowels",
        "Replaces every vowel of a word with an asterisk.",
        "vowel-masking",
        word,
        lambda s: "".join("*" if c in VOWELS else c for c in s),
        7,
    ),
    ("caesar", "Encrypts a word with a Caesar shift of 3.", "cipher", word, caesar3, 7),
    ("length", "Counts the letters of a word.", "counting", word, lambda s: str(len(s)), 1),
    (
        "remove-vowels",
        "Removes the vowels (a, e, i, o, u) from a word.",
        "vowel-removal",
        word,
        lambda s: "".join(c for c in s if c not in VOWELS),
        7,
    ),
    (
        "double-letters",
        "Writes every letter of a word twice.",
        "letter-doubling",
        word,
        lambda s: "".join(c + c for c in s),
        14,
    ),
    (
        "swapcase",
        "Swaps upper and lower case letters.",
        "case-swapping",
        mixed_case_word,
        str.swapcase,
        7,
    ),
    (
        "first-last",
        "Returns the first and the last letter of a word.",
        "letter-extraction",
        word,
        lambda s: s[0] + s[-1],
        2,
    ),
    (
        "increment-digits",
        "Adds one to every digit of a number (9 wraps to 0).",
        "digit-increment",
        digits,
        increment_digits,
        7,
    ),
    ("spell", "Spells a word with dashes between letters.", "spelling", word, "-".join, 13),
)


def _skill(row: tuple[str, str, str, PayloadFn, SolveFn, int]) -> Skill:
    name, description, category, make_payload, solve, max_len = row
    t = TEMPLATES[name]
    return Skill(
        name=name,
        description=description,
        category=category,
        make_payload=make_payload,
        solve=solve,
        max_answer_len=max_len,
        train_templates=t["train"],
        pilot_templates=t["pilot"],
        heldout_templates=t["heldout"],
    )


SKILLS: tuple[Skill, ...] = tuple(_skill(row) for row in SKILL_ROWS)
NON_DEFAULT: frozenset[str] = frozenset({"caesar", "spell"})


def skill_by_name(name: str) -> Skill:
    """The skill called `name`; ValueError naming the valid ones otherwise."""
    for s in SKILLS:
        if s.name == name:
            return s
    raise ValueError(f"unknown skill {name!r}; valid: {', '.join(s.name for s in SKILLS)}")
