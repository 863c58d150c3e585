"""Generated tokens/s on the demo base with 1, 4 and 16 distinct adapters in flight.

Ours: every in-flight request decoded in ONE mixed-adapter batch (a different adapter per row, the
ExpertServer's `@serve.batch` path) through our MoE-LoRA layer (`engine="mixture"`). Peers, in the
same run on the same rows (held-out demo queries, greedy): PEFT's mixed batch (`adapter_names`,
`engine="peft"`), and one forward per adapter (rows grouped by adapter, each group decoded on its
own, one after another: what a server without mixed batches does).

    python benchmarks/multi_adapter_serving.py [--quick] [--rows 32] [--repeats 3]

Target (serving issue): at 16 adapters ours keeps >= 0.7x its single-adapter throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from concilium.experts.base import GenParams  # noqa: E402
from concilium.experts.local import GenRequest, LocalCausalLM  # noqa: E402

ADAPTER_COUNTS = (1, 4, 16)


def load_lm(pack: Path, n_adapters: int, engine: str) -> tuple[LocalCausalLM, list[str]]:
    """The demo base with `n_adapters` adapters resident (pack adapters reused under new names)."""
    manifest = json.loads((pack / "manifest.json").read_text())
    paths = [pack / e["path"] for e in manifest["experts"] if e.get("kind") == "lora"]
    lm = LocalCausalLM(pack / "base", max_adapters=n_adapters, engine=engine)
    names = []
    for i in range(n_adapters):
        name = f"a{i:02d}"
        lm.ensure_adapter(name, paths[i % len(paths)])
        names.append(name)
    return lm, names


def make_rows(pack: Path, n: int, adapters: list[str], max_tokens: int) -> list[GenRequest]:
    lines = (pack / "heldout.jsonl").read_text().splitlines()
    qs = [json.loads(x)["query"] for x in lines[:: max(1, len(lines) // n)]][:n]
    params = GenParams(max_tokens=max_tokens)
    return [
        GenRequest([{"role": "user", "content": q}], params, adapters[i % len(adapters)])
        for i, q in enumerate(qs)
    ]


def run_mixed(lm: LocalCausalLM, rows: list[GenRequest]) -> int:
    return sum(g.completion_tokens for g in lm.generate_batch(rows))


def run_per_adapter(lm: LocalCausalLM, rows: list[GenRequest]) -> int:
    groups: dict[str | None, list[GenRequest]] = defaultdict(list)
    for r in rows:
        groups[r.adapter].append(r)
    return sum(run_mixed(lm, g) for g in groups.values())


def tokens_per_s(
    fn: Callable[[LocalCausalLM, list[GenRequest]], int],
    lm: LocalCausalLM,
    rows: list[GenRequest],
    repeats: int,
) -> float:
    fn(lm, rows)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn(lm, rows)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", type=Path, default=ROOT / "demo_pack")
    ap.add_argument("--quick", action="store_true", help="16 rows, 1 repeat (< 1 minute)")
    ap.add_argument("--rows", type=int, default=32, help="requests in flight")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    rows_n, repeats = (16, 1) if args.quick else (args.rows, args.repeats)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    lm, names = load_lm(args.pack, max(ADAPTER_COUNTS), "mixture")
    peft_lm, _ = load_lm(args.pack, max(ADAPTER_COUNTS), "peft")
    results = {}
    for n in ADAPTER_COUNTS:
        rows = make_rows(args.pack, rows_n, names[:n], args.max_tokens)
        ours = tokens_per_s(run_mixed, lm, rows, repeats)
        peft = tokens_per_s(run_mixed, peft_lm, rows, repeats)
        per = tokens_per_s(run_per_adapter, lm, rows, repeats)
        results[n] = (ours, peft, per)
        print(f"{n:>2} adapters: ours {ours:7.1f}  peft {peft:7.1f}  per-adapter {per:7.1f} tok/s")
    single = results[1][0]
    lines = [
        f"# Multi-adapter serving on the demo base ({'quick' if args.quick else 'full'} run)",
        "",
        f"{rows_n} requests in flight, greedy, max_tokens {args.max_tokens}, fp32 CPU, "
        f"torch threads {torch.get_num_threads()}, median of {repeats}. Same rows for all three.",
        "",
        "| adapters in flight | ours: mixed batch (MoE-LoRA) tok/s | vs ours @1 | PEFT mixed "
        "batch tok/s | one forward per adapter tok/s | ours / PEFT | ours / per-adapter |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, (ours, peft, per) in results.items():
        lines.append(
            f"| {n} | {ours:.1f} | {ours / single:.2f} | {peft:.1f} | {per:.1f} | "
            f"{ours / peft:.2f} | {ours / per:.2f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    out = (
        ROOT
        / "benchmarks"
        / "results"
        / ("multi_adapter_serving_quick.md" if args.quick else "multi_adapter_serving.md")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    ratio = results[16][0] / single
    verdict = "PASS" if ratio >= 0.7 else "FAIL"
    print(f"TARGET mixed_16_vs_single: {ratio:.2f} (goal >= 0.70) {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
