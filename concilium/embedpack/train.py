"""Contrastive LoRA training of one domain embedding expert on all-MiniLM-L6-v2.

The model is the sentence-transformer's own pipeline re-created in plain torch (BERT encoder,
mean pooling over the attention mask, L2 normalisation), with a PEFT LoRA on the attention
projections (query, key, value) of every layer. The loss is a symmetric InfoNCE over in-batch
negatives (MultipleNegativesRankingLoss in both directions, scale 20): for a batch of B pairs the
similarity matrix is [B, B] and the diagonal holds the positives. Batches come from one domain, so
every negative is an in-domain document.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LORA_TARGETS", "FitResult", "TrainConfig", "save_adapter", "train_adapter"]

LORA_TARGETS = ("query", "key", "value")
HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # written into adapter_config.json
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Knobs of one adapter's training run."""

    steps: int = 48
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 4
    rank: int = 8
    alpha: int = 16
    scale: float = 20.0  # 1 / temperature of the InfoNCE softmax
    query_len: int = 48  # tokens
    doc_len: int = 192  # tokens


@dataclass(frozen=True, slots=True)
class FitResult:
    """How a run ended."""

    steps: int
    first_loss: float
    last_loss: float  # mean over the last quarter of the steps
    seconds: float
    lora_params: int


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at `cfg.steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))


def train_adapter(
    model_dir: Path,
    pairs: Sequence[tuple[str, str]],
    cfg: TrainConfig,
    *,
    seed: int,
    progress: Progress | None = None,
) -> tuple[Any, FitResult]:
    """Train a LoRA on (query, document) pairs; returns the PEFT model and how the run went."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0
    )
    model = get_peft_model(base, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(pairs)), len(pairs))  # epochs of fresh permutations
        batch = [pairs[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = _info_nce(model, tok, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress and (step + 1) % max(1, cfg.steps // 4) == 0:
            progress(f"  step {step + 1}/{cfg.steps} loss {losses[-1]:.3f}")
    model.eval()
    tail = losses[-max(1, len(losses) // 4) :]
    return model, FitResult(
        steps=cfg.steps,
        first_loss=losses[0] if losses else float("nan"),
        last_loss=sum(tail) / len(tail) if tail else float("nan"),
        seconds=time.perf_counter() - t0,
        lora_params=sum(p.numel() for p in params),
    )


def _info_nce(model: Any, tok: Any, batch: list[tuple[str, str]], cfg: TrainConfig) -> Any:
    import torch
    import torch.nn.functional as F

    q = _embed(model, tok, [p[0] for p in batch], cfg.query_len)  # [B, D]
    d = _embed(model, tok, [p[1] for p in batch], cfg.doc_len)  # [B, D]
    logits = cfg.scale * q @ d.T  # [B, B], positives on the diagonal
    target = torch.arange(len(batch))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _embed(model: Any, tok: Any, texts: list[str], max_len: int) -> Any:
    """Mean-pooled, L2-normalised embeddings [B, D]: the sentence-transformer's pipeline."""
    import torch.nn.functional as F

    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    h = model(**enc).last_hidden_state  # [B, T, D]
    mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # [B, T, 1]
    return F.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def save_adapter(model: Any, out: Path) -> None:
    """`adapter_config.json` + `adapter_model.safetensors`, with no machine-specific path in it."""
    import json

    model.save_pretrained(str(out), safe_serialization=True)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = HUB_NAME  # PEFT wrote this machine's model directory
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set, in hash order
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()  # PEFT's model-card stub: nothing the registry needs
