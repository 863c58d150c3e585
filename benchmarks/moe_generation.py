"""Greedy generation with our MoE kernels vs stock transformers experts, and with expert tiering.

Models: the demo pack's MoE base (Qwen2-MoE, 4 layers, 8 experts top-2 + shared expert) and a
Mixtral-architecture model of ~210M parameters with random weights (no hub). For each, the same
prompts are generated greedily with the stock experts and with `patch(model)` (interleaved,
`--repeats` times, best time kept: the machine is shared) and the outputs compared token for
token. Tiering: the demo base with half its experts resident (LRU + next-layer prefetch) against
fully resident, reporting hit rate, bytes moved and slowdown.

    python benchmarks/moe_generation.py [--quick] [--repeats N]

Writes benchmarks/results/moe_generation.md (moe_generation_quick.md with --quick).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from concilium.experts.moe import patch  # noqa: E402
from concilium.experts.moe.tiered import tier  # noqa: E402


def demo_base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ROOT / "demo_pack" / "base").eval()


def mixtral(quick: bool):
    """Mixtral architecture, random weights: ~210M parameters (~60M with --quick)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    d, h = (512, 1024) if quick else (768, 2048)
    cfg = MixtralConfig(
        vocab_size=32000, hidden_size=d, intermediate_size=h, num_hidden_layers=4,
        num_attention_heads=12 if not quick else 8, num_key_value_heads=4, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


def generate(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out, time.perf_counter() - t0


def race(model, ids: torch.Tensor, new: int, repeats: int) -> dict:
    """Stock vs patched, interleaved; best seconds of each and whether outputs are identical."""
    report = patch(model)
    swap = {"stock": report.undo, "ours": report.redo}
    best = {"stock": float("inf"), "ours": float("inf")}
    outs = {}
    for name in swap:  # warm-up (ours packs its weights on its first call)
        swap[name]()
        generate(model, ids, 2)
    for _ in range(repeats):
        for name in swap:
            swap[name]()
            outs[name], secs = generate(model, ids, new)
            best[name] = min(best[name], secs)
    report.undo()
    tokens = ids.shape[0] * new
    return {
        "tok/s stock": tokens / best["stock"],
        "tok/s ours": tokens / best["ours"],
        "speedup": best["stock"] / best["ours"],
        "same": bool(torch.equal(outs["stock"], outs["ours"])),
    }


def tiering(make, ids: torch.Tensor, new: int, repeats: int) -> list[dict]:
    """Ours fully resident vs ours with half the experts per layer resident (LRU + next-layer
    prefetch), the prefetch synchronous and on a background thread; a fresh `make()` model each."""
    rows = []
    for background in (False, True):
        model = make()
        patch(model)
        want, full = generate(model, ids, new)
        full = min([full] + [generate(model, ids, new)[1] for _ in range(repeats - 1)])
        num_experts = _num_experts(model)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "experts.safetensors"
            report = tier(model, path, budget=num_experts // 2, background=background)
            got, half = generate(model, ids, new)
            stats = report.stats()  # counters of the first tiered run
            half = min([half] + [generate(model, ids, new)[1] for _ in range(repeats - 1)])
            report.close()
        rows.append(
            {
                "prefetch": "background" if background else "synchronous",
                "same": bool(torch.equal(want, got)),
                "hit rate": stats.hit_rate,
                "MB moved": stats.bytes_moved / 1e6,
                "prefetched": stats.prefetched,
                "prefetch used": stats.prefetch_used,
                "waited": stats.waits,
                "slowdown": half / full,
            }
        )
    return rows


def _num_experts(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_experts", None) or cfg.num_local_experts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens, smaller Mixtral")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per implementation")
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    new = 16 if args.quick else 32
    t0 = time.perf_counter()
    base = demo_base()
    g = torch.Generator().manual_seed(0)
    demo_ids = torch.randint(3, base.config.vocab_size, (4, 24), generator=g)
    rows = {"demo base (Qwen2-MoE), batch 4": race(base, demo_ids, new, repeats)}
    print(f"[{time.perf_counter() - t0:.0f}s] demo base done", flush=True)
    mx = mixtral(args.quick)
    n_params = sum(p.numel() for p in mx.parameters())
    for batch in (1, 8):
        ids = torch.randint(3, 32000, (batch, 32), generator=g)
        rows[f"Mixtral {n_params / 1e6:.0f}M random, batch {batch}"] = race(mx, ids, new, repeats)
        print(f"[{time.perf_counter() - t0:.0f}s] Mixtral batch {batch} done", flush=True)
    mx_ids = torch.randint(3, 32000, (1, 32), generator=g)
    tiered = {
        "demo base, batch 4": tiering(demo_base, demo_ids, new, repeats),
        f"Mixtral {n_params / 1e6:.0f}M, batch 1": tiering(
            lambda: mixtral(args.quick), mx_ids, new, repeats
        ),
    }
    lines = report(rows, tiered, new, repeats, time.perf_counter() - t0, args.quick)
    out = "moe_generation_quick.md" if args.quick else "moe_generation.md"
    (ROOT / "benchmarks" / "results" / out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def report(rows: dict, tiered: dict, new: int, repeats: int, secs: float, quick: bool) -> list[str]:
    head = "| model | tok/s stock | tok/s ours | speedup | same tokens |"
    lines = [
        "# MoE generation: our kernels vs stock transformers experts (fp32, CPU)",
        "",
        f"Greedy, {new} new tokens, best of {repeats} interleaved runs (machine shared); torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; run took {secs:.0f} s"
        + (" (--quick)." if quick else "."),
        "",
        head,
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['tok/s stock']:.1f} | {r['tok/s ours']:.1f} | {r['speedup']:.2f}x "
            f"| {r['same']} |"
        )
    lines += [
        "",
        "Tiering: 4 of 8 experts per layer resident (LRU, next-layer prefetch), slowdown against "
        "the same model fully resident on our kernels:",
        "",
    ]
    cols = list(next(iter(tiered.values()))[0])
    lines += ["| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, runs in tiered.items():
        lines += [f"| {name} | " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in runs]
    return [*lines, "", *targets(rows, tiered)]


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def targets(rows: dict, tiered: dict[str, list[dict]]) -> list[str]:
    out = []
    for name, r in rows.items():
        ok = r["same"] and r["speedup"] > 1
        out.append(
            f"TARGET moe_generation[{name}]: {r['speedup']:.2f}x tokens/s, same tokens "
            f"{r['same']} (goal > 1.00x and same tokens) {'PASS' if ok else 'FAIL'}"
        )
    runs = [r for rs in tiered.values() for r in rs]
    same = all(r["same"] for r in runs)
    summary = ", ".join(
        f"{name} {r['prefetch']}: hit rate {r['hit rate']:.3f}, slowdown {r['slowdown']:.2f}x"
        for name, rs in tiered.items()
        for r in rs
    )
    out.append(
        f"TARGET tiering_half_resident_same_outputs: {same} (goal True); {summary} (reported) "
        f"{'PASS' if same else 'FAIL'}"
    )
    return out


if __name__ == "__main__":
    main()
