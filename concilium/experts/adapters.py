"""Resident LoRA adapters of one base model, applied per batch row through the MoE-LoRA layer.

The adapters' A/B matrices (read from `adapter_model.safetensors`, never pickle) are stacked per
target module into a :class:`LoRAMixture`; each adapted ``nn.Linear`` of the base is replaced once
by a :class:`RowAdapterLinear` that routes every token of row b to that row's adapter (weight 1;
base rows get weight 0). A batch whose rows use 16 different adapters is then one grouped matmul per
module instead of PEFT's loop over adapters. The stack is rebuilt lazily when the set changes.

A row may instead be a :class:`~concilium.experts.mixing.MixtureRow`: its tokens are routed per
layer by that request's token router among its candidate adapters (top-k, gates from the router),
in the same grouped matmul as the single-adapter rows of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from concilium.errors import InvalidInput
from concilium.experts.mixing import MixtureRow, route_rows
from concilium.experts.moe.lora_mixture import LoRAMixture, LoRAWeights
from concilium.experts.moe.lora_patch import load_lora_weights, replace_module, zero_lora


class RowAdapterLinear(nn.Module):
    """A base linear plus the bank's mixture: row b of ``x [B, L, D]`` uses adapter rows[b]
    (or, for a mixture row, the adapters its token router picks per token)."""

    def __init__(self, name: str, base: nn.Linear, bank: AdapterBank) -> None:
        super().__init__()
        self.name, self.base = name, base
        self.mixture: LoRAMixture | None = None
        self._bank = [bank]  # a list: not a submodule

    def forward(self, x: Tensor) -> Tensor:
        bank = self._bank[0]
        rows = bank.rows  # [B] adapter index, -1 = no adapter (or a mixture row)
        if self.mixture is None or rows is None:
            return self.base(x)
        lead, d = x.shape[:-1], x.shape[-1]
        if bank.mixtures:
            gates, idxs = bank.route(self.name, x)  # [T, K] each
            return self.mixture(x.reshape(-1, d), gates, idxs).view(*lead, -1)
        if bool((rows < 0).all()):
            return self.base(x)
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
        self.mixtures: dict[int, MixtureRow] = {}  # batch row -> its token-level mixture
        self.valid: Tensor | None = None  # [B, L] real tokens of the next forward (stats only)
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
        layer = RowAdapterLinear(module, base, self)
        replace_module(self.model, module, layer)
        self.layers[module] = layer

    def set_rows(self, adapters: Sequence[str | MixtureRow | None]) -> None:
        """Select each row's adapter for the next forwards (None: the base alone; a MixtureRow:
        its candidates per token, all of which must be in the bank)."""
        if self._stale:
            self._rebuild()
        index = {n: i for i, n in enumerate(self.weights)}
        self.mixtures = {i: a for i, a in enumerate(adapters) if isinstance(a, MixtureRow)}
        for row in self.mixtures.values():
            row.bind(index)
        self.rows = torch.tensor([index[a] if isinstance(a, str) else -1 for a in adapters])
        self.valid = None

    def route(self, module: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, L, D]`` at ``module`` -> ``(gates [B·L, K], idxs [B·L, K])`` for every row:
        weight 1 on a single-adapter row's adapter, the router's top-k on a mixture row's tokens,
        zero-weight padding up to the batch's largest K."""
        assert self.rows is not None and x.dim() == 3, "route() needs set_rows and x [B, L, D]"
        b, length = x.shape[:2]
        valid = self.valid if self.valid is not None and self.valid.shape == (b, length) else None
        groups: dict[int, list[int]] = {}  # rows sharing a router are routed in one call
        for i, row in self.mixtures.items():
            groups.setdefault(id(row.router), []).append(i)
        routed = []
        for rows in groups.values():
            sel = torch.tensor(rows)
            mixed = [self.mixtures[i] for i in rows]
            g, ix = route_rows(mixed, x[sel], module, None if valid is None else valid[sel])
            routed.append((sel, g, ix))  # [R], [R, L, k], [R, L, k]
        k = max(g.shape[-1] for _, g, _ in routed)
        gates = x.new_zeros(b, length, k)  # [B, L, K]
        idxs = torch.zeros(b, length, k, dtype=torch.long)
        gates[:, :, 0] = (self.rows >= 0).to(x.dtype)[:, None]
        idxs[:, :, 0] = self.rows.clamp(min=0)[:, None]
        for sel, g, ix in routed:
            gates[sel, :, : g.shape[-1]], idxs[sel, :, : ix.shape[-1]] = g.to(x.dtype), ix
        return gates.view(b * length, k), idxs.view(b * length, k)

    def _rebuild(self) -> None:
        names = self.names
        for module, layer in self.layers.items():
            stack = [self.weights[n].get(module) or zero_lora(layer.base) for n in names]
            layer.mixture = LoRAMixture(layer.base, stack, backend=self.backend) if names else None
        self._stale = False

    def state(self) -> dict[str, Any]:
        return {"adapters": self.names, "modules": sorted(self.layers)}
