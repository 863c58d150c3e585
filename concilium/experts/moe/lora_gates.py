"""Per-adapter routing artifacts, computed at registration from that adapter alone.

* :func:`arrow_prototypes` — Arrow, no training: per adapted layer, the top right-singular vector
  of ``B·A`` (via a QR of B, so the SVD is of an ``[r, D]`` matrix, never ``[Dout, D]``).
* :func:`train_phatgoose_gate` — PHATGOOSE: per adapted layer a gate vector ``v [D]``; the layer
  becomes ``W x + σ(v·x) · s·B A x``; only the gates train, on the adapter's own examples, with the
  base and the adapter frozen. The model is patched for the run and restored after.
  :class:`PhatgooseTrainer` is the registration-time driver (its own copy of the base, thread cap).

Both read one adapter and return ``{module name: tensor [D]}``; nothing else is touched, so
registering an adapter changes no other adapter's artifacts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from concilium.errors import InvalidInput
from concilium.experts.moe.lora_mixture import LoRAWeights
from concilium.experts.moe.lora_patch import load_lora_weights, replace_module

log = logging.getLogger(__name__)


def arrow_prototypes(adapter: str | Path | Mapping[str, LoRAWeights]) -> dict[str, Tensor]:
    """``{module: p [D]}``: unit top right-singular vector of each layer's ``B·A``."""
    weights = load_lora_weights(adapter) if isinstance(adapter, str | Path) else adapter
    return {module: _top_right_singular(w.a, w.b) for module, w in weights.items()}


def _top_right_singular(a: Tensor, b: Tensor) -> Tensor:
    """``a [r, D], b [Dout, r]`` -> unit ``[D]``, sign fixed (largest entry positive)."""
    _, r_b = torch.linalg.qr(b.double())  # B = Q R_b: B·A and R_b·A share right-singular vectors
    _, _, vh = torch.linalg.svd(r_b @ a.double(), full_matrices=False)
    p = vh[0]
    return (p * torch.sign(p[p.abs().argmax()])).float()


class GatedLoRA(nn.Module):
    """``base(x) + σ(x·v) · s·B(A x)`` with only ``v`` trainable (PHATGOOSE's gate)."""

    a: Tensor
    b: Tensor

    def __init__(self, base: nn.Linear, w: LoRAWeights) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("a", w.a.to(base.weight.dtype))  # [r, D]
        self.register_buffer("b", (w.b * w.scaling).to(base.weight.dtype))  # [Dout, r]
        self.gate = nn.Parameter(torch.zeros(base.in_features, dtype=base.weight.dtype))  # [D]

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(x @ self.gate)[..., None]  # [..., 1]
        return self.base(x) + g * ((x @ self.a.T) @ self.b.T)


def train_phatgoose_gate(
    model: nn.Module,
    tokenizer: Any,
    adapter: str | Path | Mapping[str, LoRAWeights],
    examples: Sequence[tuple[str, str]],
    *,
    steps: int = 100,
    lr: float = 1e-2,
    batch_size: int = 16,
    seed: int = 0,
    time_budget_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Tensor]:
    """Train one adapter's gates on its own ``(prompt, completion)`` examples -> ``{module: v}``.

    ``model`` is the plain base causal LM (it is patched during training and restored, its weights
    untouched); ``tokenizer`` formats prompts with its chat template when it has one. Training
    stops early (fewer than ``steps``) once ``time_budget_s`` seconds have passed or
    ``should_stop()`` is true, if given.
    """
    if not examples:
        raise InvalidInput("PHATGOOSE gate training needs at least one example")
    weights = load_lora_weights(adapter) if isinstance(adapter, str | Path) else adapter
    rows = [_encode(tokenizer, p, c) for p, c in examples]
    was_training, grad_flags = model.training, _freeze(model)
    gated = {m: GatedLoRA(_linear(model, m), w) for m, w in weights.items()}
    originals = {m: replace_module(model, m, g) for m, g in gated.items()}
    try:
        pad = int(getattr(tokenizer, "pad_token_id", None) or 0)
        knobs = (steps, lr, batch_size, seed)
        stop = _stopper(time_budget_s, should_stop)
        _fit(model, [g.gate for g in gated.values()], rows, knobs, pad, stop)
    finally:
        for m, orig in originals.items():
            replace_module(model, m, orig)
        _restore(model, grad_flags, was_training)
    return {m: g.gate.detach().clone() for m, g in gated.items()}


def _encode(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], int]:
    """Token ids of prompt + completion + eos, and the prompt's length (its tokens get no loss)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return [*p_ids, *c_ids, tokenizer.eos_token_id], len(p_ids)


def _batch(rows: Sequence[tuple[list[int], int]], pad: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 off the completion)."""
    t = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, (r, n_prompt) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, n_prompt : len(r)] = ids[i, n_prompt : len(r)]
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise InvalidInput(f"{name} is a {type(module).__name__}, not nn.Linear")
    return module


def _fit(
    model: nn.Module,
    params: list[nn.Parameter],
    rows: list[tuple[list[int], int]],
    knobs: tuple[int, float, int, int],
    pad: int,
    stop: Callable[[], bool],
) -> None:
    steps, lr, batch_size, seed = knobs
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        if stop():
            log.warning("PHATGOOSE gate training stopped after %d of %d steps", step, steps)
            break
        pick = torch.randint(len(rows), (min(batch_size, len(rows)),), generator=gen).tolist()
        loss = model(**_batch([rows[i] for i in pick], pad)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _stopper(
    time_budget_s: float | None, should_stop: Callable[[], bool] | None
) -> Callable[[], bool]:
    """True once the time budget is spent or the caller asks to stop."""
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s

    def stop() -> bool:
        late = deadline is not None and time.monotonic() > deadline
        return late or (should_stop is not None and should_stop())

    return stop


def _freeze(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Freeze every parameter (the gates, created after, are the only trainable ones)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    return flags


def _restore(model: nn.Module, flags: Sequence[tuple[nn.Parameter, bool]], training: bool) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)
    model.train(training)


class PhatgooseTrainer:
    """Trains gates at registration on a private copy of one base (never the serving model:
    training patches it). Thread-safe: one training at a time. ``threads`` caps the intra-op
    threads of the calling thread only (PyTorch's setting is per thread), so serving threads
    keep theirs."""

    def __init__(self, *, steps: int = 100, time_budget_s: float = 30.0, threads: int = 1) -> None:
        import threading

        self.steps, self.time_budget_s, self.threads = steps, time_budget_s, threads
        self._model: tuple[str, Any, Any] | None = None  # (base dir, model, tokenizer)
        self._lock = threading.Lock()

    def __call__(
        self,
        base_dir: Path,
        adapter_dir: Path,
        examples: Sequence[tuple[str, str]],
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """``{module: gate [D]}`` as numpy arrays (what the artifact store keeps)."""
        with self._lock:
            model, tok = self._base(base_dir)
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                gates = train_phatgoose_gate(
                    model,
                    tok,
                    adapter_dir,
                    examples,
                    steps=self.steps,
                    time_budget_s=self.time_budget_s,
                    should_stop=should_stop,
                )
            finally:
                torch.set_num_threads(before)
        return {m: g.numpy() for m, g in gates.items()}

    def _base(self, base_dir: Path) -> tuple[Any, Any]:
        if self._model is None or self._model[0] != str(base_dir):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(
                base_dir, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
            )
            self._model = (str(base_dir), model.eval(), AutoTokenizer.from_pretrained(base_dir))
        return self._model[1], self._model[2]
