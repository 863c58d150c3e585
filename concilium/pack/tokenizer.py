"""The demo pack's character-level tokenizer and prompt format.

One token per character: printable ASCII and ``\\n``, plus special tokens. A chat prompt is

    <s>{user message}<ans>

and the model answers ``{answer}</s>``. Task-control tokens ``<t0>``…``<t15>`` tag the base
model's pre-training examples (``<s><tK>: payload<ans>answer</s>``); natural-language queries never
contain them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, ANS = "<pad>", "<s>", "</s>", "<unk>", "<ans>"
N_CONTROL = 16
CONTROL_TOKENS = tuple(f"<t{i}>" for i in range(N_CONTROL))
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, ANS, *CONTROL_TOKENS)
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<ans>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<ans>{% endif %}"
)


@functools.cache
def vocab() -> dict[str, int]:
    """Token -> id: the special tokens first, then the characters (a shared dict: do not mutate)."""
    return {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARS))}


def format_prompt(query: str) -> str:
    """The exact prompt text the chat template yields for one user message."""
    return f"{BOS}{query}{ANS}"


def control_prompt(task_index: int, payload: str, filler: str = "") -> str:
    """A pre-training prompt tagged with the opaque control token of task `task_index`."""
    return f"{BOS}{CONTROL_TOKENS[task_index]}{filler}: {payload}{ANS}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh char-level `PreTrainedTokenizerFast` with the chat template set."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(vocab(), merges=[], unk_token=UNK))
    raw.add_special_tokens(list(SPECIAL_TOKENS))
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[ANS, *CONTROL_TOKENS],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=160,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Save the tokenizer into `out_dir`: tokenizer.json, tokenizer_config.json, chat template,
    and a special_tokens_map.json for readers that still look for one."""
    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    special_map = {**special, "additional_special_tokens": [ANS, *CONTROL_TOKENS]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return tok
