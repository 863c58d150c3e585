"""Loading PEFT LoRA adapters as tensors, and patching MoE-LoRA mixtures into a model.

``patch_lora_mixture(model, adapters, router)`` replaces every adapted ``nn.Linear`` of a plain
(non-PEFT) Hugging Face model with a :class:`MixtureLinear`: the base layer plus the stacked
adapters, routed per token by ``router`` at that layer and optionally restricted by a global
prior. The returned :class:`MixtureHandle` sets the prior, reports the routing summary and undoes
the patch. Adapters are read from ``adapter_model.safetensors`` only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from concilium.errors import InvalidInput
from concilium.experts.moe.lora_mixture import LoRAMixture, LoRAWeights

if TYPE_CHECKING:
    from concilium.routers.token.base import TokenPrior, TokenRouter

_PREFIX = "base_model.model."


def load_lora_weights(adapter_dir: str | Path) -> dict[str, LoRAWeights]:
    """``{module name: LoRAWeights}`` of a PEFT LoRA adapter directory (safetensors only)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir)
    cfg = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    out: dict[str, LoRAWeights] = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[module] = LoRAWeights(a.float(), b.float(), _scaling(cfg, a.shape[0]))
    if not out:
        raise InvalidInput(f"{path} holds no LoRA A/B weights")
    return out


def _scaling(cfg: Mapping[str, Any], r: int) -> float:
    alpha = float(cfg.get("lora_alpha", r))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted path ``name`` in ``model``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


class MixtureLinear(nn.Module):
    """Drop-in for one adapted linear layer: route the tokens, then run the mixture."""

    def __init__(self, name: str, mixture: LoRAMixture, handle: MixtureHandle) -> None:
        super().__init__()
        self.name, self.mixture = name, mixture
        self._handle = [handle]  # a list: not registered as a submodule (no cycle)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [T, D]
        handle = self._handle[0]
        prior = handle.token_prior(x.shape[:-1])
        gates, idxs = handle.router.route(flat, self.name, prior)  # [T, K] each
        handle.record(gates, idxs)
        d_out = self.mixture.base.out_features  # not -1: an empty batch has no size to infer
        return self.mixture(flat, gates, idxs).view(*x.shape[:-1], d_out)


class MixtureHandle:
    """A patched model: its router, the current prior, routing statistics, and ``remove()``.

    ``prior`` applies to the next forwards: ``[N]`` for every token, ``[T, N]`` per token, or
    ``[B, N]`` per row of a ``[B, L, D]`` batch (one prior per request; see ``stack_priors``).
    """

    def __init__(self, model: nn.Module, router: TokenRouter) -> None:
        self.model, self.router = model, router
        self.prior: TokenPrior | None = None
        self.originals: dict[str, nn.Module] = {}
        self.reset_stats()

    @property
    def adapters(self) -> list[str]:
        return list(self.router.adapters)

    def token_prior(self, lead: torch.Size) -> TokenPrior | None:
        """The prior per token: a per-row prior ``[B, N]`` is repeated over each row's L tokens."""
        p = self.prior
        if p is None or p.allowed.dim() == 1 or len(lead) != 2 or p.allowed.shape[0] != lead[0]:
            return p
        rows, length = lead

        def rep(t: Tensor) -> Tensor:
            return t[:, None, :].expand(rows, length, t.shape[-1]).reshape(rows * length, -1)

        return type(p)(rep(p.allowed), None if p.bias is None else rep(p.bias))

    def reset_stats(self) -> None:
        n = len(self.router.adapters)
        self._mass, self._entropy, self._tokens = torch.zeros(n), 0.0, 0

    def record(self, gates: Tensor, idxs: Tensor) -> None:
        """Accumulate adapter mass and per-token routing entropy (over every layer call)."""
        g = gates.detach().float()
        self._mass.index_add_(0, idxs.reshape(-1), g.reshape(-1))
        self._entropy += float(-(g * g.clamp_min(1e-12).log()).sum())
        self._tokens += g.shape[0]

    def summary(self) -> dict[str, Any]:
        """``{"adapter_shares": {adapter: share of routing mass}, "mean_entropy": nats}``."""
        total = float(self._mass.sum()) or 1.0
        shares = {n: float(m) / total for n, m in zip(self.adapters, self._mass, strict=True)}
        return {"adapter_shares": shares, "mean_entropy": self._entropy / max(self._tokens, 1)}

    def remove(self) -> None:
        """Put the original linear layers back."""
        for name, module in self.originals.items():
            replace_module(self.model, name, module)
        self.originals.clear()


def patch_lora_mixture(
    model: nn.Module,
    adapters: Mapping[str, str | Path | Mapping[str, LoRAWeights]],
    router: TokenRouter,
    *,
    backend: str = "auto",
) -> MixtureHandle:
    """Patch every module any adapter targets with a mixture of all ``router.adapters``.

    ``adapters`` maps each name in ``router.adapters`` to its directory or loaded weights; the
    stack follows the router's order. An adapter that does not target a module gets zeros there.
    """
    missing = [n for n in router.adapters if n not in adapters]
    if missing or not router.adapters:
        raise InvalidInput(f"no weights for router adapters {missing or '(none registered)'}")
    loaded = [_weights(adapters[n]) for n in router.adapters]
    handle = MixtureHandle(model, router)
    for module in sorted({m for w in loaded for m in w}):
        base = model.get_submodule(module)
        if not isinstance(base, nn.Linear):
            raise InvalidInput(f"{module} is a {type(base).__name__}, not nn.Linear")
        stack = [w.get(module) or zero_lora(base) for w in loaded]
        mixture = LoRAMixture(base, stack, backend=backend)
        handle.originals[module] = replace_module(
            model, module, MixtureLinear(module, mixture, handle)
        )
    return handle


def _weights(src: str | Path | Mapping[str, LoRAWeights]) -> Mapping[str, LoRAWeights]:
    return load_lora_weights(src) if isinstance(src, str | Path) else src


def zero_lora(base: nn.Linear) -> LoRAWeights:
    """A rank-1 all-zero adapter for `base` (stands in where an adapter skips a module)."""
    w = base.weight
    return LoRAWeights(w.new_zeros(1, base.in_features), w.new_zeros(base.out_features, 1), 0.0)
