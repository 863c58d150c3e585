"""Adapter validation: one plain example per bug the fuzzing found (each once crashed, hung,
allocated what a file only claimed, or let a harmful config through)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from concilium.errors import AdapterRejected
from concilium.registry.peft_config import parse_config
from concilium.registry.safetensors_check import TensorInfo
from concilium.registry.validate import (
    ModelInfo,
    validate_adapter_dir,
    validate_model_dir,
)
from tests.registry.conftest import TinyMoe
from tests.registry.fuzz.common import (
    CFG,
    PICKLE_BYTES,
    WEIGHTS,
    Raw,
    check_accepted_config,
    check_file,
    st_file,
    to_json,
)

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


Q1 = "base_model.model.model.layers.1.self_attn.q_proj"


def _rejected(fn: Callable[[], Any], expected: str) -> str:
    with pytest.raises(AdapterRejected) as exc:
        fn()
    message = str(exc.value)
    message.encode("utf-8")
    assert expected in message, message
    return message


def _entry(dtype: Any, shape: Any, begin: Any, end: Any) -> str:
    offsets = f"[{begin}, {end}]"
    return f'{{"dtype": {to_json(dtype)}, "shape": {to_json(shape)}, "data_offsets": {offsets}}}'


def _set_config(d: Path, **changes: Any) -> None:
    config = json.loads((d / CFG).read_text())
    config.update(changes)
    (d / CFG).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("header", "data", "expected"),
    [
        # a list or object as dtype: `in frozenset` raised TypeError (unhashable)
        (f'{{"a": {_entry(["F32"], [1], 0, 4)}}}', 4, "dtype ['F32'] not allowed"),
        (f'{{"a": {_entry({"F32": 1}, [1], 0, 4)}}}', 4, "dtype {'F32': 1} not allowed"),
        # lone surrogate escapes: Python decodes them, the safetensors library refuses them
        (f'{{"\\ud800": {_entry("F32", [1], 0, 4)}}}', 4, "has an unpaired UTF-16 surrogate"),
        ('{"__metadata__": {"k": "\\udfff"}}', 0, "'\\udfff' has an unpaired UTF-16 surrogate"),
        # -0 is an integer to Python, a float (so no size) to the safetensors library
        (f'{{"a": {_entry("BF16", [0], 0, "-0")}}}', 0, "-0 is a negative zero"),
        (f'{{"a": {_entry("F32", [Raw("-0")], 0, 0)}}}', 0, "-0 is a negative zero"),
        # dims that overflow int64 beside a zero: an empty tensor no loader can build
        (f'{{"a": {_entry("BF16", [0, 2**31, 2**31, 2**31], 0, 0)}}}', 0, "overflows 64-bit"),
        (f'{{"a": {_entry("F32", [2**32, 2**32, 0], 0, 0)}}}', 0, "overflows 64-bit sizes"),
        (f'{{"a": {_entry("F32", [0, 2**64], 0, 0)}}}', 0, "[0, 18446744073709551616] of F32"),
    ],
)
def test_header_regressions(scratch: Path, header: str, data: int, expected: str) -> None:
    got = check_file(scratch, st_file(header.encode(), bytes(data)))
    assert isinstance(got, AdapterRejected) and expected in str(got), got


def test_empty_tensor_with_modest_dims_is_still_accepted(scratch: Path) -> None:
    """The overflow check counts the non-zero dims: an ordinary empty tensor passes."""
    header = f'{{"a": {_entry("F32", [0, 4096], 0, 0)}, "b": {_entry("F16", [2], 0, 4)}}}'
    assert check_file(scratch, st_file(header.encode(), bytes(4))) == {
        "a": TensorInfo("a", "F32", (0, 4096)),
        "b": TensorInfo("b", "F16", (2,)),
    }


@pytest.mark.parametrize("loop", ["self", "pair"])
def test_symlink_loop_in_adapter_dir_is_rejected(base: ModelInfo, adapter: Path, loop: str) -> None:
    """Path.resolve raised RuntimeError('Symlink loop ...') on Python 3.11."""
    os.symlink(adapter / "notes.md", adapter / ("notes.md" if loop == "self" else "b"))
    if loop == "pair":
        os.symlink(adapter / "b", adapter / "notes.md")
    _rejected(lambda: validate_adapter_dir(adapter, base), "adapter directories may not contain")


def test_symlink_loop_in_model_dir_is_rejected(tiny_moe: TinyMoe, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_moe.base_dir, tmp_path / "model"))
    os.symlink(model / "loop.json", model / "loop.json")
    _rejected(lambda: validate_model_dir(model), "loop.json: a symlink loop symlink to")


def test_path_with_a_nul_byte_is_rejected(base: ModelInfo, tmp_path: Path) -> None:
    """os.lstat raised ValueError('embedded null byte')."""
    bad = Path(str(tmp_path) + "\x00x")
    _rejected(lambda: validate_adapter_dir(bad, base), "not a valid file system path")
    _rejected(lambda: validate_model_dir(bad), "not a valid file system path")


def test_non_utf8_file_name_is_rejected_with_a_printable_message(
    base: ModelInfo, adapter: Path
) -> None:
    """A pickle named b'\\xff.bin' was refused with a message holding a lone surrogate, which
    the HTTP layer's JSON response (UTF-8) cannot encode: a 500 instead of a 400."""
    (adapter / os.fsdecode(b"\xff.bin")).write_bytes(PICKLE_BYTES)
    (adapter / os.fsdecode(b"notes-\xfe.md")).write_text("hi")
    msg = _rejected(lambda: validate_adapter_dir(adapter, base), "file name is not valid UTF-8")
    assert "\\udc" in msg


