"""`SparseMoE`: a SwiGLU mixture-of-experts FFN that consumes a token router's (weights, idxs),
with its kernel picked by name from `MOE_BACKEND_CLS`.

    y = SparseMoE(...)(x [T, D], weights [T, K], idxs [T, K])  # [T, D]

Parameters: w13 [E, 2H, D] (w1 = rows :H, w3 = rows H:), w2 [E, D, H]; optional shared expert
(Qwen/DeepSeek style) shared_w13 [2Hs, D], shared_w2 [D, Hs] and Qwen's sigmoid gate [1, D].
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from concilium.errors import ConfigError
from concilium.experts.moe.kernels.decode import decode_moe
from concilium.experts.moe.kernels.dense import dense_moe
from concilium.experts.moe.kernels.grouped import grouped_mm_fits, grouped_moe, needs_grad
from concilium.experts.moe.kernels.onednn import FormTuner, PackCache, PackedExperts
from concilium.experts.moe.kernels.tuning import Tuner
from concilium.experts.moe.reference import reference_moe, shared_swiglu, split_w13


class MoEBackend(ABC):
    """One kernel: (x [T, D], w13 [E, 2H, D], w2 [E, D, H], weights [T, K], idxs [T, K]) -> y [T, D]
    (idxs outside [0, E) are null slots that add nothing). An instance serves one layer: it may
    cache per-layer state such as prepacked weights."""

    name: ClassVar[str]

    def __init__(self, tuner: FormTuner | None = None) -> None:
        self.packs = PackCache(tuner=tuner)  # tuner None: the static forms (see onednn.py)

    @abstractmethod
    def __call__(self, x, w13, w2, weights, idxs) -> torch.Tensor: ...

    def packed(self, x, w13, w2, weights) -> PackedExperts | None:
        """The layer's packs for an inference call; None under autograd, which never uses them
        (building them there would repack every expert after each optimizer step)."""
        return None if needs_grad(x, w13, w2, weights) else self.packs.get(w13, w2)


class ReferenceBackend(MoEBackend):
    name = "reference"

    def __call__(self, x, w13, w2, weights, idxs) -> torch.Tensor:
        return reference_moe(x, w13, w2, weights, idxs)


class GroupedBackend(MoEBackend):
    name = "grouped"

    def __call__(self, x, w13, w2, weights, idxs) -> torch.Tensor:
        return grouped_moe(x, w13, w2, weights, idxs, packed=self.packed(x, w13, w2, weights))


class GroupedMMBackend(MoEBackend):
    name = "grouped_mm"

    def __call__(self, x, w13, w2, weights, idxs) -> torch.Tensor:
        return grouped_moe(x, w13, w2, weights, idxs, gemm="grouped_mm")


class DecodeBackend(MoEBackend):
    name = "decode"

    def __call__(self, x, w13, w2, weights, idxs) -> torch.Tensor:
        return decode_moe(x, w13, w2, weights, idxs, packed=self.packed(x, w13, w2, weights))


class DenseBackend(MoEBackend):
    name = "dense"

    def __call__(self, x, w13, w2, weights, idxs) -> torch.Tensor:
        return dense_moe(x, w13, w2, weights, idxs)


class AutoBackend(MoEBackend):
    """Picks by measured regime (fp32 CPU here). Tiny work (T·E·3·D·H <= dense_max_macs, e.g. a
    demo-base decode step): `dense`. Small experts (<= small_expert_bytes): `grouped_mm`, the
    fewest ops, since per-op overhead dominates. Large experts: `decode` while the batch is
    small (T <= decode_max_tokens), `grouped` beyond, both on packed weights whose form per row
    count is measured on this machine (`tuning.Tuner`; pass one to share it across layers)."""

    name = "auto"
    decode_max_tokens: ClassVar[int] = 4
    small_expert_bytes: ClassVar[int] = 1 << 20
    dense_max_macs: ClassVar[int] = 1 << 23

    def __init__(self, tuner: FormTuner | None = None) -> None:
        super().__init__(tuner if tuner is not None else Tuner())  # forms measured on this host

    def __call__(self, x, w13, w2, weights, idxs) -> torch.Tensor:
        e, h2, d = w13.shape
        if x.shape[0] * e * h2 * d * 3 // 2 <= self.dense_max_macs:
            return dense_moe(x, w13, w2, weights, idxs)
        if w13[0].nbytes + w2[0].nbytes <= self.small_expert_bytes and grouped_mm_fits(w2):
            return grouped_moe(x, w13, w2, weights, idxs, gemm="grouped_mm")
        packed = self.packed(x, w13, w2, weights)
        if x.shape[0] <= self.decode_max_tokens:
            return decode_moe(x, w13, w2, weights, idxs, packed=packed)
        return grouped_moe(x, w13, w2, weights, idxs, packed=packed)


MOE_BACKEND_CLS: dict[str, type[MoEBackend]] = {
    cls.name: cls
    for cls in (
        ReferenceBackend,
        GroupedBackend,
        GroupedMMBackend,
        DecodeBackend,
        DenseBackend,
        AutoBackend,
    )
}


def get_backend(name: str, tuner: FormTuner | None = None) -> MoEBackend:
    """The backend called `name` (with `tuner` measuring its packed forms; `auto` makes its own
    when None); a ConfigError naming the valid set otherwise."""
    if name not in MOE_BACKEND_CLS:
        raise ConfigError(f"unknown MoE backend {name!r}; valid: {sorted(MOE_BACKEND_CLS)}")
    return MOE_BACKEND_CLS[name](tuner)


def _param(*shape: int, fan_in: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) / math.sqrt(fan_in))


class SparseMoE(nn.Module):
    """E SwiGLU experts (D -> H -> D) plus an optional shared expert (D -> Hs -> D)."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        ffn_hidden: int,
        *,
        shared_hidden: int = 0,
        shared_gate: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.backend = get_backend(backend)
        self.w13 = _param(num_experts, 2 * ffn_hidden, hidden, fan_in=hidden)  # [E, 2H, D]
        self.w2 = _param(num_experts, hidden, ffn_hidden, fan_in=ffn_hidden)  # [E, D, H]
        hs = shared_hidden  # Hs
        self.shared_w13 = _param(2 * hs, hidden, fan_in=hidden) if hs else None  # [2Hs, D]
        self.shared_w2 = _param(hidden, hs, fan_in=hs) if hs else None  # [D, Hs]
        gated = shared_gate and hs > 0
        self.shared_gate = _param(1, hidden, fan_in=hidden) if gated else None  # [1, D]

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def w1(self) -> torch.Tensor:
        """Gate projections [E, H, D] (a view of w13)."""
        return split_w13(self.w13)[0]

    @property
    def w3(self) -> torch.Tensor:
        """Up projections [E, H, D] (a view of w13)."""
        return split_w13(self.w13)[1]

    def set_backend(self, name: str) -> None:
        self.backend = get_backend(name)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idxs: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights [T, K], idxs [T, K] -> [T, D]."""
        if x.dim() != 2 or weights.shape != idxs.shape or idxs.shape[0] != x.shape[0]:
            raise ValueError(
                f"expected x [T, D], weights/idxs [T, K]; got {tuple(x.shape)}, "
                f"{tuple(weights.shape)}, {tuple(idxs.shape)}"
            )
        y = self.backend(x, self.w13, self.w2, weights, idxs)
        if self.shared_w13 is not None and self.shared_w2 is not None:
            y = y + shared_swiglu(x, self.shared_w13, self.shared_w2, self.shared_gate)
        return y
