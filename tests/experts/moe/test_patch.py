"""`patch(model)` on real transformers MoE models: same logits, same greedy text, same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from concilium.errors import ConfigError
from concilium.experts.moe import patch
from concilium.experts.moe.patching import MoEExperts

ROOT = Path(__file__).resolve().parents[3]
DEMO_BASE = ROOT / "demo_pack" / "base"
ATOL = 2e-5


DEEPSEEK = dict(
    num_key_value_heads=4, n_routed_experts=8, n_group=1, topk_group=1, moe_intermediate_size=48,
    first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16,
)  # fmt: skip


def tiny(family: str) -> nn.Module:
    """A small random-weight causal LM of `family` (no hub needed), 2 layers, 8 experts top-2."""
    import transformers as tf

    common = dict(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=128,
    )  # fmt: skip
    configs = {
        "mixtral": lambda: tf.MixtralConfig(**common, intermediate_size=96, num_local_experts=8),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            **common, moe_intermediate_size=48, num_experts=8, head_dim=16
        ),
        "olmoe": lambda: tf.OlmoeConfig(**common, intermediate_size=48, num_experts=8),
        "deepseek_v3": lambda: tf.DeepseekV3Config(**{**common, **DEEPSEEK}),
    }
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(configs[family]())
    with torch.no_grad():  # wider weights than the init so routing and outputs are not trivial
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.2)
    return model.eval()


def demo_base() -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_BASE).eval()


MODELS = {
    "qwen2_moe(demo)": demo_base,
    **{f: (lambda f=f: tiny(f)) for f in ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3")},
}


def prompt(vocab: int, t: int = 12) -> torch.Tensor:
    return torch.randint(3, vocab, (2, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("backend", ["auto", "grouped", "decode"])
def test_logits_and_greedy_generation_match_stock(name: str, backend: str) -> None:
    model = MODELS[name]()
    ids = prompt(model.config.vocab_size)
    with torch.no_grad():
        want = model(ids).logits
        want_gen = model.generate(ids, max_new_tokens=16, do_sample=False)
        report = patch(model, backend=backend)
        got = model(ids).logits
        got_gen = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert len(report.names) == model.config.num_hidden_layers
    assert all(isinstance(model.get_submodule(n), MoEExperts) for n in report.names)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert torch.equal(got_gen, want_gen)


def test_weights_are_kept_not_copied_and_undo_restores() -> None:
    model = tiny("mixtral")
    keys = list(model.state_dict())
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    report = patch(model)
    assert report.family == "mixtral"
    assert list(model.state_dict()) == keys
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    report.undo()
    assert not any(isinstance(m, MoEExperts) for m in model.modules())
    report.redo()
    assert sum(isinstance(m, MoEExperts) for m in model.modules()) == 2


def test_training_through_the_patched_model_matches_stock_gradients() -> None:
    model = tiny("qwen3_moe").train()
    ids = prompt(model.config.vocab_size, t=6)
    name = "model.layers.0.mlp.experts.gate_up_proj"

    def grad() -> torch.Tensor:
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return model.get_parameter(name).grad.clone()

    want = grad()
    patch(model)
    torch.testing.assert_close(grad(), want, atol=1e-5, rtol=1e-4)


def test_a_model_without_moe_is_refused() -> None:
    with pytest.raises(ConfigError, match="MixtralExperts"):
        patch(nn.Sequential(nn.Linear(4, 4)))


def test_all_layers_of_a_patched_model_share_one_kernel_tuner() -> None:
    """Every layer has the same shape: one measurement of the packed forms serves them all."""
    report = patch(tiny("mixtral"))
    tuners = {id(ours.backend.packs.tuner) for *_, ours in report.swaps}
    assert len(report.swaps) == 2 and len(tuners) == 1
    assert report.swaps[0][3].backend.packs.tuner is not None


def test_a_patched_model_can_be_deep_copied_and_pickled() -> None:
    """The shared kernel tuner holds a lock: copies share the tuner, pickles get a new lock."""
    import copy
    import pickle

    model = tiny("mixtral")
    patch(model)
    ids = prompt(97)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, model(ids).logits)
    ours = [m for m in clone.modules() if isinstance(m, MoEExperts)]
    assert ours[0].backend.packs.tuner is ours[1].backend.packs.tuner
    tuner = pickle.loads(pickle.dumps(ours[0].backend.packs.tuner))
    assert tuner.rows == ours[0].backend.packs.tuner.rows and tuner._lock.acquire(blocking=False)