def test_symlink_with_a_non_utf8_target_has_a_printable_message(
    base: ModelInfo, adapter: Path
) -> None:
    os.symlink(b"/tmp/\x80\xff", os.fsencode(adapter / "notes.md"))
    _rejected(lambda: validate_adapter_dir(adapter, base), "symlink to /tmp/\\udc80\\udcff")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # PEFT's LoraConfig raises on these at load time (ValueError)
        ({"layers_pattern": "layers"}, "layers_pattern='layers' needs layers_to_transform"),
        ({"target_modules": "q_proj", "layers_to_transform": 0}, "need target_modules to be"),
        # PEFT builds a regex from layers_pattern: re.error at load, or a ReDoS
        ({"layers_pattern": "(", "layers_to_transform": [0]}, "layers_pattern '(' is a regex"),
        ({"layers_pattern": ["(a+)+$"], "layers_to_transform": 0}, "'(a+)+$' is a regex"),
        # PEFT adapts layer 0 only and drops layer 1's tensors (unexpected keys)
        ({"layers_to_transform": [0]}, "is not selected by target_modules"),
        ({"layers_to_transform": 1, "layers_pattern": "layers"}, "layers_to_transform [1]"),
        # rank_pattern keys and a str exclude_modules are patterns to PEFT: '.' matches '_'
        ({"rank_pattern": {"q.proj": 2}}, "q_proj.lora_A.weight' has shape [4, 32], expected"),
        ({"exclude_modules": "model.layers.0.self_attn.q.proj"}, "q_proj' is not selected"),
        # a falsy value that is not PEFT's "off" value turns the feature on, or breaks loading
        ({"kasa_config": {}}, "kasa_config={} refused: KaSA is not supported (must be null)"),
        ({"arrow_config": {}}, "arrow_config={} refused"),
        ({"corda_config": False}, "corda_config=False refused"),
        ({"use_bdlora": False}, "use_bdlora=False refused"),
        ({"alora_invocation_tokens": []}, "alora_invocation_tokens=[] refused"),
        ({"modules_to_save": []}, "modules_to_save=[] refused"),
        ({"use_dora": 0}, "use_dora=0 refused: DoRA is not supported (must be null or false)"),
        ({"loftq_config": []}, "loftq_config=[] refused"),
        # inits PEFT runs again when it loads the adapter: PiSSA / OLoRA rewrite the base weights
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' refused"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora' refused"),
        ({"init_lora_weights": "mica"}, "init_lora_weights='mica' refused"),
        ({"init_lora_weights": "evil"}, "init_lora_weights='evil' refused"),
    ],
)
def test_config_regressions(
    base: ModelInfo, adapter: Path, changes: dict[str, Any], expected: str
) -> None:
    _set_config(adapter, **changes)
    msg = _rejected(lambda: validate_adapter_dir(adapter, base), expected)
    assert msg.startswith((f"{CFG}: ", f"{WEIGHTS}: ")), msg


@pytest.mark.parametrize(
    "changes",
    [
        {"use_dora": False, "lora_bias": False, "use_qalora": None, "loftq_config": {}},
        {"init_lora_weights": "gaussian"},
        {"layers_to_transform": [0, 1]},
        {"layers_to_transform": [0, 1], "layers_pattern": "layers"},
        {"layers_to_transform": []},
        {"rank_pattern": {"v_proj": 4}, "exclude_modules": ["k_proj"]},
    ],
)
def test_configs_peft_reads_as_plain_lora_still_pass(
    base: ModelInfo, adapter: Path, changes: dict[str, Any]
) -> None:
    _set_config(adapter, **changes)
    assert validate_adapter_dir(adapter, base).rank == 4
    raw = json.loads((adapter / CFG).read_text())
    check_accepted_config(raw, parse_config(raw, base, 64), base, 64)


def test_layers_to_transform_selects_what_peft_selects(base: ModelInfo, adapter: Path) -> None:
    """An adapter with tensors on layer 0 only, declared so, passes; the plan matches PEFT's."""
    from safetensors.torch import load, save_file

    tensors = {k: v for k, v in load((adapter / WEIGHTS).read_bytes()).items() if ".1." not in k}
    save_file(tensors, adapter / WEIGHTS)
    _set_config(adapter, layers_to_transform=0, layers_pattern=["layers"])
    info = validate_adapter_dir(adapter, base)
    assert all(m.startswith("model.layers.0.") for m in info.modules) and len(info.modules) == 3
    raw = json.loads((adapter / CFG).read_text())
    check_accepted_config(raw, parse_config(raw, base, 64), base, 64)
