"""Resident LoRA adapters of one base model, applied per batch row through the MoE-LoRA layer.

The adapters' A/B matrices (read from `adapter_model.safetensors`, never pickle) are stacked per
target module into a :class:`LoRAMixture`; each adapted ``nn.Linear`` of the base is replaced once
by a :class:`RowAdapterLinear` that routes every token of row b to that row's adapter (weight 1;
base rows get weight 0). A batch whose rows use 16 different adapters is then one grouped matmul per
module instead of PEFT's loop over adapters. The stack is rebuilt lazily when the set changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from concilium.errors import InvalidInput
from concilium.experts.moe.lora_mixture import LoRAMixture, LoRAWeights
from concilium.experts.moe.lora_patch import load_lora_weights, replace_module, zero_lora


class RowAdapterLinear(nn.Module):
    """A base linear plus the bank's mixture: row b of ``x [B, L, D]`` uses adapter rows[b]."""

    def __init__(self, base: nn.Linear, bank: AdapterBank) -> None:
        super().__init__()
        self.base = base
        self.mixture: LoRAMixture | None = None
        self._bank = [bank]  # a list: not a submodule

    def forward(self, x: Tensor) -> Tensor:
        rows = self._bank[0].rows  # [B] adapter index, -1 = no adapter
        if self.mixture is None or rows is None or bool((rows < 0).all()):
            return self.base(x)
        lead, d = x.shape[:-1], x.shape[-1]
        per_token = rows.view(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1, 1)  # [T, 1]
        gates = (per_token >= 0).to(x.dtype)  # [T, 1]
        out = self.mixture(x.reshape(-1, d), gates, per_token.clamp(min=0))
        return out.view(*lead, -1)


class AdapterBank:
    """The adapters resident on one base model (insertion order = stack order)."""

    def __init__(self, model: nn.Module, backend: str = "auto") -> None:
        self.model, self.backend = model, backend
        self.weights: dict[str, dict[str, LoRAWeights]] = {}
        self.layers: dict[str, RowAdapterLinear] = {}
        self.rows: Tensor | None = None
        self._stale = False

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def add(self, name: str, path: str | Path) -> None:
        weights = load_lora_weights(path)
        for module in weights:
            if module not in self.layers:
                self._patch(module)
        self.weights[name] = weights
        self._stale = True

    def remove(self, name: str) -> None:
        if self.weights.pop(name, None) is not None:
            self._stale = True

    def _patch(self, module: str) -> None:
        try:
            base = self.model.get_submodule(module)
        except AttributeError:
            raise InvalidInput(f"the base model has no module {module!r}") from None
        if not isinstance(base, nn.Linear):
            raise InvalidInput(f"{module} is a {type(base).__name__}, not nn.Linear")
        layer = RowAdapterLinear(base, self)
        replace_module(self.model, module, layer)
        self.layers[module] = layer

    def set_rows(self, adapters: Sequence[str | None]) -> None:
        """Select each row's adapter for the next forwards (None: the base alone)."""
        if self._stale:
            self._rebuild()
        index = {n: i for i, n in enumerate(self.weights)}
        self.rows = torch.tensor([-1 if a is None else index[a] for a in adapters])

    def _rebuild(self) -> None:
        names = self.names
        for module, layer in self.layers.items():
            stack = [self.weights[n].get(module) or zero_lora(layer.base) for n in names]
            layer.mixture = LoRAMixture(layer.base, stack, backend=self.backend) if names else None
        self._stale = False

    def state(self) -> dict[str, Any]:
        return {"adapters": self.names, "modules": sorted(self.layers)}
