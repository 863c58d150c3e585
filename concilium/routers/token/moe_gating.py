"""MoE gating: a sparse MoE layer's router, from logits to ``(weights [T, K], idxs [T, K])``.

These decide only; `concilium.experts.moe.SparseMoE` executes. A slot whose index is -1 is empty
(a null expert, or a top-p slot not needed): it costs nothing and adds nothing.

    topk_softmax  softmax over E, the top K; optionally renormalised to sum to 1 (Mixtral, Qwen)
    top_p         dynamic: experts added in probability order until their sum reaches p
                  (Huang et al. 2024, "Harder tasks need more experts"); K = max_k slots
    null_experts  AdaMoE: logits [T, E + N] with N null experts; top K over all E + N; null picks
                  are empty slots, so easy tokens use fewer real experts; real weights renormalised

`active_experts_per_token` reports the average number of real experts a token used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from concilium.errors import InvalidInput
from concilium.explain import config_error

if TYPE_CHECKING:
    from torch import Tensor


class _GatingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopKSoftmaxConfig(_GatingConfig):
    """Configuration of `topk_softmax` gating."""

    kind: Literal["topk_softmax"] = "topk_softmax"
    top_k: int = Field(default=2, ge=1, description="Experts per token (K).")
    renormalize: bool = Field(
        default=True, description="Rescale the K chosen probabilities to sum to 1."
    )


class TopPConfig(_GatingConfig):
    """Configuration of dynamic `top_p` gating."""

    kind: Literal["top_p"] = "top_p"
    p: float = Field(default=0.4, gt=0, le=1, description="Cumulative probability to reach.")
    max_k: int = Field(default=4, ge=1, description="Most experts per token (the K slots).")
    renormalize: bool = Field(
        default=False, description="Rescale the chosen probabilities to sum to 1."
    )


class NullExpertConfig(_GatingConfig):
    """Configuration of AdaMoE `null_experts` gating."""

    kind: Literal["null_experts"] = "null_experts"
    num_null: int = Field(default=4, ge=1, description="Null experts (last N logit columns).")
    top_k: int = Field(default=4, ge=1, description="Slots per token over real + null (K).")
    renormalize: bool = Field(
        default=True, description="Rescale the chosen real experts' probabilities to sum to 1."
    )


MoEGatingConfig = Annotated[
    TopKSoftmaxConfig | TopPConfig | NullExpertConfig, Field(discriminator="kind")
]


def _renormalize(weights: Tensor) -> Tensor:
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)


class MoEGating(ABC):
    """Router logits [T, E] (or [T, E + N]) -> (weights [T, K], idxs [T, K]), -1 = empty slot."""

    kind: ClassVar[str]

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]: ...

    def num_experts(self, logits: Tensor) -> int:
        """Real experts E among the logit columns."""
        return int(logits.shape[-1])


class TopKSoftmaxGating(MoEGating):
    kind = "topk_softmax"
    config: TopKSoftmaxConfig

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        import torch

        k = _check_k(self.config.top_k, logits.shape[-1])
        weights, idxs = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)  # [T, K]
        return (_renormalize(weights) if self.config.renormalize else weights), idxs


class TopPGating(MoEGating):
    kind = "top_p"
    config: TopPConfig

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        import torch

        k = min(self.config.max_k, logits.shape[-1])
        probs, idxs = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)  # [T, K] descending
        before = probs.cumsum(-1) - probs  # mass of the better experts
        keep = before < self.config.p  # the first always kept
        weights = probs * keep
        weights = _renormalize(weights) if self.config.renormalize else weights
        return weights, idxs.masked_fill(~keep, -1)


class NullExpertGating(MoEGating):
    kind = "null_experts"
    config: NullExpertConfig

    def num_experts(self, logits: Tensor) -> int:
        return int(logits.shape[-1]) - self.config.num_null

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        import torch

        e = self.num_experts(logits)
        if e < 1:
            raise InvalidInput(
                f"logits have {logits.shape[-1]} columns; need more than num_null="
                f"{self.config.num_null}"
            )
        k = _check_k(self.config.top_k, logits.shape[-1])
        probs, idxs = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)  # [T, K]
        real = idxs < e
        weights = probs * real
        weights = _renormalize(weights) if self.config.renormalize else weights
        return weights, idxs.masked_fill(~real, -1)


MOE_GATING_CLS: dict[str, type[MoEGating]] = {
    cls.kind: cls for cls in (TopKSoftmaxGating, TopPGating, NullExpertGating)
}


def _check_k(k: int, columns: int) -> int:
    if k > columns:
        raise InvalidInput(f"top_k={k} exceeds the {columns} experts of the router logits")
    return k


def build_gating(config: MoEGatingConfig | dict[str, Any]) -> MoEGating:
    """The gating for a config (or a dict with a `kind` among MOE_GATING_CLS); a config that
    does not validate is a ConfigError naming the field."""
    try:
        cfg = TypeAdapter(MoEGatingConfig).validate_python(config)
    except ValidationError as e:
        raise config_error(e, MoEGatingConfig, "MoE gating config") from None
    return MOE_GATING_CLS[cfg.kind](cfg)


def active_experts_per_token(idxs: Tensor, num_experts: int) -> float:
    """Average number of real experts (index in [0, E)) per token of idxs [T, K]."""
    if idxs.shape[0] == 0:
        return 0.0
    real = (idxs >= 0) & (idxs < num_experts)
    return float(real.sum()) / idxs.shape[0]
