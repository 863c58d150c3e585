"""The MoE-LoRA layer: one base ``nn.Linear`` plus N LoRA adapters mixed per token.

``y = W·x + b + Σₖ gₖ · sᵢₖ · Bᵢₖ (Aᵢₖ x)`` where the token router chose adapters ``idxs [T, K]``
with weights ``gates [T, K]`` and ``sᵢ`` is adapter i's LoRA scaling (alpha / r). The adapters of
one base are stacked: ``A [N, R, D]``, ``B [N, Dout, R]``; an adapter of rank r < R is zero-padded
(rows of A, columns of B), which leaves its product ``B·A`` unchanged. ``B`` is stored transposed
(``[N, R, Dout]`` contiguous, what the kernels read) with the scaling folded in. The layer never
routes: the caller passes the router's ``(gates, idxs)``; the arithmetic lives in a backend
(``lora_backends``), chosen by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from concilium.errors import InvalidInput
from concilium.experts.moe.lora_backends import get_backend


@dataclass(frozen=True, slots=True)
class LoRAWeights:
    """One adapter on one linear layer: ``A [r, D]``, ``B [Dout, r]``, scaling (alpha / r)."""

    a: Tensor
    b: Tensor
    scaling: float


def stack_adapters(
    adapters: Sequence[LoRAWeights], pad_to: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Pad ranks to the largest (rounded up to ``pad_to``) and stack: ``A [N, R, D]``,
    ``B [N, Dout, R]``, scalings ``[N]``."""
    if not adapters:
        raise InvalidInput("a LoRA mixture needs at least one adapter")
    r_max = -(-max(w.a.shape[0] for w in adapters) // pad_to) * pad_to
    a = torch.stack([nn.functional.pad(w.a, (0, 0, 0, r_max - w.a.shape[0])) for w in adapters])
    b = torch.stack([nn.functional.pad(w.b, (0, r_max - w.b.shape[1])) for w in adapters])
    s = torch.tensor([w.scaling for w in adapters], dtype=a.dtype)
    return a, b, s


class LoRAMixture(nn.Module):
    """A base linear layer and a stack of adapters; ``forward(x, gates, idxs)`` mixes per token."""

    def __init__(
        self,
        base: nn.Linear,
        adapters: Sequence[LoRAWeights],
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        a, b, s = stack_adapters(adapters, pad_to=4)  # R a multiple of 4: aligned kernels
        _check_shapes(base, a, b)
        self.base = base
        self.a = nn.Parameter(a.to(base.weight.dtype), requires_grad=False)  # [N, R, D]
        b_t = (b * s[:, None, None]).transpose(1, 2).contiguous()  # [N, R, Dout], scaled
        self.b_t = nn.Parameter(b_t.to(base.weight.dtype), requires_grad=False)
        self.register_buffer("scaling", s.to(base.weight.dtype))  # [N], for reference only
        self.backend = get_backend(backend)

    @property
    def b(self) -> Tensor:
        """``[N, Dout, R]`` with the scaling folded in (a view of ``b_t``)."""
        return self.b_t.transpose(1, 2)

    @property
    def num_adapters(self) -> int:
        return int(self.a.shape[0])

    def forward(self, x: Tensor, gates: Tensor, idxs: Tensor) -> Tensor:
        """``x [T, D], gates [T, K], idxs [T, K] -> [T, Dout]``."""
        self._check_route(x, gates, idxs)
        return self.backend.add(self.base(x), x, self.a, self.b, gates.to(x.dtype), idxs)

    def _check_route(self, x: Tensor, gates: Tensor, idxs: Tensor) -> None:
        if x.dim() != 2 or gates.shape != idxs.shape or idxs.shape[0] != x.shape[0]:
            raise InvalidInput(
                f"expected x [T, D], gates [T, K], idxs [T, K]; got {tuple(x.shape)}, "
                f"{tuple(gates.shape)}, {tuple(idxs.shape)}"
            )


def _check_shapes(base: nn.Linear, a: Tensor, b: Tensor) -> None:
    d, d_out = base.in_features, base.out_features
    if a.shape[2] != d or b.shape[1] != d_out:
        raise InvalidInput(
            f"adapters of shape A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a linear "
            f"layer {d} -> {d_out}"
        )
