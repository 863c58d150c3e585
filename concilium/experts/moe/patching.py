"""Swap the experts of transformers MoE models for ours, keeping the weights.

    report = patch(model)          # every supported `*Experts` module now runs on SparseMoE kernels
    report.undo()                  # back to the stock modules

Only the experts module of each MoE block is replaced: the router, the shared expert and the
block's own code stay stock, so routing is bit-for-bit the model's own. The replacement registers
the *same* `nn.Parameter` objects under the same names (`gate_up_proj [E, 2H, D]`,
`down_proj [E, D, H]`), so nothing is copied, `state_dict()` keys are unchanged, and adapters or
optimizers holding the parameters keep working.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from concilium.errors import ConfigError
from concilium.experts.moe.kernels.onednn import FormTuner
from concilium.experts.moe.kernels.tuning import Tuner
from concilium.experts.moe.layer import get_backend

# transformers experts classes with the fused SwiGLU layout this module supports -> family
SUPPORTED_EXPERTS: dict[str, str] = {
    "Qwen2MoeExperts": "qwen2_moe",
    "Qwen3MoeExperts": "qwen3_moe",
    "MixtralExperts": "mixtral",
    "OlmoeExperts": "olmoe",
    "DeepseekV3Experts": "deepseek_v3",
}
_SILU = {"SiLU", "SiLUActivation"}


class MoEExperts(nn.Module):
    """Drop-in for a transformers `*Experts` module, running on a `MOE_BACKEND_CLS` backend.

    forward(hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D]
    """

    def __init__(
        self,
        gate_up_proj: nn.Parameter,
        down_proj: nn.Parameter,
        backend: str,
        tuner: FormTuner | None = None,
    ) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_proj  # [E, 2H, D], the stock parameter itself
        self.down_proj = down_proj  # [E, D, H]
        self.num_experts = gate_up_proj.shape[0]
        self.backend = get_backend(backend, tuner)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        w13, w2 = self.gate_up_proj, self.down_proj
        return self.backend(hidden_states, w13, w2, top_k_weights, top_k_index)

    def extra_repr(self) -> str:
        e, h2, d = self.gate_up_proj.shape
        return f"E={e}, D={d}, H={h2 // 2}, backend={self.backend.name}"


@dataclass(frozen=True, slots=True)
class PatchReport:
    """What `patch` swapped: (parent module, attribute, stock module, ours) per experts module."""

    names: tuple[str, ...]
    family: str
    swaps: tuple[tuple[nn.Module, str, nn.Module, MoEExperts], ...]

    def undo(self) -> None:
        """Put the stock modules back (they share the parameters, so nothing is copied)."""
        for parent, attr, stock, _ in self.swaps:
            setattr(parent, attr, stock)

    def redo(self) -> None:
        """Swap ours in again (keeping their per-layer state, e.g. packed weights)."""
        for parent, attr, _, ours in self.swaps:
            setattr(parent, attr, ours)


def supported(module: nn.Module) -> bool:
    """A stock experts module with gate_up_proj [E, 2H, D], down_proj [E, D, H], SiLU, no bias."""
    if type(module).__name__ not in SUPPORTED_EXPERTS:
        return False
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    act = type(getattr(module, "act_fn", None)).__name__
    layout_ok = getattr(module, "is_concatenated", True) and not getattr(module, "is_transposed", 0)
    return (
        isinstance(gu, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gu.dim() == down.dim() == 3
        and gu.shape[1] == 2 * down.shape[2]
        and act in _SILU
        and layout_ok
        and not getattr(module, "has_bias", False)
    )


def experts_sites(
    model: nn.Module, include_ours: bool = False
) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(qualified name, parent, attribute, module) of every supported stock experts module, and
    of every `MoEExperts` too when `include_ours`."""
    sites = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if supported(child) or (include_ours and isinstance(child, MoEExperts)):
                name = f"{parent_name}.{attr}" if parent_name else attr
                sites.append((name, parent, attr, child))
    return sites


def patch(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Replace every supported experts module of `model` by `MoEExperts` on `backend`.

    Raises ConfigError when the model has no supported MoE experts (naming the families).
    """
    sites = experts_sites(model)
    if not sites:
        raise ConfigError(
            f"{type(model).__name__} has no supported MoE experts module; supported: "
            f"{sorted(SUPPORTED_EXPERTS)}"
        )
    swaps, tuner = [], Tuner()  # one kernel measurement per layer shape, not per layer
    for _, parent, attr, stock in sites:
        w13, w2 = stock.get_parameter("gate_up_proj"), stock.get_parameter("down_proj")
        ours = MoEExperts(w13, w2, backend, tuner)
        setattr(parent, attr, ours)
        swaps.append((parent, attr, stock, ours))
    family = SUPPORTED_EXPERTS[type(sites[0][3]).__name__]
    return PatchReport(tuple(s[0] for s in sites), family, tuple(swaps))
