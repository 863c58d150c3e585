"""Sparse mixture kernels for expert replicas: MoE FFN layers and MoE-LoRA adapter mixtures.

`patch(model)` swaps the experts of a transformers MoE model for our kernels (see `patching`);
`layer.SparseMoE` is the layer itself. torch is imported only when these are used, so importing
`concilium` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concilium.experts.moe.patching import PatchReport

__all__ = ["patch"]


def patch(model: Any, backend: str = "auto") -> PatchReport:
    """Run every supported MoE experts module of `model` on our kernels, keeping its weights.

    Returns a `PatchReport` (names swapped, `undo()`); see `concilium.experts.moe.patching`.
    """
    from concilium.experts.moe.patching import patch as _patch

    return _patch(model, backend)
