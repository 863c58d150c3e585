"""The demo base model: a tiny `Qwen2MoeForCausalLM` (8 experts, top-2, plus a shared expert)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from concilium.pack.tokenizer import BOS, EOS, PAD, vocab

if TYPE_CHECKING:
    from torch import nn
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

# Attention only. Qwen2MoeSparseMoeBlock flattens (B, T, D) to (B*T, D) before its shared expert,
# so a LoRA on shared_expert.{gate,up,down}_proj breaks PEFT's mixed-adapter batches
# (`adapter_names`, one adapter per row). The routed experts are fused 3D parameters that
# `target_modules` cannot name.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True, slots=True)
class ModelSize:
    """Architecture knobs of the base model."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    expert_hidden: int = 128
    shared_hidden: int = 128
    max_positions: int = 160


QUICK_SIZE = ModelSize(hidden=32, layers=2, heads=2, experts=4, expert_hidden=32, shared_hidden=32)


def base_config(size: ModelSize) -> Qwen2MoeConfig:
    """The `Qwen2MoeConfig` of the base, with the char tokenizer's special ids."""
    from transformers import Qwen2MoeConfig

    v = vocab()
    return Qwen2MoeConfig(
        vocab_size=len(v),
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        num_experts=size.experts,
        num_experts_per_tok=size.top_k,
        moe_intermediate_size=size.expert_hidden,
        shared_expert_intermediate_size=size.shared_hidden,
        intermediate_size=size.shared_hidden,
        max_position_embeddings=size.max_positions,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=True,
        bos_token_id=v[BOS],
        eos_token_id=v[EOS],
        pad_token_id=v[PAD],
    )


def new_base(size: ModelSize) -> Qwen2MoeForCausalLM:
    """A freshly initialised base model (seed torch first for determinism)."""
    from transformers import GenerationConfig, Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM(base_config(size))
    cfg = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


def count_params(model: nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def active_params(model: Any) -> int:
    """Parameters used per token: all but the routed experts a token does not pick."""
    cfg = model.config
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size  # gate, up, down of one expert
    idle = cfg.num_experts - cfg.num_experts_per_tok
    return count_params(model) - cfg.num_hidden_layers * idle * expert
