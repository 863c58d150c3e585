"""Score a trained pack: base and adapters on held-out queries, plus the adapter × skill matrix.

Each skill's rows go through one mixed-adapter batch (PEFT ``adapter_names``): all held-out queries
through the skill's own adapter and through the bare base, and the first `matrix_per_skill` of them
through every other adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from concilium.pack.evaluate import BASE, generate
from concilium.pack.manifest import PackReport
from concilium.pack.splits import SkillSplit


def evaluate_pack(
    peft_model: Any, splits: Sequence[SkillSplit], matrix_per_skill: int
) -> PackReport:
    """A PackReport with base / adapter accuracies and the adapter × skill matrix filled in."""
    names = [sp.skill.name for sp in splits]
    report = PackReport(
        matrix={a: {} for a in names},
        matrix_queries_per_skill=matrix_per_skill,
        heldout_per_skill=min(len(sp.heldout) for sp in splits),
    )
    for sp in splits:
        _score_skill(peft_model, sp, names, matrix_per_skill, report)
    return report


def _score_skill(
    peft_model: Any, sp: SkillSplit, names: list[str], m: int, report: PackReport
) -> None:
    """Fill one skill's column of the report from a single mixed-adapter generation pass."""
    skill = sp.skill.name
    rows = _rows(sp, names, m)  # [(adapter, query, answer)]
    preds = generate(
        peft_model,
        [q for _, q, _ in rows],
        sp.skill.max_answer_len + 1,
        adapter_names=[a for a, _, _ in rows],
    )
    hits: dict[str, list[bool]] = {}
    for (adapter, _, answer), pred in zip(rows, preds, strict=True):
        hits.setdefault(adapter, []).append(pred == answer)
    report.base_accuracy[skill] = _mean(hits[BASE])
    report.adapter_accuracy[skill] = _mean(hits[skill])
    for a in names:
        report.matrix[a][skill] = _mean(hits[a])


def _rows(sp: SkillSplit, names: list[str], m: int) -> list[tuple[str, str, str]]:
    """(adapter, query, answer) rows of one skill's evaluation batch."""
    own = [(sp.skill.name, q, a) for q, a in sp.heldout]
    base = [(BASE, q, a) for q, a in sp.heldout]
    others = [(n, q, a) for n in names if n != sp.skill.name for q, a in sp.heldout[:m]]
    return own + base + others


def _mean(xs: list[bool]) -> float:
    return round(sum(xs) / len(xs), 4) if xs else 0.0
