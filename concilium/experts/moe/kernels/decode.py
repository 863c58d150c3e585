"""Decode fast path for small T: visit only the experts some token picked, reading each active
expert's weights exactly once (a GEMV/skinny GEMM per expert), with no sort or gather of the batch.

At decode time the FFN is memory bound: its cost is the bytes of the active experts' weights, so
this path's job is to touch nothing else.
"""

from __future__ import annotations

import torch

from concilium.experts.moe.kernels.dispatch import expert_swiglu
from concilium.experts.moe.kernels.grouped import needs_grad
from concilium.experts.moe.kernels.onednn import PackedExperts
from concilium.experts.moe.reference import swiglu


def active_experts(idxs: torch.Tensor, num_experts: int) -> list[int]:
    """The distinct real experts in idxs [T, K], ascending (null slots dropped)."""
    return [e for e in torch.unique(idxs).tolist() if 0 <= e < num_experts]


def pairs_by_expert(
    weights: torch.Tensor, idxs: torch.Tensor, num_experts: int
) -> dict[int, tuple[list[int], list[float]]]:
    """{expert: (tokens, weights)} of idxs/weights [T, K], experts ascending, null slots dropped:
    grouped on the host, since T is small here and each tensor op would cost more."""
    groups: dict[int, tuple[list[int], list[float]]] = {}
    for t, (row, ws) in enumerate(zip(idxs.tolist(), weights.tolist(), strict=True)):
        for e, w in zip(row, ws, strict=True):
            if 0 <= e < num_experts:
                tokens, gates = groups.setdefault(e, ([], []))
                tokens.append(t)
                gates.append(w)
    return dict(sorted(groups.items()))


def _inference(x, w13, w2, weights, idxs, packed: PackedExperts | None) -> torch.Tensor:
    """No autograd: per active expert, its tokens' SwiGLU (packed GEMMs), added in place; a
    one-token expert reads its row as a view and adds its answer to that row."""
    y = torch.zeros_like(x)
    for e, (tokens, gates) in pairs_by_expert(weights, idxs, w13.shape[0]).items():
        if len(tokens) == 1:
            t = tokens[0]
            y[t].add_(expert_swiglu(x[t : t + 1], e, w13, w2, packed)[0], alpha=gates[0])
            continue
        token = torch.tensor(tokens, device=x.device)  # [S_e]
        out = expert_swiglu(x.index_select(0, token), e, w13, w2, packed)  # [S_e, D]
        gate = torch.tensor(gates, dtype=x.dtype, device=x.device).unsqueeze(1)  # [S_e, 1]
        y.index_add_(0, token, out.mul_(gate))
    return y


def decode_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    idxs: torch.Tensor,
    packed: PackedExperts | None = None,
) -> torch.Tensor:
    """x [T, D], w13 [E, 2H, D], w2 [E, D, H], weights/idxs [T, K] -> y [T, D]."""
    if not needs_grad(x, w13, w2, weights):
        return _inference(x, w13, w2, weights, idxs, packed)
    y = torch.zeros_like(x)
    for e in active_experts(idxs, w13.shape[0]):
        token, slot = torch.nonzero(idxs == e, as_tuple=True)  # [S_e] each
        out = swiglu(x[token], w13[e], w2[e]) * weights[token, slot, None].to(x.dtype)
        y = y.index_add(0, token, out)
    return y
