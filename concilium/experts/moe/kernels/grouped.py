"""Grouped MoE kernel: sort the (token, slot) pairs by expert once, run each expert's SwiGLU as a
GEMM over its contiguous segment, then one weighted scatter back.

Two GEMM strategies over the same segments:
  - "loop": one GEMM pair per non-empty segment, into a preallocated [S, D] buffer; on CPU
    inference it runs on oneDNN-packed weights (see `onednn.py`), the fastest form measured here.
  - "grouped_mm": `torch._grouped_mm` over all segments in one call (the GPU-friendly form);
    it needs 16-byte aligned D and H, and falls back to "loop" otherwise.
With autograd on, both run the segment loop out of place so gradients flow to x, w13, w2, weights.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from concilium.experts.moe.kernels.dispatch import (
    Dispatch,
    combine,
    combine_,
    expert_swiglu,
    plan,
)
from concilium.experts.moe.kernels.onednn import PackedExperts
from concilium.experts.moe.reference import swiglu

Gemm = Literal["loop", "grouped_mm"]


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd must see this call (grad mode on and any input requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _segments_autograd(xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, d: Dispatch):
    """xs [S, D] -> [S, D], differentiable: one SwiGLU per segment, concatenated."""
    outs = [swiglu(xs[a:b], w13[e], w2[e]) for e, a, b in d.segments()]
    return torch.cat(outs) if outs else xs.new_zeros(0, w2.shape[1])


def _segments_into(xs, w13, w2, d: Dispatch, packed: PackedExperts | None) -> torch.Tensor:
    """xs [S, D] -> out [S, D] with no autograd: each segment's result lands in its rows."""
    out = xs.new_empty(xs.shape[0], w2.shape[1])  # [S, D]
    for e, a, b in d.segments():
        out[a:b] = expert_swiglu(xs[a:b], e, w13, w2, packed)
    return out


def grouped_mm_fits(w2: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned row strides: D and H (w2 [E, D, H])."""
    per_16 = 16 // w2.element_size()
    return w2.shape[1] % per_16 == 0 and w2.shape[2] % per_16 == 0


def _grouped_mm(xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, d: Dispatch):
    """xs [S, D] -> [S, D] with two torch._grouped_mm calls over all segments."""
    offs = d.offsets  # [E] int32
    h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)  # [S, 2H]
    half = w13.shape[1] // 2
    act = F.silu(h[:, :half]) * h[:, half:]  # [S, H]
    return torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs)


def grouped_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    idxs: torch.Tensor,
    *,
    gemm: Gemm = "loop",
    packed: PackedExperts | None = None,
) -> torch.Tensor:
    """x [T, D], w13 [E, 2H, D], w2 [E, D, H], weights/idxs [T, K] -> y [T, D].

    `packed` (oneDNN packs of w13/w2) speeds up the "loop" GEMMs when autograd is off."""
    d = plan(weights, idxs, w13.shape[0])
    xs = x.index_select(0, d.token)  # [S, D]
    if needs_grad(x, w13, w2, weights):
        return combine(_segments_autograd(xs, w13, w2, d), d, x.shape[0])
    if gemm == "grouped_mm" and xs.shape[0] > 0 and grouped_mm_fits(w2):
        out = _grouped_mm(xs, w13, w2, d)
    else:
        out = _segments_into(xs, w13, w2, d, packed)
    return combine_(out, d, x.shape[0])
