"""Build the embedding pack: one LoRA embedding expert per docstring domain on all-MiniLM-L6-v2.

    python -m concilium.embedpack.build [--out embed_pack] [--seed 0] [--quick] [--threads N]

For every domain of :data:`concilium.embedpack.corpus.DOMAINS`: extract (summary, docstring)
pairs from the installed packages, hold out `n_eval` of them (the retrieval test set), choose
pilots among the training queries, train the adapter contrastively, save and validate it. Writes
``adapters/<domain>/``, ``manifest.json``, ``retrieval.jsonl`` and ``REPORT.md`` into
``<out>.tmp`` and renames it into place at the end. Deterministic from the seed on one machine
and thread count.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from concilium.embedpack.corpus import DOMAINS, Domain, Item, extract, package_versions
from concilium.embedpack.manifest import (
    HELDOUT,
    MANIFEST,
    adapter_spec,
    base_spec,
    write_heldout,
)
from concilium.embedpack.pilots import medoid_pilots
from concilium.embedpack.splits import DomainSplit, split_domain
from concilium.embedpack.train import FitResult, TrainConfig, save_adapter, train_adapter

Progress = Callable[[str], None]
REPORT = "REPORT.md"


@dataclass(frozen=True, slots=True)
class BuildConfig:
    """Everything that sizes a build."""

    train: TrainConfig
    n_eval: int = 200  # held-out items per domain (test queries and their corpus)
    max_train: int = 1000  # training pairs per domain, at most
    n_pilots: int = 12


FULL = BuildConfig(train=TrainConfig(steps=30, batch_size=32))
QUICK = BuildConfig(
    train=TrainConfig(steps=2, batch_size=8, doc_len=64), n_eval=20, max_train=64, n_pilots=4
)


def build_pack(
    out: Path, *, seed: int = 0, quick: bool = False, progress: Progress | None = None
) -> Path:
    """Build into `<out>.tmp`, then replace `out`; returns `out`."""
    from concilium.experts.embedder import SentenceEncoder, default_model_dir

    say = progress or (lambda _m: None)
    cfg = QUICK if quick else FULL
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "adapters").mkdir(parents=True)
    model_dir = default_model_dir()
    encoder = SentenceEncoder(model_dir)
    experts: list[dict[str, Any]] = []
    heldout: list[Item] = []
    report: dict[str, dict[str, Any]] = {}
    for domain in DOMAINS:
        split = split_domain(
            domain.name, extract(domain), seed=seed, n_eval=cfg.n_eval, max_train=cfg.max_train
        )
        queries = [it.query for it in split.train]
        pilots = medoid_pilots(queries, encoder.encode(queries), cfg.n_pilots, seed=seed)
        say(f"{domain.name}: {len(split.train)} train / {len(split.heldout)} held-out; training")
        fit = _train_one(model_dir, domain, split, cfg, tmp, seed, say)
        experts.append(adapter_spec(domain, pilots, fit.lora_params))
        heldout += split.heldout
        report[domain.name] = _domain_report(split, fit)
    write_heldout(tmp, heldout)
    manifest = {
        "version": 1,
        "seed": seed,
        "quick": quick,
        "base": base_spec(model_dir),
        "experts": experts,
        "packages": package_versions(),
        "heldout": HELDOUT,
        "build": {**asdict(cfg), "seconds": round(time.perf_counter() - t0, 1)},
        "report": report,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    (tmp / REPORT).write_text(render_report(manifest))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    say(f"built {out} in {time.perf_counter() - t0:.0f} s")
    return out


def _train_one(
    model_dir: Path,
    domain: Domain,
    split: DomainSplit,
    cfg: BuildConfig,
    tmp: Path,
    seed: int,
    say: Progress,
) -> FitResult:
    from concilium.registry.validate import validate_adapter_dir, validate_model_dir

    pairs = [(it.query, it.document) for it in split.train]
    model, fit = train_adapter(model_dir, pairs, cfg.train, seed=seed, progress=say)
    adir = tmp / "adapters" / domain.name
    save_adapter(model, adir)
    validate_adapter_dir(adir, validate_model_dir(model_dir))  # what registration will check
    loss = f"{fit.first_loss:.3f} -> {fit.last_loss:.3f}"
    say(f"  {fit.steps} steps, loss {loss}, {fit.seconds:.0f} s")
    return fit


def _domain_report(split: DomainSplit, fit: FitResult) -> dict[str, Any]:
    return {
        "train_pairs": len(split.train),
        "heldout": len(split.heldout),
        "steps": fit.steps,
        "first_loss": round(fit.first_loss, 4),
        "last_loss": round(fit.last_loss, 4),
        "seconds": round(fit.seconds, 1),
        "lora_params": fit.lora_params,
    }


def render_report(manifest: dict[str, Any]) -> str:
    """REPORT.md: what the pack holds and how its adapters trained."""
    lines = [
        "# Embedding pack",
        "",
        f"Built by `python -m concilium.embedpack.build` (seed {manifest['seed']}, "
        f"quick={manifest['quick']}) in {manifest['build']['seconds']} s. Base: all-MiniLM-L6-v2 "
        f"from `{manifest['base']['source']['distribution']}` "
        f"{manifest['base']['source']['version']}. Retrieval quality: "
        "`python benchmarks/retrieval_routing.py`.",
        "",
        "| expert | train pairs | held-out | steps | loss first → last | seconds |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, r in manifest["report"].items():
        lines.append(
            f"| minilm-{name} | {r['train_pairs']} | {r['heldout']} | {r['steps']} | "
            f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | {r['seconds']} |"
        )
    lines += ["", "Corpora: docstrings of these installed versions:", ""]
    lines += [f"- {k} {v}" for k, v in manifest["packages"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("embed_pack"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny splits, 2 steps per adapter")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")  # deprecation noise from the libraries walked for text
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    build_pack(args.out, seed=args.seed, quick=args.quick, progress=print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
