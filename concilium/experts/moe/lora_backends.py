"""Backends of the MoE-LoRA layer: the adapter delta ``Σₖ gₖ · Bᵢₖ (Aᵢₖ x)`` for every token.

Each backend computes the same function of the same tensors; ``reference`` is the ground truth
the grid test compares the others with, forward and backward::

    x [T, D]  A [N, R, D]  B [N, Dout, R]  gates [T, K] (scaling folded in)  idxs [T, K]
    -> delta [T, Dout]

* ``reference``: one dense masked matmul pair per adapter, over all tokens. Obvious, slow.
* ``gather``: gathers every (token, slot)'s A and B and runs one batched matvec pair; its memory
  grows with T·K·R·(D + Dout), so it is the small-T path.
* ``grouped``: sorts the T·K slots by adapter into contiguous segments and runs one grouped matmul
  per projection (``torch._grouped_mm``), then scatter-adds the slots back onto their tokens.
* ``auto``: ``gather`` while the gathered weights T·K·R·(D + Dout) stay under
  ``gather_max_bytes`` (a decode step of a small model, or a handful of slots of a large one),
  else ``grouped``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from concilium.errors import ConfigError


class LoRABackend(ABC):
    """One way to compute the mixture delta; stateless, so one instance serves every layer."""

    name: ClassVar[str]

    @abstractmethod
    def add(
        self, y: Tensor, x: Tensor, a: Tensor, b: Tensor, gates: Tensor, idxs: Tensor
    ) -> Tensor:
        """``y [T, Dout] + delta``; ``x [T, D], a [N, R, D], b [N, Dout, R], gates/idxs [T, K]``.

        With autograd off (serving) ``y`` may be updated in place and returned.
        """


def _inplace() -> bool:
    return not torch.is_grad_enabled()


class ReferenceBackend(LoRABackend):
    """Loop over adapters: each one's delta over all tokens, weighted by its gate (0 if unused)."""

    name = "reference"

    def add(
        self, y: Tensor, x: Tensor, a: Tensor, b: Tensor, gates: Tensor, idxs: Tensor
    ) -> Tensor:
        for n in range(a.shape[0]):
            w = (gates * (idxs == n)).sum(-1)  # [T] this adapter's total gate per token
            y = y + w[:, None] * ((x @ a[n].T) @ b[n].T)
        return y


class GatherBackend(LoRABackend):
    """Per-slot gathered weights and two batched matvecs: best when T·K is a handful of slots."""

    name = "gather"

    def add(
        self, y: Tensor, x: Tensor, a: Tensor, b: Tensor, gates: Tensor, idxs: Tensor
    ) -> Tensor:
        (t, k), (n, r, d), d_out = idxs.shape, a.shape, b.shape[1]  # sizes, not -1: T·K may be 0
        flat = idxs.reshape(-1)  # [T·K]
        a_s = a.reshape(n, -1).index_select(0, flat).view(t, k * r, d)  # [T, K·R, D]
        h = torch.bmm(a_s, x[:, :, None]).view(t, k, r) * gates[:, :, None]  # [T, K, R]
        bt = b.transpose(1, 2)  # [N, R, Dout], a view: no copy when b is stored transposed
        b_s = bt.reshape(n, -1).index_select(0, flat).view(t, k * r, d_out)  # [T, K·R, Dout]
        y3, h3 = y.view(t, 1, d_out), h.view(t, 1, k * r)  # [T, 1, Dout], [T, 1, K·R]
        return (y3.baddbmm_(h3, b_s) if _inplace() else torch.baddbmm(y3, h3, b_s)).view_as(y)


class GroupedBackend(LoRABackend):
    """Slots sorted by adapter; one grouped matmul per projection over the contiguous segments.

    ``torch._grouped_mm`` wants 16-byte-aligned strides, so odd D / R / Dout are zero-padded first
    (exact; a copy per call, which the layer avoids by padding R once and real models by their D).
    """

    name = "grouped"

    def add(
        self, y: Tensor, x: Tensor, a: Tensor, b: Tensor, gates: Tensor, idxs: Tensor
    ) -> Tensor:
        d_out = b.shape[1]
        x, a, b = _pad_last(x), _pad_dims(a), _pad_dims(b)
        n, k = a.shape[0], idxs.shape[1]
        flat = idxs.reshape(-1)  # [S = T·K]
        order = torch.argsort(flat, stable=True)  # [S] slots grouped by adapter
        offs = torch.bincount(flat, minlength=n).cumsum(0).to(torch.int32)  # [N] segment ends
        tok = order // k  # [S] token of each sorted slot
        h = torch._grouped_mm(x.index_select(0, tok), a.transpose(1, 2), offs=offs)  # [S, R]
        h = h * gates.reshape(-1).index_select(0, order)[:, None]
        y_s = torch._grouped_mm(h, b.transpose(1, 2), offs=offs)[:, :d_out]  # [S, Dout]
        return y.index_add_(0, tok, y_s) if _inplace() else y.index_add(0, tok, y_s)


def _aligned(size: int, t: Tensor) -> int:
    step = max(16 // t.element_size(), 1)
    return -(-size // step) * step


def _pad_last(t: Tensor) -> Tensor:
    """Zero-pad the last dim to a 16-byte multiple (no copy when it already is one)."""
    extra = _aligned(t.shape[-1], t) - t.shape[-1]
    return nn.functional.pad(t, (0, extra)) if extra else t


def _pad_dims(w: Tensor) -> Tensor:
    """``[N, P, Q]`` zero-padded in both P and Q to 16-byte multiples."""
    p, q = w.shape[1:]
    extra_p, extra_q = _aligned(p, w) - p, _aligned(q, w) - q
    return nn.functional.pad(w, (0, extra_q, 0, extra_p)) if extra_p or extra_q else w


class AutoBackend(LoRABackend):
    """``gather`` while its per-slot copies of A and B are small, ``grouped`` otherwise.

    Measured here (fp32, 1 thread) the two cross where the gathered bytes reach 0.5–0.8 MiB:
    D = 128, R = 8, 16 adapters, 32 one-token rows (a demo-base decode step): gather 72 µs vs
    grouped 127 µs (one ``_grouped_mm`` segment per adapter costs more than the math); D = 1024,
    R = 16: gather wins up to 4 slots and ties at 8 (1 MiB), grouped is far ahead beyond.
    """

    name = "auto"
    gather_max_bytes: ClassVar[int] = 1 << 19

    def add(
        self, y: Tensor, x: Tensor, a: Tensor, b: Tensor, gates: Tensor, idxs: Tensor
    ) -> Tensor:
        gathered = idxs.numel() * a.shape[1] * (a.shape[2] + b.shape[1]) * a.element_size()
        impl = _GATHER if gathered <= self.gather_max_bytes else _GROUPED
        return impl.add(y, x, a, b, gates, idxs)


_GATHER, _GROUPED = GatherBackend(), GroupedBackend()

LORA_BACKENDS: dict[str, type[LoRABackend]] = {
    cls.name: cls for cls in (ReferenceBackend, GatherBackend, GroupedBackend, AutoBackend)
}


def get_backend(name: str) -> LoRABackend:
    """The backend called ``name``; a bad name fails with the valid set."""
    if name not in LORA_BACKENDS:
        raise ConfigError(f"unknown MoE-LoRA backend {name!r} (valid: {sorted(LORA_BACKENDS)})")
    return LORA_BACKENDS[name]()
