"""MoE-LoRA layer speed: our layer vs the base nn.Linear, PEFT's mixed-adapter batch, naive gather.

One run, one set of tensors, fp32: D = Dout = 1024, R = 16, N = 32 adapters, K = 2 adapters per
token, T ∈ {1, 16, 256, 2048} tokens. Every implementation computes on the same x and the same
adapter weights; times are medians of interleaved rounds (the implementations take turns, so
machine noise hits all of them alike) under ``torch.inference_mode``.

* ``base``: the ``nn.Linear`` alone (the denominator of every ratio).
* ``ours``: ``LoRAMixture`` with the ``auto`` backend (gather for T·K ≤ 8, grouped otherwise).
* ``peft_mixed``: PEFT's LoRA ``Linear`` with all 32 adapters and ``adapter_names`` (one adapter
  per row: K = 1, half our adapter work) — how the replicas serve mixed batches today.
* ``naive_gather``: every token's K adapters gathered (``A[idxs]``, ``B[idxs]``) then batched
  matvecs (our ``gather`` backend at every T).

    python benchmarks/moe_lora.py [--quick] [--threads 1]

Ends with one ``TARGET`` line per acceptance target of the issue.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from concilium.experts.moe.lora_mixture import LoRAMixture, LoRAWeights  # noqa: E402

D, R, N, K = 1024, 16, 32, 2
TOKENS = (1, 16, 256, 2048)
IMPLS = ("base", "ours", "peft_mixed", "naive_gather")


def adapters(seed: int = 0) -> list[LoRAWeights]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoRAWeights(
            torch.randn(R, D, generator=g) * 0.02, torch.randn(D, R, generator=g) * 0.02, 2.0
        )
        for _ in range(N)
    ]


def peft_layer(base: nn.Linear, ws: list[LoRAWeights]) -> Any:
    """PEFT's LoRA Linear over ``base`` holding the same 32 adapters."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Module()
    holder.proj = base
    cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"], lora_dropout=0.0)
    for i in range(N):
        holder = inject_adapter_in_model(cfg, holder, adapter_name=f"a{i}")
    layer: Any = holder.proj
    with torch.no_grad():
        for i, w in enumerate(ws):
            layer.lora_A[f"a{i}"].weight.copy_(w.a)
            layer.lora_B[f"a{i}"].weight.copy_(w.b)
    return layer


def routes(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K distinct adapters per token, softmax weights: ``gates [T, K]``, ``idxs [T, K]``."""
    g = torch.Generator().manual_seed(seed)
    idxs = torch.rand(t, N, generator=g).topk(K, -1).indices
    return torch.softmax(torch.randn(t, K, generator=g), -1), idxs


def calls(t: int, layers: dict[str, nn.Module]) -> dict[str, Callable[[], torch.Tensor]]:
    x = torch.randn(t, D, generator=torch.Generator().manual_seed(t))
    gates, idxs = routes(t, seed=t + 1)
    names = [f"a{i}" for i in idxs[:, 0].tolist()]  # PEFT: one adapter per row
    return {
        "base": lambda: layers["base"](x),
        "ours": lambda: layers["ours"](x, gates, idxs),
        "peft_mixed": lambda: layers["peft_mixed"](x, adapter_names=names),
        "naive_gather": lambda: layers["naive_gather"](x, gates, idxs),
    }


Times = dict[str, tuple[float, float]]  # implementation -> (best, median) seconds per call


def timed(fns: dict[str, Callable[[], torch.Tensor]], rounds: int, t: int) -> Times:
    """Best and median seconds per call; implementations interleaved round by round."""
    inner = max(1, 64 // t)  # small T: several calls per sample, above the timer's resolution
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {k: (min(v), statistics.median(v)) for k, v in samples.items()}


def check(fns: dict[str, Callable[[], torch.Tensor]]) -> float:
    """Max |ours - naive_gather|: the two must agree before their times mean anything."""
    return float((fns["ours"]() - fns["naive_gather"]()).abs().max())


def run(rounds: int) -> tuple[dict[int, Times], float]:
    base = nn.Linear(D, D)
    ws = adapters()
    layers: dict[str, nn.Module] = {
        "base": base,
        "ours": LoRAMixture(base, ws, backend="auto"),
        "peft_mixed": peft_layer(base, ws),
        "naive_gather": LoRAMixture(base, ws, backend="gather"),
    }
    results: dict[int, Times] = {}
    err = 0.0
    with torch.inference_mode():
        for t in TOKENS:
            fns = calls(t, layers)
            err = max(err, check(fns))
            results[t] = timed(fns, rounds, t)
    return results, err


def table(results: dict[int, Times]) -> list[str]:
    lines = [
        "| T | base ms | ours ms | ours / base | PEFT mixed / base | naive gather / base "
        "| PEFT / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, r in results.items():
        b, o, p, g = r["base"], r["ours"], r["peft_mixed"], r["naive_gather"]
        lines.append(
            f"| {t} | {b[0] * 1e3:.3f} | {o[0] * 1e3:.3f} | {_ratio(o, b)} | {_ratio(p, b)} "
            f"| {_ratio(g, b)} | {_ratio(p, o)} |"
        )
    return lines


def _ratio(num: tuple[float, float], den: tuple[float, float]) -> str:
    """``best× (median×)``."""
    return f"{num[0] / den[0]:.2f}× ({num[1] / den[1]:.2f}×)"


def targets(results: dict[int, Times]) -> list[str]:
    out = []
    for t, goal in ((1, 2.0), (256, 1.3), (2048, 1.3)):
        ratio = results[t]["ours"][0] / results[t]["base"][0]
        verdict = "PASS" if ratio <= goal else "FAIL"
        out.append(f"TARGET ours_over_base_T{t}: {ratio:.3f} (goal <= {goal}) {verdict}")
    worst = min(r["peft_mixed"][0] / r["ours"][0] for r in results.values())
    verdict = "PASS" if worst > 1.0 else "FAIL"
    out.append(f"TARGET peft_mixed_over_ours_worst_T: {worst:.3f} (goal > 1.0) {verdict}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rounds = 7 if args.quick else 31
    results, err = run(rounds)
    head = (
        f"# MoE-LoRA layer speed ({'quick' if args.quick else 'full'} run)\n\n"
        f"fp32, D = Dout = {D}, R = {R}, N = {N} adapters, K = {K}; torch {torch.__version__}, "
        f"{args.threads} thread(s); {rounds} interleaved rounds; max |ours − naive gather| = "
        f"{err:.1e}. Wall time {time.perf_counter() - t0:.0f} s. PEFT mixed batch runs one "
        "adapter per row (K = 1). Ratios: best-of-rounds (median-of-rounds); ms: best.\n"
    )
    lines = [head, *table(results), "", *targets(results)]
    name = "moe_lora_quick.md" if args.quick else "moe_lora.md"
    out = args.out or ROOT / "benchmarks" / "results" / name
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
