"""The char-level tokenizer: exact round trips, special tokens, chat template, offline reload."""

from __future__ import annotations

from pathlib import Path

import pytest

from concilium.pack.data import encode
from concilium.pack.tokenizer import (
    ANS,
    BOS,
    CHARS,
    CONTROL_TOKENS,
    EOS,
    build_tokenizer,
    control_prompt,
    format_prompt,
    save_tokenizer,
    vocab,
)

TEXTS = [
    "Reverse this word: hello",
    "  two  spaces, a\nnewline and ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./ ",
    "ALL CAPS 0123456789",
    "",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d)
    return d


def test_vocab_is_specials_then_one_token_per_char() -> None:
    v = vocab()
    assert len(set(v.values())) == len(v) == 5 + len(CONTROL_TOKENS) + len(CHARS)
    assert len(CHARS) == 96 and "\n" in CHARS and " " in CHARS


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact_and_one_token_per_char(text: str) -> None:
    tok = build_tokenizer()
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert ids == encode(text)


def test_special_tokens_are_single_ids_and_skippable() -> None:
    tok = build_tokenizer()
    text = control_prompt(3, "abc") + "cba" + EOS
    ids = tok(text)["input_ids"]
    assert ids == encode(text)
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<t3>")]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == ": abccba"


def test_unknown_chars_map_to_unk() -> None:
    tok = build_tokenizer()
    assert tok("é")["input_ids"] == [tok.unk_token_id] == encode("é")


def test_saved_tokenizer_reloads_offline_with_chat_template(saved: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(saved))
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (EOS, "<pad>", BOS)
    q = "Reverse this word: hello"
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "be nice"}, {"role": "user", "content": q}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == format_prompt(q) == f"{BOS}{q}{ANS}"
    assert tok.decode(tok(prompt)["input_ids"]) == prompt
    assert (saved / "tokenizer.json").is_file() and (saved / "special_tokens_map.json").is_file()
