"""Skills: solvers on hand-written cases, payload generators, template sets, splits."""

from __future__ import annotations

import random
import re

import pytest

from concilium.pack.splits import make_splits
from concilium.pack.tasks import SKILLS, make_query, skill_by_name, split_query

CASES = {
    "reverse": [("hello", "olleh"), ("abc", "cba")],
    "uppercase": [("tarobi", "TAROBI")],
    "rotate": [("hello", "elloh"), ("abc", "bca")],
    "mask-vowels": [("hello", "h*ll*"), ("banana", "b*n*n*")],
    "caesar": [("abc", "def"), ("xyz", "abc"), ("hello", "khoor")],
    "length": [("hello", "5"), ("abc", "3")],
    "remove-vowels": [("banana", "bnn"), ("queue", "q")],
    "double-letters": [("abc", "aabbcc")],
    "swapcase": [("HeLLo", "hEllO")],
    "first-last": [("hello", "ho"), ("abc", "ac")],
    "increment-digits": [("4821", "5932"), ("909", "010")],
    "spell": [("abc", "a-b-c"), ("hello", "h-e-l-l-o")],
}


def test_every_skill_has_hand_written_cases() -> None:
    assert set(CASES) == {s.name for s in SKILLS}
    assert len(SKILLS) >= 10


@pytest.mark.parametrize("name", sorted(CASES))
def test_solve_hand_written_cases(name: str) -> None:
    skill = skill_by_name(name)
    for payload, answer in CASES[name]:
        assert skill.solve(payload) == answer


def test_unknown_skill_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="reverse"):
        skill_by_name("nope")


@pytest.mark.parametrize("skill", SKILLS, ids=lambda s: s.name)
def test_skill_metadata(skill: object) -> None:
    s = skill_by_name(skill.name)  # type: ignore[attr-defined]
    assert re.fullmatch(r"[a-z0-9-]+", s.name)
    assert s.description and s.category
    assert len(s.train_templates) >= 15 and len(s.heldout_templates) >= 8
    assert 8 <= len(s.pilot_templates) <= 16


def test_template_sets_are_disjoint_within_and_across_skills() -> None:
    seen: dict[str, str] = {}
    for s in SKILLS:
        for kind in ("train", "pilot", "heldout"):
            for t in getattr(s, f"{kind}_templates"):
                key = t.strip().lower()
                assert key not in seen, f"{s.name}/{kind} {t!r} repeats {seen[key]}"
                assert ": " not in t and "<" not in t
                seen[key] = f"{s.name}/{kind}"


@pytest.mark.parametrize("skill", SKILLS, ids=lambda s: s.name)
def test_payloads_are_seeded_fit_their_answers_and_are_not_trivial(skill: object) -> None:
    s = skill_by_name(skill.name)  # type: ignore[attr-defined]
    a = [s.payload(random.Random(7)) for _ in range(3)]
    assert a == [s.payload(random.Random(7)) for _ in range(3)]
    rng = random.Random(1)
    for _ in range(200):
        p = s.payload(rng)
        assert ": " not in p and s.solve(p) != p
        assert 1 <= len(s.solve(p)) <= s.max_answer_len


def test_query_round_trips_through_split_query() -> None:
    q = make_query("Reverse this word", "hello")
    assert q == "Reverse this word: hello"
    assert split_query(q) == ("Reverse this word", "hello")
    with pytest.raises(ValueError):
        split_query("no payload here")


def test_splits_are_deterministic_sized_and_payload_disjoint() -> None:
    splits = make_splits(0, n_pilots=12, n_train=48, n_heldout=50)
    assert splits == make_splits(0, n_pilots=12, n_train=48, n_heldout=50)
    assert splits != make_splits(1, n_pilots=12, n_train=48, n_heldout=50)
    for sp in splits:
        s = sp.skill
        payloads = [split_query(q)[1] for q, _ in (*sp.pilots, *sp.train_examples, *sp.heldout)]
        assert len(payloads) == len(set(payloads)) == 12 + 48 + 50
        assert {split_query(q)[0] for q, _ in sp.heldout} <= set(s.heldout_templates)
        assert {split_query(q)[0] for q, _ in sp.pilots} <= set(s.pilot_templates)
        assert all(s.solve(split_query(q)[1]) == a for q, a in sp.heldout)


@pytest.mark.parametrize("skill", SKILLS, ids=lambda s: s.name)
def test_payload_characters_never_repeat(skill: object) -> None:
    s = skill_by_name(skill.name)  # type: ignore[attr-defined]
    rng = random.Random(2)
    for _ in range(200):
        p = s.payload(rng).lower()
        assert len(set(p)) == len(p), p
