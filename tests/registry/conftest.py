"""Shared registry fixtures: a tiny random Qwen2-MoE base and a real PEFT LoRA adapter on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from concilium.registry.registry import Registry


@dataclass(frozen=True)
class TinyMoe:
    """Directories written by transformers / PEFT save_pretrained, plus facts to check them by."""

    base_dir: Path
    lora_dir: Path
    num_params: int  # base parameters, counted on the in-memory model
    lora_params: int  # trainable LoRA parameters, counted on the PEFT model


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> TinyMoe:
    """hidden 32, 2 layers, 4 experts top-2, vocab 64; LoRA r=4 on q_proj, v_proj, up_proj."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(config)
    base_dir = tmp_path_factory.mktemp("tiny_moe")
    model.save_pretrained(base_dir, safe_serialization=True)
    num_params = sum(p.numel() for p in model.parameters())

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # random A and B, so the saved weights are not all zero
    )
    peft_model = get_peft_model(model, lora)
    lora_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lora_dir = tmp_path_factory.mktemp("tiny_lora")
    peft_model.save_pretrained(lora_dir)
    return TinyMoe(base_dir, lora_dir, num_params, lora_params)


def refuse_unpickling(mp: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Replace every way to unpickle (pickle.load/loads/Unpickler, torch.load) by a recorder
    that also refuses."""
    import pickle

    import torch

    def spy(name: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called during validation")

        return refuse

    mp.setattr(pickle, "loads", spy("pickle.loads"))
    mp.setattr(pickle, "load", spy("pickle.load"))
    mp.setattr(pickle, "Unpickler", spy("pickle.Unpickler"))
    mp.setattr(torch, "load", spy("torch.load"))


def tiny_registry(home: Path, tiny_moe: TinyMoe) -> Registry:
    """A registry in `home` with the tiny base registered as model expert 'tiny'."""
    from concilium.orchestrator.service import arrow_artifacts
    from concilium.registry.registry import Registry
    from tests.conftest import HashEncoder

    reg = Registry(
        home,
        HashEncoder(),
        profiler=lambda spec, d: {"latency_ms_per_token": 2.0, "latency_ms_overhead": 5.0},
        adapter_routing=arrow_artifacts,
    )
    reg.register(
        {
            "kind": "model",
            "name": "tiny",
            "path": str(tiny_moe.base_dir),
            "description": "tiny base",
            "params_total": tiny_moe.num_params,
        }
    )
    return reg
