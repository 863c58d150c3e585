"""Pure-torch reference for a sparse SwiGLU MoE FFN: the ground truth every backend is tested on.

Shapes (one letter set): T tokens, D hidden, H expert FFN hidden, E experts, K slots per token.

    x        [T, D]      token activations
    w13      [E, 2H, D]  gate (w1, rows :H) and up (w3, rows H:) projections, fused
    w2       [E, D, H]   down projection
    weights  [T, K]      routing weight of each slot
    idxs     [T, K]      expert of each slot; an index outside [0, E) is a null slot (adds nothing)

    y[t] = sum_k weights[t, k] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])),  e = idxs[t, k]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: x [T, D], w13 [2H, D], w2 [D, H] -> [T, D]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)  # [T, H] each
    return F.linear(F.silu(gate) * up, w2)


def reference_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    idxs: torch.Tensor,
) -> torch.Tensor:
    """Loop over experts: each one's (token, slot) pairs, its SwiGLU, a weighted add -> [T, D]."""
    y = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        token, slot = torch.nonzero(idxs == e, as_tuple=True)  # [S_e] each
        if token.numel() == 0:
            continue
        out = swiglu(x[token], w13[e], w2[e]) * weights[token, slot, None].to(x.dtype)
        y = y.index_add(0, token, out)
    return y


def shared_swiglu(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    gate: torch.Tensor | None,
) -> torch.Tensor:
    """A shared expert every token uses (Qwen/DeepSeek): x [T, D] -> [T, D], optionally scaled by
    sigmoid(x @ gate.T) with gate [1, D] (Qwen2-MoE's shared_expert_gate)."""
    out = swiglu(x, w13, w2)
    if gate is not None:
        out = torch.sigmoid(F.linear(x, gate)) * out
    return out


def split_w13(w13: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View w13 [E, 2H, D] as (w1 [E, H, D], w3 [E, H, D])."""
    w1, w3 = w13.chunk(2, dim=-2)
    return w1, w3


def fuse_w13(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Stack w1 [E, H, D] and w3 [E, H, D] into w13 [E, 2H, D] (one GEMM computes both)."""
    if w1.shape != w3.shape:
        raise ValueError(f"w1 {tuple(w1.shape)} and w3 {tuple(w3.shape)} must have the same shape")
    return torch.cat([w1, w3], dim=-2).contiguous()
