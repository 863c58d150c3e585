"""The pack's manifest (expert specs + build report), held-out file and REPORT.md.

``manifest.json``::

    {"version": 1, "seed": 0, "base": {ModelSpec},
     "experts": [{LoraSpec..., "default": bool}], "report": {PackReport}}

Spec paths are relative to the pack directory. ``default: false`` marks the adapters left out of the
default registry (for registering live).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concilium.errors import ConfigError
from concilium.pack.splits import SkillSplit
from concilium.pack.tasks import NON_DEFAULT

BASE_NAME = "demo-moe"
MANIFEST = "manifest.json"
HELDOUT = "heldout.jsonl"
REPORT = "REPORT.md"
BASE_PRICE = (0.05, 0.1)


@dataclass(slots=True)
class PackReport:
    """What the build measured: accuracies on held-out queries, timings and sizes."""

    base_accuracy: dict[str, float] = field(default_factory=dict)
    adapter_accuracy: dict[str, float] = field(default_factory=dict)
    matrix: dict[str, dict[str, float]] = field(default_factory=dict)  # adapter -> skill -> EM
    matrix_queries_per_skill: int = 0
    heldout_per_skill: int = 0
    build_seconds: float = 0.0
    sizes_bytes: dict[str, int] = field(default_factory=dict)
    quick: bool = False
    base_steps: int = 0
    base_tagged_accuracy: float | None = None  # worst skill, tagged prompts, at the last check
    adapter_steps: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {k: getattr(self, k) for k in self.__slots__}


def price(index: int, n: int) -> tuple[float, float]:
    """(in, out) price per 1k tokens of adapter `index`: spread over 0.1..0.5 in, twice that out."""
    p_in = round(0.1 + 0.4 * ((index * 7) % n) / max(1, n - 1), 3)
    return p_in, round(2 * p_in, 3)


def base_spec(params_total: int, params_active: int) -> dict[str, Any]:
    """The ModelSpec dict of the base model."""
    return {
        "kind": "model",
        "name": BASE_NAME,
        "task": "generate",
        "path": "base",
        "description": (
            "Tiny sparse-MoE causal LM (Qwen2-MoE: 8 experts, top-2, shared expert) trained on "
            "synthetic tagged tasks; on plain queries it only echoes the payload."
        ),
        "price_in_per_1k": BASE_PRICE[0],
        "price_out_per_1k": BASE_PRICE[1],
        "params_total": params_total,
        "params_active": params_active,
        "tags": ["demo", "moe", "base"],
    }


def adapter_spec(
    split: SkillSplit, index: int, n: int, lora_params: int, base_params: tuple[int, int]
) -> dict[str, Any]:
    """The LoraSpec dict of one skill adapter, plus the pack's `default` flag."""
    p_in, p_out = price(index, n)
    s = split.skill
    return {
        "kind": "lora",
        "name": s.name,
        "base": BASE_NAME,
        "path": f"adapters/{s.name}",
        "description": s.description,
        "examples": [q for q, _ in split.pilots],
        "categories": [s.category],
        "price_in_per_1k": p_in,
        "price_out_per_1k": p_out,
        "params_total": base_params[0] + lora_params,
        "params_active": base_params[1] + lora_params,
        "tags": ["demo", "skill"],
        "train_examples": [{"prompt": q, "completion": a} for q, a in split.train_examples],
        "default": s.name not in NON_DEFAULT,
    }


def write_heldout(path: Path, splits: Sequence[SkillSplit]) -> None:
    """One JSON object per line: {"skill", "query", "answer"}."""
    with path.open("w") as f:
        for sp in splits:
            for q, a in sp.heldout:
                f.write(json.dumps({"skill": sp.skill.name, "query": q, "answer": a}) + "\n")


def write_manifest(
    path: Path, seed: int, base: dict[str, Any], experts: list[dict[str, Any]], report: PackReport
) -> None:
    """Write manifest.json."""
    doc = {"version": 1, "seed": seed, "base": base, "experts": experts, "report": report.to_dict()}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def load_manifest(pack_dir: Path) -> dict[str, Any]:
    """The parsed manifest.json of a pack directory; ConfigError when unreadable or incomplete."""
    path = Path(pack_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"demo pack manifest {path} unreadable: {e}") from None
    if not isinstance(data, dict) or not {"base", "experts"} <= data.keys():
        raise ConfigError(f"demo pack manifest {path} lacks 'base'/'experts'")
    return data


def load_heldout(pack_dir: Path) -> list[dict[str, str]]:
    """The held-out queries of a pack: [{"skill", "query", "answer"}, ...]; ConfigError if bad."""
    path = Path(pack_dir) / HELDOUT
    try:
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as e:
        raise ConfigError(f"demo pack heldout file {path} unreadable: {e}") from None


def expert_specs(pack_dir: Path, *, defaults_only: bool = False) -> list[dict[str, Any]]:
    """Spec dicts (base first, `default` stripped) ready for `parse_spec`; paths stay relative."""
    doc = load_manifest(pack_dir)
    experts = [e for e in doc["experts"] if e["default"] or not defaults_only]
    return [doc["base"], *({k: v for k, v in e.items() if k != "default"} for e in experts)]
