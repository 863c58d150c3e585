"""Pilot token embeddings for the retriever's late interaction: stored at registration, computed
once for an expert registered before they were, and checked against the pilots."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from concilium.registry.registry import Registry, pilot_texts
from tests.conftest import HashEncoder, remote_spec


class TokenHashEncoder(HashEncoder):
    """HashEncoder plus one hashed vector per word as the text's token embeddings."""

    def encode_with_tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        words = [re.findall(r"[a-z0-9]+", t.lower()) or [t] for t in texts]
        return self.encode(texts), [self.encode(ws) for ws in words]


SPEC = remote_spec("rev", ["reverse the word", "write it backwards please"])


def test_registration_stores_each_pilots_tokens(tmp_path: Path) -> None:
    enc = TokenHashEncoder()
    reg = Registry(tmp_path, enc)
    rec = reg.register(SPEC)
    stored = reg.embeddings(rec)
    assert stored["pilot_tokens"].dtype == np.float16  # half the bytes; cast back on load
    tokens, offsets = reg.pilot_tokens(rec) or (None, None)
    assert tokens is not None and offsets is not None and tokens.dtype == np.float32
    texts = pilot_texts(reg.get("rev").spec)
    assert offsets.tolist() == [0, 3, 7] and len(texts) == 2  # 3 words, then 4
    _, want = enc.encode_with_tokens(texts)
    np.testing.assert_allclose(tokens, np.concatenate(want), atol=1e-3)


def test_an_expert_registered_without_tokens_gets_them_once(tmp_path: Path) -> None:
    rec = Registry(tmp_path, HashEncoder()).register(SPEC)  # an encoder with no token output
    assert "pilot_tokens" not in Registry(tmp_path, HashEncoder()).embeddings(rec)
    assert Registry(tmp_path, HashEncoder()).pilot_tokens(rec) is None

    calls: list[int] = []

    class Counting(TokenHashEncoder):
        def encode_with_tokens(self, texts):  # type: ignore[no-untyped-def]
            calls.append(len(texts))
            return super().encode_with_tokens(texts)

    reg = Registry(tmp_path, Counting())
    first = reg.pilot_tokens(rec)
    again = reg.pilot_tokens(rec)
    assert first is not None and again is first and calls == [3]  # description + 2 pilots
    assert first[1].tolist() == [0, 3, 7]


def test_tokens_that_do_not_match_the_pilots_are_not_used(tmp_path: Path) -> None:
    class Skewed(TokenHashEncoder):
        def encode_with_tokens(self, texts):  # type: ignore[no-untyped-def]
            vecs, toks = super().encode_with_tokens(texts)
            return vecs, [*toks[:-1], toks[-1][:0]]  # the last pilot has no tokens

    reg = Registry(tmp_path, Skewed())
    rec = reg.register(SPEC)
    assert reg.pilot_tokens(rec) is None  # logged; the retriever falls back to sentences


def test_tokens_of_experts_no_longer_registered_are_forgotten(tmp_path: Path) -> None:
    reg = Registry(tmp_path, TokenHashEncoder())
    a = reg.register(SPEC)
    b = reg.register(remote_spec("up", ["make it upper case"]))
    first = reg.pilot_tokens(a)
    assert reg.pilot_tokens(b) is not None and reg.pilot_tokens(a) is first  # kept
    reg.retain_tokens([b])  # `a` was deleted
    again = reg.pilot_tokens(a)
    assert again is not first and again is not None  # loaded afresh from its artifact
    np.testing.assert_array_equal(again[0], first[0])  # type: ignore[index]
