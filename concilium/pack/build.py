"""Build the demo expert pack: base model, skill adapters, held-out set, manifest and report.

    python -m concilium.pack.build [--out demo_pack] [--seed 0] [--quick]

Deterministic from the seed; written into ``<out>.tmp`` and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concilium.errors import InvalidInput
from concilium.pack.data import adapter_validation, tagged_validation
from concilium.pack.evaluate_pack import evaluate_pack
from concilium.pack.manifest import (
    HELDOUT,
    MANIFEST,
    REPORT,
    PackReport,
    adapter_spec,
    base_spec,
    write_heldout,
    write_manifest,
)
from concilium.pack.model import QUICK_SIZE, ModelSize, active_params, count_params, new_base
from concilium.pack.report import render_report
from concilium.pack.splits import SkillSplit, make_splits
from concilium.pack.tokenizer import save_tokenizer
from concilium.pack.train import FitResult, Schedule, lora_config, pretrain_base, train_adapter

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BuildConfig:
    """Everything that sizes a build."""

    size: ModelSize
    base: Schedule
    adapter: Schedule
    n_pilots: int = 12
    n_train: int = 48
    n_heldout: int = 60
    matrix_per_skill: int = 20


FULL = BuildConfig(
    size=ModelSize(),
    base=Schedule(
        steps=4000,
        batch_size=64,
        lr=2.5e-3,
        warmup=50,
        log_every=250,
        check_every=250,
        min_steps=1500,
        target=0.97,
    ),
    adapter=Schedule(
        steps=200,
        batch_size=32,
        lr=3e-3,
        warmup=5,
        log_every=50,
        check_every=20,
        min_steps=60,
        target=0.97,
    ),
)
QUICK = BuildConfig(
    size=QUICK_SIZE,
    base=Schedule(steps=4, batch_size=8, lr=3e-3, warmup=1, log_every=4),
    adapter=Schedule(steps=2, batch_size=4, lr=3e-3, warmup=1, log_every=2),
    n_pilots=8,
    n_train=32,
    n_heldout=50,
    matrix_per_skill=2,
)


def build_pack(
    out_dir: Path, *, seed: int = 0, quick: bool = False, progress: Progress | None = None
) -> Path:
    """Build the pack into `out_dir` (replacing it atomically); returns `out_dir`."""
    cfg = QUICK if quick else FULL
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".."):  # no name to build `<name>.tmp` beside and swap in
        raise InvalidInput(f"--out {out_dir} names no directory to replace; give e.g. demo_pack")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    _seed_everything(seed)
    splits = make_splits(seed, cfg.n_pilots, cfg.n_train, cfg.n_heldout)
    model, base_fit = _train_and_save_base(tmp, cfg, seed, say)
    peft_model, adapter_fits = _train_and_save_adapters(tmp, model, splits, cfg, seed, say)
    say("evaluating on held-out queries")
    report = evaluate_pack(peft_model, splits, cfg.matrix_per_skill)
    report.quick = quick
    report.base_steps = base_fit.steps
    report.base_tagged_accuracy = base_fit.score
    report.adapter_steps = {name: f.steps for name, f in adapter_fits.items()}
    report.build_seconds = round(time.perf_counter() - start, 1)
    _write_docs(tmp, seed, peft_model, splits, report)
    _swap_into_place(tmp, out_dir)
    say(f"pack written to {out_dir} in {report.build_seconds:.0f}s")
    return out_dir


def _seed_everything(seed: int) -> None:
    """Seed torch and python, pin threads, ask torch for deterministic kernels."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _train_and_save_base(
    tmp: Path, cfg: BuildConfig, seed: int, say: Progress
) -> tuple[Any, FitResult]:
    """Pre-train the base on the tagged mixture and save it with the tokenizer into tmp/base."""
    model = new_base(cfg.size)
    say(f"pre-training base ({count_params(model):,} params, at most {cfg.base.steps} steps)")
    val = tagged_validation(seed) if cfg.base.check_every else []
    result = pretrain_base(model, cfg.base, random.Random(seed), val, say)
    model.save_pretrained(str(tmp / "base"), safe_serialization=True)
    save_tokenizer(tmp / "base")
    return model, result


def _train_and_save_adapters(
    tmp: Path,
    model: Any,
    splits: tuple[SkillSplit, ...],
    cfg: BuildConfig,
    seed: int,
    say: Progress,
) -> tuple[Any, dict[str, FitResult]]:
    """Train one LoRA per skill on the (frozen) base; save each to tmp/adapters/<skill>."""
    import torch
    from peft import get_peft_model

    first = splits[0].skill.name
    torch.manual_seed(seed * 1000)
    peft_model = get_peft_model(model, lora_config(), adapter_name=first)
    fits: dict[str, FitResult] = {}
    for i, sp in enumerate(splits):
        torch.manual_seed(seed * 1000 + i)
        say(f"training adapter {sp.skill.name} ({i + 1}/{len(splits)})")
        val = adapter_validation(sp.skill, seed) if cfg.adapter.check_every else []
        rng = random.Random(f"{seed}/lora/{i}")
        fits[sp.skill.name] = train_adapter(peft_model, sp.skill, cfg.adapter, rng, val, say)
    peft_model.save_pretrained(str(tmp / "adapters"), safe_serialization=True)
    return peft_model, fits


def _write_docs(
    tmp: Path, seed: int, peft_model: Any, splits: tuple[SkillSplit, ...], report: PackReport
) -> None:
    """heldout.jsonl, manifest.json and REPORT.md."""
    base = peft_model.get_base_model()
    lora = _lora_params(peft_model)
    totals = (count_params(base) - lora, active_params(base) - lora)
    n = len(splits)
    experts = [adapter_spec(sp, i, n, lora // n, totals) for i, sp in enumerate(splits)]
    write_heldout(tmp / HELDOUT, splits)
    report.sizes_bytes = _sizes(tmp)
    write_manifest(tmp / MANIFEST, seed, base_spec(*totals), experts, report)
    (tmp / REPORT).write_text(render_report(report, seed, experts))


def _lora_params(peft_model: Any) -> int:
    """Parameters of all LoRA adapters injected into the model."""
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def _sizes(root: Path) -> dict[str, int]:
    """Bytes on disk of base/, adapters/ and the whole pack."""

    def du(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    return {"base": du(root / "base"), "adapters": du(root / "adapters"), "total": du(root)}


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp with two renames (the old pack is removed last)."""
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build a pack and print progress with elapsed seconds."""
    ap = argparse.ArgumentParser(prog="python -m concilium.pack.build", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_pack"), help="output directory")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--quick", action="store_true", help="tiny untrained build for tests")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    build_pack(args.out, seed=args.seed, quick=args.quick, progress=say)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
