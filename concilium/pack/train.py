"""Training loops of the demo pack: the base's multi-task pre-training and one LoRA per skill.

Both stop early once a validation check passes (every `check_every` steps from `min_steps` on):
the base when every skill is solved when tagged, an adapter when its skill is solved from
natural-language queries of its *train* templates (held-out queries are never looked at).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from concilium.pack.data import Example, adapter_example, collate, pretrain_example
from concilium.pack.evaluate import exact_match, generate_prompts
from concilium.pack.model import LORA_TARGETS
from concilium.pack.tasks import SKILLS, Skill

Progress = Callable[[str], None]
Sampler = Callable[[random.Random], Example]
StopCheck = Callable[[], float]  # a validation score in [0, 1]


@dataclass(frozen=True, slots=True)
class Schedule:
    """Optimisation knobs of one training run (`steps` is the cap when a stop check is given)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 20
    log_every: int = 100
    check_every: int = 0  # 0: never run the stop check
    min_steps: int = 0
    target: float = 1.0  # stop once the check scores at least this


@dataclass(frozen=True, slots=True)
class FitResult:
    """How a run ended."""

    steps: int
    loss: float
    score: float | None


def lr_at(step: int, s: Schedule) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at `s.steps`."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def fit(
    model: Any,
    sample: Sampler,
    sched: Schedule,
    rng: random.Random,
    *,
    check: StopCheck | None = None,
    progress: Progress | None = None,
    tag: str = "",
) -> FitResult:
    """Train the model's trainable parameters on length-bucketed batches drawn from `sample`."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sched.lr, betas=(0.9, 0.98), weight_decay=0.0)
    say = progress or (lambda _msg: None)
    running, score, batches = 0.0, None, list[list[Example]]()
    for step in range(1, sched.steps + 1):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, sched)
        if not batches:
            batches = bucketed(sample, sched.batch_size, rng)
        loss = model(**collate(batches.pop())).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running = 0.9 * running + 0.1 * loss.item() if step > 1 else loss.item()
        if step % sched.log_every == 0:
            say(f"{tag} step {step}/{sched.steps} loss {running:.4f}")
        if check and _due(step, sched):
            model.eval()
            score = check()
            say(f"{tag} step {step}: validation {score:.3f}")
            if score >= sched.target:
                break
    model.eval()
    return FitResult(step, running, score)


def _due(step: int, s: Schedule) -> bool:
    return s.check_every > 0 and step >= s.min_steps and step % s.check_every == 0


def bucketed(
    sample: Sampler, batch_size: int, rng: random.Random, n_batches: int = 8
) -> list[list[Example]]:
    """`n_batches` batches of similar-length examples (little padding), in random order."""
    pool = sorted((sample(rng) for _ in range(batch_size * n_batches)), key=_length)
    out = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    rng.shuffle(out)
    return out


def _length(e: Example) -> int:
    return len(e.prompt) + len(e.answer)


def group_accuracies(
    model: Any, groups: Sequence[Sequence[Example]], max_new_tokens: int
) -> list[float]:
    """Exact-match accuracy of each group of examples (one generation pass over all)."""
    flat = [e for g in groups for e in g]
    preds = iter(generate_prompts(model, [e.prompt for e in flat], max_new_tokens))
    return [exact_match([next(preds) for _ in g], [e.answer for e in g]) for g in groups]


def pretrain_base(
    model: Any,
    sched: Schedule,
    rng: random.Random,
    validation: Sequence[Sequence[Example]] = (),
    progress: Progress | None = None,
) -> FitResult:
    """Pre-train the base on the tagged mixture until every `validation` group (skill) is solved."""
    n_new = max((len(e.answer) for g in validation for e in g), default=0) + 1

    def check() -> float:
        scores = group_accuracies(model, validation, n_new)
        worst = min(range(len(scores)), key=scores.__getitem__)
        if progress:
            progress(f"base: worst tagged skill {SKILLS[worst].name} {scores[worst]:.3f}")
        return min(scores)

    return fit(
        model,
        pretrain_example,
        sched,
        rng,
        check=check if validation else None,
        progress=progress,
        tag="base",
    )


def lora_config(r: int = 8, alpha: int = 16) -> Any:
    """The PEFT LoRA config every skill adapter uses."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type=TaskType.CAUSAL_LM,
    )


def train_adapter(
    peft_model: Any,
    skill: Skill,
    sched: Schedule,
    rng: random.Random,
    validation: Sequence[Example] = (),
    progress: Progress | None = None,
) -> FitResult:
    """Add a LoRA named after `skill` to `peft_model` and train it on its train templates."""
    if skill.name not in peft_model.peft_config:
        peft_model.add_adapter(skill.name, lora_config())
    peft_model.set_adapter(skill.name)
    n_new = skill.max_answer_len + 1
    check = (lambda: group_accuracies(peft_model, [validation], n_new)[0]) if validation else None

    def sample(r: random.Random) -> Example:
        return adapter_example(skill, r)

    return fit(peft_model, sample, sched, rng, check=check, progress=progress, tag=skill.name)
