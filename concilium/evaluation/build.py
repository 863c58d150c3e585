"""Outcome tables for the demo pack: every expert run on every query, answers checked exactly.

Two tables: `fit` (the adapters' training prompts — what a predictive router may learn from) and
`test` (the pack's held-out queries: templates and payloads never seen in training or pilots).
Each expert (the base and every adapter) answers every query greedily through the same runtime the
service uses (`LocalCausalLM`, mixed-adapter batches); quality is exact match, cost is the tokens
actually used times the expert's prices, latency is the runtime's measured per-token profile times
the tokens generated, confidence is the mean token log-probability.

Tables are cached next to the results (CSV, RouterBench layout) keyed by the pack's manifest hash
and the query sample, so `concilium eval` re-runs routing in seconds once they exist.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from concilium.experts.base import GenParams
from concilium.outcomes.table import OutcomeTable
from concilium.pack.manifest import MANIFEST, expert_specs, load_heldout

Progress = Callable[[str], None]
MAX_TOKENS = 48


@dataclass(frozen=True, slots=True)
class QuerySet:
    ids: list[str]
    queries: list[str]
    answers: list[str]
    families: list[str]


def query_sets(pack_dir: Path, per_skill: int | None, seed: int) -> tuple[QuerySet, QuerySet]:
    """(fit, test): adapters' train prompts and the held-out set, `per_skill` sampled per skill."""
    specs = [s for s in expert_specs(pack_dir) if s["kind"] == "lora"]
    fit_rows = [
        (s["name"], ex["prompt"], ex["completion"]) for s in specs for ex in s["train_examples"]
    ]
    test_rows = [(r["skill"], r["query"], r["answer"]) for r in load_heldout(pack_dir)]
    return (
        _sample("fit", fit_rows, per_skill, seed),
        _sample("test", test_rows, per_skill, seed),
    )


def _sample(
    name: str, rows: Sequence[tuple[str, str, str]], per_skill: int | None, seed: int
) -> QuerySet:
    rng = random.Random(f"{seed}/{name}")
    by_skill: dict[str, list[tuple[int, tuple[str, str, str]]]] = {}
    for i, r in enumerate(rows):
        by_skill.setdefault(r[0], []).append((i, r))
    keep: list[tuple[int, tuple[str, str, str]]] = []
    for skill in sorted(by_skill):
        items = by_skill[skill]
        keep += items if per_skill is None else rng.sample(items, min(per_skill, len(items)))
    keep.sort()
    return QuerySet(
        ids=[f"{name}-{i}" for i, _ in keep],
        queries=[r[1] for _, r in keep],
        answers=[r[2] for _, r in keep],
        families=[r[0] for _, r in keep],
    )


def pack_experts(pack_dir: Path) -> list[dict[str, Any]]:
    """Every generate expert of the pack (base first), default or not."""
    return [s for s in expert_specs(pack_dir) if s.get("task", "generate") == "generate"]


def run_experts(
    pack_dir: Path, sets: Sequence[QuerySet], *, batch: int = 64, say: Progress | None = None
) -> list[OutcomeTable]:
    """One outcome table per query set: every pack expert on every query."""
    from concilium.experts.local import GenRequest, LocalCausalLM

    say = say or (lambda _m: None)
    specs = pack_experts(pack_dir)
    base = next(s for s in specs if s["kind"] == "model")
    lm = LocalCausalLM(pack_dir / base["path"], max_adapters=len(specs))
    for s in specs:
        if s["kind"] == "lora":
            lm.ensure_adapter(s["name"], pack_dir / s["path"])
    profile = lm.measure_latency()
    params = GenParams(max_tokens=MAX_TOKENS)
    tables = []
    for qs in sets:
        n, e = len(qs.queries), len(specs)
        quality, cost = np.zeros((n, e)), np.zeros((n, e))
        latency, conf = np.zeros((n, e)), np.full((n, e), np.nan)
        answers = [[""] * e for _ in range(n)]
        t0 = time.perf_counter()
        for j, s in enumerate(specs):
            adapter = s["name"] if s["kind"] == "lora" else None
            for start in range(0, n, batch):
                rows = range(start, min(n, start + batch))
                reqs = [
                    GenRequest([{"role": "user", "content": qs.queries[i]}], params, adapter)
                    for i in rows
                ]
                for i, g in zip(rows, lm.generate_batch(reqs), strict=True):
                    answers[i][j] = g.text
                    quality[i, j] = float(g.text.strip() == qs.answers[i])
                    cost[i, j] = (
                        g.prompt_tokens * s["price_in_per_1k"]
                        + g.completion_tokens * s["price_out_per_1k"]
                    ) / 1000
                    latency[i, j] = (
                        profile["latency_ms_overhead"]
                        + profile["latency_ms_per_token"] * g.completion_tokens
                    )
                    if g.mean_logprob is not None:
                        conf[i, j] = g.mean_logprob
            say(f"{s['name']}: {n} queries, {time.perf_counter() - t0:.0f}s so far")
        tables.append(
            OutcomeTable(
                sample_ids=list(qs.ids),
                prompts=list(qs.queries),
                families=list(qs.families),
                experts=[s["name"] for s in specs],
                quality=quality,
                cost=cost,
                latency_ms=latency,
                confidence=conf,
                answers=answers,
            )
        )
    return tables


def cached_tables(
    pack_dir: Path,
    cache_dir: Path,
    *,
    per_skill: int | None,
    seed: int = 0,
    say: Progress | None = None,
) -> tuple[OutcomeTable, OutcomeTable]:
    """(fit, test) outcome tables of the pack, built once and cached as CSV under `cache_dir`."""
    say = say or (lambda _m: None)
    digest = hashlib.sha256((pack_dir / MANIFEST).read_bytes()).hexdigest()[:12]
    tag = "all" if per_skill is None else f"{per_skill}per-skill"
    key = {"manifest": digest, "per_skill": per_skill, "seed": seed, "max_tokens": MAX_TOKENS}
    paths = [cache_dir / f"demo_{name}_{tag}.csv" for name in ("fit", "test")]
    meta = cache_dir / f"demo_{tag}.json"
    fresh = all(p.is_file() for p in paths) and meta.is_file() and _read_key(meta) == key
    if fresh:
        say(f"outcome tables from cache {cache_dir}")
        fit, test = (OutcomeTable.read(p) for p in paths)
        return fit, test
    fit_q, test_q = query_sets(pack_dir, per_skill, seed)
    say(f"running every expert on {len(fit_q.ids)} fit + {len(test_q.ids)} test queries")
    fit, test = run_experts(pack_dir, [fit_q, test_q], say=say)
    meta.unlink(missing_ok=True)  # a failure below must leave no key vouching for the tables
    for t, p in zip((fit, test), paths, strict=True):
        t.write(p)
    meta.write_text(json.dumps(key, indent=1) + "\n")
    return fit, test


def _read_key(meta: Path) -> Any:
    """The cache key recorded in `meta`; None when it is unreadable (a crash cut it short)."""
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
