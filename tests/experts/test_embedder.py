"""The sentence-transformer embedder: packaged MiniLM, and an embed expert with a LoRA adapter."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from concilium.experts.base import Target
from concilium.experts.embedder import SentenceEncoder, default_model_dir
from concilium.experts.pool import ExpertPool
from concilium.registry.registry import Registry


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


@pytest.fixture(scope="module")
def st_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(default_model_dir())
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("st_lora")
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def test_packaged_minilm_embeds_meaningfully(encoder: SentenceEncoder) -> None:
    v = encoder.encode(["reverse this word", "spell the word backwards", "add two numbers"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]
    assert encoder.encode([]).shape == (0, 384)


def test_embed_lora_expert_registers_and_changes_embeddings(
    encoder: SentenceEncoder, st_lora: Path, tmp_path: Path
) -> None:
    reg = Registry(tmp_path, encoder)
    reg.register(
        {"kind": "model", "name": "minilm", "task": "embed", "path": str(default_model_dir())}
    )
    rec = reg.register(
        {
            "kind": "lora",
            "name": "minilm-domain",
            "task": "embed",
            "base": "minilm",
            "path": str(st_lora),
        }
    )
    adapter = reg.runtime_path(rec)
    pool = ExpertPool()
    base_t = Target(
        expert="minilm", kind="model", model="minilm", model_path=str(default_model_dir())
    )
    lora_t = Target(
        expert="minilm-domain",
        kind="lora",
        model="minilm",
        model_path=str(default_model_dir()),
        adapter="minilm-domain",
        adapter_path=str(adapter),
    )

    async def both() -> tuple[list[list[float]], list[list[float]]]:
        try:
            return await pool.embed(base_t, ["hello"]), await pool.embed(lora_t, ["hello"])
        finally:
            await pool.aclose()

    base_v, lora_v = asyncio.run(both())
    assert np.allclose(base_v[0], encoder.encode(["hello"])[0], atol=1e-5)
    assert not np.allclose(base_v[0], lora_v[0], atol=1e-3)
    assert abs(np.linalg.norm(lora_v[0]) - 1) < 1e-5


def test_token_embeddings_come_from_the_same_forward(encoder: SentenceEncoder) -> None:
    texts = ["hi", "Reverse this word: planet", "a much longer sentence, to pad the others"]
    vecs, tokens = encoder.encode_with_tokens(texts)
    np.testing.assert_allclose(vecs, encoder.encode(texts), atol=1e-5)
    tok = encoder._model.tokenizer
    for t, m in zip(texts, tokens, strict=True):
        n = len(tok(t)["input_ids"]) - 2  # [CLS] and [SEP] dropped, padding too
        assert m.shape == (n, encoder.dim) and m.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
    # the same text alone or in a padded batch: the same tokens
    _, alone = encoder.encode_with_tokens(texts[1:2])
    np.testing.assert_allclose(alone[0], tokens[1], atol=1e-4)
    none, no_tokens = encoder.encode_with_tokens([])
    assert none.shape == (0, encoder.dim) and no_tokens == []
