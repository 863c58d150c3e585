"""Token→expert dispatch shared by the kernels: sort the (token, slot) pairs by expert once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from concilium.experts.moe.kernels import onednn
from concilium.experts.moe.kernels.onednn import PackedExperts


@dataclass(frozen=True, slots=True)
class Dispatch:
    """The routed pairs of one batch, grouped by expert (null slots dropped).

    S = number of real (token, slot) pairs; segment e is rows [offsets[e], offsets[e] + counts[e]).
    """

    token: torch.Tensor  # [S] int64, token index of each pair, sorted by expert
    weight: torch.Tensor  # [S] routing weight of each pair
    counts: tuple[int, ...]  # [E] pairs per expert

    @property
    def offsets(self) -> torch.Tensor:
        """[E] int32 cumulative ends of the segments (the `offs` of torch._grouped_mm)."""
        counts = torch.tensor(self.counts, dtype=torch.int32, device=self.token.device)
        return torch.cumsum(counts, dim=0, dtype=torch.int32)

    def segments(self) -> list[tuple[int, int, int]]:
        """(expert, start, end) of every non-empty segment, in row order."""
        out, start = [], 0
        for e, n in enumerate(self.counts):
            if n:
                out.append((e, start, start + n))
            start += n
        return out


def plan(weights: torch.Tensor, idxs: torch.Tensor, num_experts: int) -> Dispatch:
    """Group pairs by expert: weights [T, K], idxs [T, K] -> Dispatch over S <= T*K pairs.

    Indices outside [0, E) are null slots (AdaMoE null experts, expert-parallel sentinels).
    """
    flat = idxs.reshape(-1)  # [T*K]
    k = idxs.shape[-1]
    null = (flat < 0) | (flat >= num_experts)
    key = torch.where(null, torch.full_like(flat, num_experts), flat)
    _, order = torch.sort(key, stable=True)  # [T*K], nulls last
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]  # [E]
    counts_list = tuple(int(c) for c in counts.tolist())
    order = order[: sum(counts_list)]  # [S]
    return Dispatch(
        token=torch.div(order, k, rounding_mode="floor"),
        weight=weights.reshape(-1)[order],
        counts=counts_list,
    )


def combine(out: torch.Tensor, d: Dispatch, num_tokens: int) -> torch.Tensor:
    """One weighted scatter back: out [S, D] per pair -> y [T, D] summed over each token's slots."""
    weighted = out * d.weight.to(out.dtype).unsqueeze(-1)  # [S, D]
    y = out.new_zeros(num_tokens, out.shape[-1])  # [T, D]
    return y.index_add(0, d.token, weighted)


def combine_(out: torch.Tensor, d: Dispatch, num_tokens: int) -> torch.Tensor:
    """In-place `combine` for inference (no autograd): scales `out` and accumulates into y."""
    out.mul_(d.weight.to(out.dtype).unsqueeze(-1))
    y = out.new_zeros(num_tokens, out.shape[-1])  # [T, D]
    return y.index_add_(0, d.token, out)


def expert_swiglu(
    x: torch.Tensor,
    e: int,
    w13: torch.Tensor,
    w2: torch.Tensor,
    packed: PackedExperts | None,
) -> torch.Tensor:
    """Expert e's SwiGLU on x [n, D] -> [n, D] for inference (no autograd), in the form the
    packs give for n rows (see `onednn.Form`), or on plain `mm` without packs."""
    n = x.shape[0]
    form = packed.form(n) if packed is not None and n > 0 else None
    if form is not None and n < form.pad:
        x = torch.cat([x, x.new_zeros(form.pad - n, x.shape[1])])  # [pad, D]
    if packed is None or form is None or form.pack is None:
        h = torch.mm(x, w13[e].t())  # [n', 2H]
        return torch.mm(_swiglu_act(h), w2[e].t())[:n]
    h = onednn.linear(x.contiguous(), packed.w13[form.pack][e])  # [n', 2H]
    return onednn.linear(_swiglu_act(h), packed.w2[form.pack][e])[:n]


def _swiglu_act(h: torch.Tensor) -> torch.Tensor:
    """h [n, 2H] = [gate | up] -> silu(gate) * up [n, H]."""
    half = h.shape[1] // 2
    return F.silu(h[:, :half]).mul_(h[:, half:])
