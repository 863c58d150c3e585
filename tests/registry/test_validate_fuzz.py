"""Property-based fuzz of adapter validation: whatever bytes, config or directory an uploader
hands over, validation accepts a well-formed adapter or raises ``AdapterRejected`` naming the
problem; never another exception, a hang, an allocation of a size the file only claims, an
unpickling call, or a registry changed by a refused registration.

Four targets: the safetensors header parser (``safetensors_check``) on arbitrary and mutated files,
checked against the safetensors library whenever it accepts; the strict ``adapter_config.json``
model (``peft_config``), checked against PEFT's own reading of an accepted config; whole adapter
directories (``validate_adapter_dir``) with an oracle that knows which mutations are harmless;
and full registrations (``Registry.register``). Every example is small; each test has a bounded
``max_examples`` and the file runs in well under a minute.

Below the fuzz tests, one plain example per bug the fuzzing found.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pickle
import shutil
import stat
import struct
import tempfile
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from math import prod
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from peft import LoraConfig

from concilium.errors import AdapterRejected
from concilium.registry.fs_checks import CODE_SUFFIXES, PICKLE_SUFFIXES
from concilium.registry.peft_config import LoraAdapterConfig, parse_config
from concilium.registry.registry import Registry
from concilium.registry.safetensors_check import (
    ADAPTER_DTYPES,
    DTYPE_SIZES,
    MODEL_DTYPES,
    TensorInfo,
    loads_strict,
    parse_safetensors_bytes,
)
from concilium.registry.validate import (
    AdapterInfo,
    ModelInfo,
    read_safetensors_header,
    validate_adapter_dir,
    validate_model_dir,
)
from tests.conftest import no_hang as shared_no_hang

from .conftest import TinyMoe, refuse_unpickling, tiny_registry

CFG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
HANG_S = 10.0  # one validation running longer than this is a hang
MEM_SLACK = 4 * 1024**2  # bytes a parse may allocate beyond a small multiple of the file's size
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MANY = settings(FUZZ, max_examples=300)  # the cheap, pure-parsing properties
FEW = settings(FUZZ, max_examples=100)  # each example copies and validates a directory
PICKLE_BYTES = pickle.dumps({"lora_A": [[0.0] * 4] * 4}, protocol=4)
TORCH_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


# ----------------------------------------------------------------------------- fixtures, guards


@pytest.fixture(scope="module")
def base(tiny_moe: TinyMoe) -> ModelInfo:
    return validate_model_dir(tiny_moe.base_dir)


@pytest.fixture(scope="module")
def good_config(tiny_moe: TinyMoe) -> dict[str, Any]:
    return dict(json.loads((tiny_moe.lora_dir / CFG).read_text()))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def unpickling(base: ModelInfo) -> Iterator[list[str]]:
    """Every way to unpickle, replaced for this whole module by a recorder that also refuses.

    Module-scoped so it holds across hypothesis examples; `base` first, so the session's tiny
    model is built before the patch."""
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        refuse_unpickling(mp, calls)
        yield calls


@pytest.fixture(autouse=True)
def never_unpickled(unpickling: list[str]) -> Iterator[None]:
    yield
    assert unpickling == []


def no_hang(seconds: float = HANG_S) -> AbstractContextManager[None]:
    """Fail (instead of blocking the run) when one validation takes longer than `seconds`."""
    return shared_no_hang(seconds, "one validation")


@contextmanager
def traced_peak() -> Iterator[Callable[[], int]]:
    """Yields a function returning the peak bytes Python allocated inside the block."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base_now = tracemalloc.get_traced_memory()[0]
    peak = [0]
    try:
        yield lambda: peak[0]
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1] - base_now
        if started:
            tracemalloc.stop()


def note(what: str) -> None:
    """hypothesis.event, also usable from the plain example tests."""
    if currently_in_test_context():
        event(what)


def outcome(fn: Callable[[], Any]) -> Any:
    """fn()'s result, or the AdapterRejected it raised; any other exception fails the test."""
    with no_hang():
        try:
            return fn()
        except AdapterRejected as e:
            assert str(e), "a rejection must say why"
            str(e).encode("utf-8")  # the HTTP layer and the CLI print it as UTF-8
            return e


# ----------------------------------------------------------------------------- JSON building


class Raw(str):
    """JSON text inserted as it is (a number spelled -0, a deep nest, a bare NaN...)."""


@dataclasses.dataclass(frozen=True)
class Pairs:
    """A JSON object written pair by pair, so a key can repeat."""

    items: tuple[tuple[str, Any], ...]


def to_json(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Pairs | dict):
        items = v.items if isinstance(v, Pairs) else tuple(v.items())
        return "{" + ", ".join(f"{json.dumps(k)}: {to_json(x)}" for k, x in items) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(to_json(x) for x in v) + "]"
    return json.dumps(v)  # floats nan / inf come out as NaN / Infinity, which JSON lacks


# lone UTF-16 halves, which json.dumps writes as \udXXX escapes (st.text never draws them)
SURROGATE = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
TEXT = st.text(max_size=8) | st.lists(st.characters() | SURROGATE, max_size=6).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3),
    max_leaves=8,
)
ODD_NUMBERS = st.sampled_from(["-0", "-0.0", "1e2", "4.0", "NaN", "Infinity", "1" + "0" * 5000])


def nest(depth: int, open_: str = "[", close: str = "]") -> Raw:
    return Raw(open_ * depth + close * depth)


DEEP = st.builds(nest, st.integers(1, 3000)) | st.builds(
    lambda d: Raw('{"a": ' * d + "1" + "}" * d), st.integers(1, 3000)
)


# ----------------------------------------------------------------------------- safetensors files


def check_file(scratch: Path, data: bytes, allowed: frozenset[str] = ADAPTER_DTYPES) -> Any:
    """Parse `data` in memory and as a file: the two agree, memory stays near the file's size,
    and whatever is accepted the safetensors library reads the same way."""
    path = scratch / "x.safetensors"
    path.write_bytes(data)
    with traced_peak() as peak:
        in_memory = outcome(lambda: parse_safetensors_bytes("x.safetensors", data, allowed))
        from_file = outcome(
            lambda: read_safetensors_header(path, max_bytes=1 << 20, allowed_dtypes=allowed)
        )
    assert peak() < MEM_SLACK + 16 * len(data), f"parsing a {len(data)}-byte file took {peak()}"
    assert type(in_memory) is type(from_file)
    if isinstance(in_memory, AdapterRejected):
        # json gives up on nesting at a depth that depends on the caller's stack, so near that
        # depth one call may fail there and the other on the (equally rejected) value
        if "recursion" not in str(in_memory) + str(from_file):
            assert str(in_memory) == str(from_file)
        assert str(in_memory).startswith("x.safetensors: ")
        note("rejected")
        return in_memory
    assert in_memory == from_file
    assert in_memory == library_view(data), (
        "accepted a file the safetensors library reads otherwise"
    )
    assert all(t.dtype in allowed for t in in_memory.values())
    note("accepted")
    return in_memory


def library_view(data: bytes) -> dict[str, TensorInfo]:
    """The table the safetensors library itself reads from `data`."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:
        raise AssertionError(f"our parser accepted it, the library refuses it: {e}") from None
    return {k: TensorInfo(k, TORCH_DTYPES[t.dtype], tuple(t.shape)) for k, t in tensors.items()}


def st_file(header: Any, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else to_json(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


LORA_NAMES = st.sampled_from(
    [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "__metadata__",
        "",
        "a\x00b",
        "../../etc/passwd",
    ]
)
TENSOR_NAMES = TEXT | LORA_NAMES


@st.composite
def valid_tables(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A header that tiles its data section exactly, and that section's length."""
    names = draw(st.lists(TENSOR_NAMES.filter(lambda n: n != "__metadata__"), max_size=4))
    header: dict[str, Any] = {}
    pos = 0
    for name in dict.fromkeys(names):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(TEXT, TEXT, max_size=2))
    keys = draw(st.permutations(list(header)))
    return {k: header[k] for k in keys}, pos


BIG = st.sampled_from([2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70])
DIMS = st.integers(-2, 5) | BIG | st.sampled_from([True, 1.0, "1", None]) | ODD_NUMBERS.map(Raw)
FIELD_VALUES = {
    "dtype": st.sampled_from(["F64", "f32", "", "F8_E4M3", "I64", "BOOL", None, 1])
    | st.lists(st.sampled_from(["F32"]), max_size=2)
    | st.dictionaries(st.sampled_from(["F32"]), st.integers(), max_size=1)
    | JSON_VALUES,
    "shape": st.lists(DIMS, max_size=10)
    | st.sampled_from([[2**32, 2**32, 0], [0, 2**64], [0, 2**63, 2**63], [2**62, 0], [0, 2**70]])
    | JSON_VALUES,
    "data_offsets": st.lists(st.integers(-3, 40) | BIG | ODD_NUMBERS.map(Raw), max_size=3)
    | JSON_VALUES,
}


def _mutate_entry(draw: st.DrawFn, entry: dict[str, Any]) -> Any:
    """One tensor entry with one field set, shifted, dropped or added, or replaced whole."""
    kind = draw(st.sampled_from(["field", "field", "shift", "drop", "extra", "entry"]))
    offsets = entry.get("data_offsets")
    if kind == "field":
        field = draw(st.sampled_from(sorted(FIELD_VALUES)))
        return {**entry, field: draw(FIELD_VALUES[field] | DEEP)}
    if kind == "shift" and isinstance(offsets, list) and all(type(x) is int for x in offsets):
        d = draw(st.integers(-8, 8))
        return {**entry, "data_offsets": [x + d for x in offsets]}
    if kind == "drop" and entry:
        gone = draw(st.sampled_from(sorted(entry)))
        return {k: v for k, v in entry.items() if k != gone}
    if kind == "extra":
        return {**entry, draw(TEXT): draw(JSON_VALUES)}
    return draw(JSON_VALUES | DEEP)


def _encode(draw: st.DrawFn, obj: Any) -> bytes:
    """The header's bytes: plain, with raw (invalid UTF-8) surrogates, stray bytes, padding or
    a byte-order mark."""
    raw = to_json(obj).encode("utf-8", "surrogatepass")
    encoding = draw(st.sampled_from(["plain", "raw-utf8", "bytes", "pad", "bom"]))
    if encoding == "raw-utf8" and isinstance(obj, dict):
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if encoding == "bytes":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    if encoding == "pad":
        return b" " * draw(st.integers(0, 3)) + raw + b" " * draw(st.integers(0, 9))
    if encoding == "bom":
        return b"\xef\xbb\xbf" + raw
    return raw


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A valid table, then up to three mutations of entries, lengths, metadata and encoding."""
    header, data_len = draw(valid_tables())
    tensors = [k for k in header if k != "__metadata__"]
    obj: Any = dict(header)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["entry", "entry", "entry", "len", "meta", "whole", "dup"]))
        if not isinstance(obj, dict):
            break
        if kind == "entry" and tensors:
            name = draw(st.sampled_from(tensors))
            if isinstance(entry := obj.get(name), dict):
                obj[name] = _mutate_entry(draw, entry)
        elif kind == "len":
            data_len = max(0, data_len + draw(st.integers(-8, 8)))
        elif kind == "meta":
            obj["__metadata__"] = draw(JSON_VALUES | st.dictionaries(TEXT, JSON_VALUES) | DEEP)
        elif kind == "whole":
            obj = draw(JSON_VALUES | DEEP)
        elif kind == "dup" and obj:
            items = list(obj.items())
            obj = Pairs((*items, draw(st.sampled_from(items))))
    data = draw(st.binary(min_size=data_len, max_size=data_len))
    return st_file(_encode(draw, obj), data)


ZEROS = st.sampled_from([0, Raw("-0"), Raw("0.0"), Raw("-0.0"), Raw("0e0")])


@st.composite
def with_empty_tensor(draw: st.DrawFn) -> bytes:
    """A valid file plus one zero-size tensor at the end of the data: huge dims beside a zero
    (their product overflows, but times 0 it is 0), or a zero spelled -0, 0.0..."""
    header, data_len = draw(valid_tables())
    dims = draw(st.lists(BIG | st.integers(1, 4), max_size=3))
    shape = draw(st.permutations([draw(ZEROS), *dims]))
    at = [data_len, data_len] if data_len else draw(st.lists(ZEROS, min_size=2, max_size=2))
    dtype = draw(st.sampled_from(sorted(ADAPTER_DTYPES)))
    header[draw(TENSOR_NAMES.filter(lambda n: n not in header))] = {
        "dtype": dtype,
        "shape": shape,
        "data_offsets": at,
    }
    return st_file(header, bytes(data_len))


LENGTHS = (
    st.integers(0, 2**64 - 1)
    | st.sampled_from([0, 1, 7, 8, 2**31, 2**32, 100_000_000, 100_000_001, 2**63, 2**64 - 1])
    | st.integers(-(2**63), -1).map(lambda n: n + 2**64)  # negative as a signed i64
)


@FUZZ
@given(data=st.binary(max_size=300))
def test_parser_on_arbitrary_bytes(scratch: Path, data: bytes) -> None:
    check_file(scratch, data)


@FUZZ
@given(length=LENGTHS, body=st.binary(max_size=64) | mutated_files(), delta=st.integers(-9, 9))
def test_parser_on_any_length_prefix(scratch: Path, length: int, body: bytes, delta: int) -> None:
    """Random, huge, negative-as-signed or nearly-right header lengths: never read past the file,
    never allocate what the prefix claims."""
    rest = body[8:] if len(body) > 8 else body
    exact = max(0, len(rest) + delta)
    for n in (length, exact):
        check_file(scratch, struct.pack("<Q", n) + rest)


@MANY
@given(data=mutated_files(), allowed=st.sampled_from([ADAPTER_DTYPES, MODEL_DTYPES]))
def test_parser_on_mutated_headers(scratch: Path, data: bytes, allowed: frozenset[str]) -> None:
    check_file(scratch, data, allowed)


@MANY
@given(data=with_empty_tensor())
def test_parser_on_empty_tensors_with_odd_shapes(scratch: Path, data: bytes) -> None:
    check_file(scratch, data, MODEL_DTYPES)


TORCH_SAMPLES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@FUZZ
@given(
    shapes=st.dictionaries(TEXT, st.lists(st.integers(0, 4), max_size=3), max_size=4),
    dtype=TORCH_SAMPLES,
    metadata=st.none() | st.dictionaries(TEXT, TEXT, max_size=2),
    cut=st.integers(0, 10_000),
    extra=st.binary(min_size=1, max_size=9),
)
def test_library_written_files_accepted_and_their_truncations_refused(
    scratch: Path,
    shapes: dict[str, list[int]],
    dtype: torch.dtype,
    metadata: dict[str, str] | None,
    cut: int,
    extra: bytes,
) -> None:
    from safetensors.torch import load, save

    tensors = {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}
    try:  # names it cannot encode; and safetensors 0.8 writes invalid JSON for ({}, metadata={})
        data = save(tensors, metadata=metadata)
        load(data)
    except Exception:
        event("not a file the library can read back")
        return
    table = check_file(scratch, data)
    assert table == {k: TensorInfo(k, TORCH_DTYPES[dtype], tuple(s)) for k, s in shapes.items()}
    assert isinstance(check_file(scratch, data[: cut % len(data)]), AdapterRejected)
    assert isinstance(check_file(scratch, data + extra), AdapterRejected)


@pytest.mark.parametrize("where", ["metadata", "dtype", "shape", "offsets", "whole"])
def test_parser_on_nesting_at_every_depth_near_the_recursion_limit(
    scratch: Path, where: str
) -> None:
    """The depth where json gives up is a property of the stack at the time: sweep around it."""
    import sys

    limit = sys.getrecursionlimit()
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    for depth in range(max(1, limit - 300), limit + 20, 3):
        deep = "[" * depth + "]" * depth
        raw = {
            "metadata": f'{{"__metadata__": {deep}, "a": {entry}}}',
            "dtype": f'{{"a": {{"dtype": {deep}, "shape": [1], "data_offsets": [0, 4]}}}}',
            "shape": f'{{"a": {{"dtype": "F32", "shape": {deep}, "data_offsets": [0, 4]}}}}',
            "offsets": f'{{"a": {{"dtype": "F32", "shape": [1], "data_offsets": {deep}}}}}',
            "whole": deep,
        }[where]
        got = check_file(scratch, st_file(raw.encode(), b"\0" * 4))
        assert isinstance(got, AdapterRejected)


# ----------------------------------------------------------------------------- adapter_config.json

PLAIN = ["q_proj", "v_proj", "up_proj", "self_attn.q_proj", "model.layers.0.self_attn.q_proj"]
ODD_NAMES = [
    "all-linear",
    ".*",
    "q_proj|v_proj",
    "(a+)+$",
    "(",
    "q.proj",
    "model.layers.0.self_attn.q.proj",
    "layers.0.self_attn.q_proj",
    "../../etc/passwd",
    "/etc/passwd",
    "C:\\x",
    "",
    "q_proj\x00",
]
NAMES = st.sampled_from(PLAIN + ODD_NAMES) | TEXT
NAME_LISTS = st.lists(NAMES, max_size=4) | st.lists(st.sampled_from(PLAIN), min_size=1, max_size=3)
RANKS = (
    st.integers(-2, 70)
    | st.sampled_from([2**31, 2**63, 2**64 + 1, 10**30, True, 4.0, "4", None])
    | ODD_NUMBERS.map(Raw)
)
INITS = [True, False, "gaussian", "pissa", "pissa_niter_4", "olora", "mica", "eva", "corda"]
INITS += ["loftq", "lora_ga", "orthogonal", "evil", "", 0, 1, None]
OFF = st.sampled_from([None, False, 0, "", [], {}, True, 1, ["x"], {"a": 1}, "yes", {"r": 2}])
CONFIG_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "peft_type": st.sampled_from(["LORA", "lora", "LoRA", "LOHA", "ADALORA", " LORA", "", 1, None]),
    "r": RANKS,
    "lora_alpha": st.integers(-5, 100) | st.floats() | st.sampled_from([True, "8", 10**400]),
    "target_modules": NAMES | NAME_LISTS | JSON_VALUES,
    "exclude_modules": st.none() | NAMES | NAME_LISTS,
    "layers_to_transform": st.none()
    | st.integers(-2, 3)
    | st.lists(st.integers(-1, 3), max_size=3)
    | st.sampled_from([["0"], True, 1.0]),
    "layers_pattern": st.none()
    | st.sampled_from(["layers", "layer", "h", "(", "(a+)+$", ".*", "", "lay.rs", "layers.0"])
    | st.lists(st.sampled_from(["layers", "(", "h"]), max_size=2),
    "rank_pattern": st.dictionaries(NAMES, RANKS, max_size=3),
    "alpha_pattern": st.dictionaries(NAMES, st.floats() | st.integers(-2, 20), max_size=3),
    "init_lora_weights": st.sampled_from(INITS),
    "task_type": st.sampled_from(["CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION", "causal_lm", None]),
    "auto_mapping": st.sampled_from(
        [
            None,
            {"base_model_class": "Qwen2MoeForCausalLM", "parent_library": "transformers"},
            {"base_model_class": "system", "parent_library": "os"},
            {"base_model_class": "X", "parent_library": "transformers..x"},
            {"base_model_class": "a.b", "parent_library": "transformers"},
            {"base_model_class": "X"},
        ]
    )
    | JSON_VALUES,
    "auto_map": st.sampled_from([None, {"AutoModel": "evil.Model"}]) | JSON_VALUES,
    "bias": st.sampled_from(["none", "all", "lora_only", None]),
    "megatron_core": st.sampled_from(["megatron.core", None, "os", ""]),
    "runtime_config": st.sampled_from([None, {}, {"ephemeral_gpu_offload": True}]) | JSON_VALUES,
    "lora_dropout": st.floats(-1, 2) | JSON_VALUES,
    "qalora_group_size": st.integers(-1, 64) | JSON_VALUES,
    "trust_remote_code": st.booleans(),
}
FLAG_KEYS = ["inference_mode", "fan_in_fan_out", "use_rslora", "ensure_weight_tying"]
OFF_KEYS = ["use_dora", "modules_to_save", "lora_bias", "target_parameters"]
OFF_KEYS += ["trainable_token_indices", "layer_replication", "megatron_config", "loftq_config"]
OFF_KEYS += ["eva_config", "corda_config", "use_qalora", "use_bdlora", "arrow_config"]
OFF_KEYS += ["alora_invocation_tokens", "kasa_config", "lora_ga_config", "monteclora_config"]
OFF_KEYS += ["velora_config"]
CONFIG_VALUES |= {k: st.booleans() | JSON_VALUES for k in FLAG_KEYS}
CONFIG_VALUES |= {k: OFF | JSON_VALUES for k in OFF_KEYS}
CONFIG_KEYS = sorted(set(CONFIG_VALUES) | set(LoraAdapterConfig.model_fields))


@st.composite
def mutated_configs(draw: st.DrawFn, good: dict[str, Any]) -> Any:
    cfg: Any = dict(good)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["set", "set", "set", "drop", "unknown", "deep", "whole"]))
        key = draw(st.sampled_from(CONFIG_KEYS))
        if not isinstance(cfg, dict):
            break
        if kind == "set":
            cfg[key] = draw(CONFIG_VALUES.get(key, JSON_VALUES))
        elif kind == "drop":
            cfg.pop(key, None)
        elif kind == "unknown":
            cfg[draw(TEXT)] = draw(JSON_VALUES)
        elif kind == "deep":
            cfg[key] = draw(DEEP)
        else:
            cfg = draw(JSON_VALUES)
    return cfg


def peft_reading(raw: dict[str, Any]) -> Any:
    """The LoraConfig PEFT builds from this adapter_config.json (PeftConfig.from_pretrained,
    without the file read): it drops runtime_config and ignores unknown keys."""
    attrs = {k: v for k, v in raw.items() if k != "runtime_config"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**attrs))


PEFT_DEFAULTS = {
    f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
    for f in dataclasses.fields(LoraConfig)
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
}
SAFE_INITS = (True, False, "gaussian")  # the inits that leave the base model's weights alone


def peft_plan(raw: dict[str, Any], modules: list[str]) -> dict[str, int]:
    """{module: rank} for every module PEFT would put this adapter's LoRA on."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    try:
        peft = peft_reading(raw)
        ranks = peft.rank_pattern
        return {
            m: ranks.get(get_pattern_key(ranks.keys(), m), peft.r)
            for m in modules
            if check_target_module_exists(peft, m)
        }
    except Exception as e:
        raise AssertionError(
            f"accepted a config PEFT cannot use: {type(e).__name__}: {e}"
        ) from None


def check_accepted_config(raw: dict[str, Any], plan: Any, base: ModelInfo, max_rank: int) -> None:
    """An accepted config is one PEFT loads without error, as the plan says: the same modules,
    the same ranks, and no feature beyond plain LoRA switched on."""
    assert 1 <= plan.rank <= max_rank and 0 < plan.alpha < float("inf")
    assert raw["peft_type"] == "LORA" and set(raw) <= set(LoraAdapterConfig.model_fields)
    modules = sorted(base.linear_shapes)
    ours = {m: plan.rank_for(m) for m in modules if plan.selects(m)}
    assert ours == peft_plan(raw, modules), "PEFT would adapt other modules, or other ranks"
    peft = peft_reading(raw)
    assert peft.init_lora_weights in SAFE_INITS, peft.init_lora_weights
    for key in OFF_KEYS:
        if key in PEFT_DEFAULTS:
            assert getattr(peft, key) in (None, PEFT_DEFAULTS[key]), (key, getattr(peft, key))
    assert not raw.get("auto_map") and not raw.get("trust_remote_code")


@MANY
@given(data=st.data(), max_rank=st.sampled_from([4, 64]))
def test_config_mutations(
    base: ModelInfo, good_config: dict[str, Any], data: st.DataObject, max_rank: int
) -> None:
    raw = data.draw(mutated_configs(good_config))
    text = to_json(raw).encode("utf-8", "surrogatepass")
    got = outcome(lambda: parse_config(loads_strict(CFG, text, "content"), base, max_rank))
    if isinstance(got, AdapterRejected):
        assert str(got).startswith(f"{CFG}: ")
        event("rejected")
        return
    event("accepted")
    check_accepted_config(json.loads(text), got, base, max_rank)


def test_good_config_is_accepted(base: ModelInfo, good_config: dict[str, Any]) -> None:
    """The fuzz's starting point passes, so accepted examples are checked, not just rejections."""
    plan = parse_config(good_config, base, 64)
    check_accepted_config(good_config, plan, base, 64)


# ----------------------------------------------------------------------------- adapter directories


def _fs_name(name: str) -> bool:
    """Whether a file can have this name (lone surrogates other than os.fsdecode's cannot)."""
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return True


SAFE_FILES = ["notes.md", "README", "x.safetensors", "adapter_model.safetensors.bak", "..x"]
SAFE_FILES += ["x..y", "...", ".hidden", "a b", "ü.json", "tokenizer.json", "checkpoint"]
UNSAFE_FILES = ["x.bin", "x.PT", "m.pkl", "mod.py", "a.so", "training_args.bin", "o.NPZ", "c.pyc"]
SEGMENT = (
    st.sampled_from(SAFE_FILES + UNSAFE_FILES)
    | st.text(st.characters(exclude_characters="/\x00"), min_size=1, max_size=10)
    | st.binary(min_size=1, max_size=8).map(os.fsdecode)  # names that are not UTF-8
).filter(lambda s: s not in (".", "..") and "/" not in s and "\x00" not in s and _fs_name(s))
RELPATHS = st.lists(SEGMENT, min_size=1, max_size=3).map(lambda p: "/".join(p))
CONTENTS = st.sampled_from([b"", PICKLE_BYTES, b"\x80\x04N."]) | st.binary(max_size=64)
LINK_TARGETS = ["config", "subdir", "outside-file", "outside-dir", "dangling", "self", "loop"]
LINK_TARGETS += ["/etc/passwd", "..", ".", "non-utf8"]
REPLACEMENTS = [
    "empty",
    "dir",
    "dir-with-file",
    "pickle",
    "bytes",
    "truncated",
    "fifo",
    "torch-zip",
]
REPLACEMENTS += ["symlink", "hardlink-outside", "remove"]


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # extra | emptydir | symlink | hardlink | fifo | replace
    rel: str = ""
    how: str = ""  # a LINK_TARGETS item, a REPLACEMENTS item, or the hard link's source
    data: bytes = b""


OPS = st.one_of(
    st.builds(Op, st.just("extra"), RELPATHS, st.just(""), CONTENTS),
    st.builds(Op, st.just("emptydir"), RELPATHS),
    st.builds(Op, st.just("symlink"), RELPATHS, st.sampled_from(LINK_TARGETS)),
    st.builds(Op, st.just("hardlink"), RELPATHS, st.sampled_from(["weights", "config", "outside"])),
    st.builds(Op, st.just("fifo"), RELPATHS),
    st.builds(
        Op, st.just("replace"), st.sampled_from([CFG, WEIGHTS]), st.sampled_from(REPLACEMENTS)
    ),
)


def _room_for(rel: str, adapter: Path) -> bool:
    """Whether `rel` is new and every directory above it is (or can be) a real directory."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        above = adapter.joinpath(*parts[:i])
        if os.path.lexists(above) and (above.is_symlink() or not above.is_dir()):
            return False
    if rel in (CFG, WEIGHTS) or os.path.lexists(adapter / rel):
        return False
    (adapter / rel).parent.mkdir(parents=True, exist_ok=True)
    return True


def apply(op: Op, adapter: Path, outside: Path, good_weights: bytes) -> bool:
    """Do `op` inside `adapter`; False (and nothing done) when it collides with earlier ops."""
    target = adapter / op.rel
    if op.kind != "replace" and not _room_for(op.rel, adapter):
        return False
    if op.kind == "extra":
        target.write_bytes(op.data)
    elif op.kind == "emptydir":
        target.mkdir()
    elif op.kind == "fifo":
        os.mkfifo(target)
    elif op.kind == "hardlink":
        source = {"weights": adapter / WEIGHTS, "config": adapter / CFG}.get(op.how)
        if source is None or source.is_symlink() or not source.is_file():
            source = outside / "plain.txt"
        os.link(source, target)
    elif op.kind == "symlink":
        os.symlink(_link_target(op.how, target, adapter, outside), target)
    else:
        _replace(op.how, target, outside, good_weights)
    return True


def _link_target(how: str, link: Path, adapter: Path, outside: Path) -> str:
    if how == "loop":  # link -> other -> link
        other = link.with_name(link.name + ".other")
        if not os.path.lexists(other):
            os.symlink(link, other)
        return str(other)
    named = {
        "config": adapter / CFG,
        "subdir": adapter,
        "outside-file": outside / "plain.txt",
        "outside-dir": outside,
        "dangling": outside / "absent",
        "self": link,
        "non-utf8": Path(os.fsdecode(b"/tmp/\x80\xff")),
    }
    return str(named.get(how, how))


def _replace(how: str, target: Path, outside: Path, good_weights: bytes) -> None:
    regular = target.is_file() and not target.is_symlink()
    content = target.read_bytes() if regular else b""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif os.path.lexists(target):
        target.unlink()
    if how in ("dir", "dir-with-file"):
        target.mkdir()
        if how == "dir-with-file":
            (target / WEIGHTS).write_bytes(good_weights)
    elif how == "fifo":
        os.mkfifo(target)
    elif how in ("symlink", "hardlink-outside"):
        (outside / target.name).write_bytes(content)
        link = os.symlink if how == "symlink" else os.link
        link(outside / target.name, target)
    elif how != "remove":
        target.write_bytes(
            {
                "empty": b"",
                "pickle": PICKLE_BYTES,
                "bytes": b"\x00\x01garbage",
                "truncated": content[: max(0, len(content) - 7)],
                "torch-zip": b"PK\x03\x04" + b"\x00" * 60,
            }[how]
        )


def acceptable(adapter: Path, pristine: Path) -> bool:
    """The rule, read off the final directory: the two adapter files are regular and unchanged,
    and everything else is a directory or a regular file with a UTF-8 name and no pickle / code
    suffix."""
    for dirpath, dirnames, filenames in os.walk(adapter):  # symlinks are listed, not followed
        for name in dirnames + filenames:
            mode = os.lstat(Path(dirpath, name)).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                return False
            if not name.isascii() and not _utf8(name):
                return False
            if stat.S_ISREG(mode) and PurePosixPath(name).suffix.lower() in UNSAFE_SUFFIXES:
                return False
    return all(
        (adapter / f).is_file() and (adapter / f).read_bytes() == (pristine / f).read_bytes()
        for f in (CFG, WEIGHTS)
    )


UNSAFE_SUFFIXES = PICKLE_SUFFIXES | CODE_SUFFIXES


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextmanager
def mutated_adapter(tiny_moe: TinyMoe, ops: list[Op]) -> Iterator[tuple[Path, bool]]:
    """A fresh copy of the good adapter with `ops` applied, and whether it should pass."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter, outside = Path(tmp) / "adapter", Path(tmp) / "outside"
        shutil.copytree(tiny_moe.lora_dir, adapter)
        outside.mkdir()
        (outside / "plain.txt").write_text("not an adapter file\n")
        good_weights = (adapter / WEIGHTS).read_bytes()
        for op in ops:
            if apply(op, adapter, outside, good_weights):
                event(f"{op.kind}:{op.how}" if op.kind in ("replace", "symlink") else op.kind)
        yield adapter, acceptable(adapter, tiny_moe.lora_dir)


@FEW
@given(ops=st.lists(OPS, max_size=4))
def test_adapter_dir_mutations(tiny_moe: TinyMoe, base: ModelInfo, ops: list[Op]) -> None:
    with mutated_adapter(tiny_moe, ops) as (adapter, should_pass):
        got = outcome(lambda: validate_adapter_dir(adapter, base, allowed_root=adapter.parent))
        if isinstance(got, AdapterRejected):
            assert not should_pass, f"a harmless change was refused: {got}"
        else:
            assert should_pass, f"accepted after {ops}"
            assert isinstance(got, AdapterInfo) and got.files == (CFG, WEIGHTS)
            assert got.path == adapter.resolve()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_moe: TinyMoe) -> Registry:
    """A registry with the tiny base, built the way test_register_files.py builds one."""
    return tiny_registry(tmp_path_factory.mktemp("fuzz-home"), tiny_moe)


_names = itertools.count()


@settings(FUZZ, max_examples=25)
@given(ops=st.lists(OPS, min_size=1, max_size=3))
def test_registration_of_mutated_dirs(tiny_moe: TinyMoe, registry: Registry, ops: list[Op]) -> None:
    """A refused registration leaves the listing, the version and the artifact store as they were;
    an accepted one is removed again, so every example starts from the base alone."""
    name = f"fuzz-{next(_names)}"
    with mutated_adapter(tiny_moe, ops) as (adapter, should_pass):
        version, store = registry.version(), sorted(os.listdir(registry.artifacts.root))
        spec = {"kind": "lora", "name": name, "base": "tiny", "path": str(adapter)}
        got = outcome(lambda: registry.register(spec))
        if isinstance(got, AdapterRejected):
            assert not should_pass, f"a harmless change was refused: {got}"
            assert registry.version() == version
            assert sorted(os.listdir(registry.artifacts.root)) == store
        else:
            registry.remove(name)  # first: a failed example must not leave it for the next
            assert should_pass, f"registered after {ops}"
        assert [r.name for r in registry.list()] == ["tiny"]


# ----------------------------------------------------------------------------- regressions
# One plain example per bug the fuzzing found; each failed (another exception, or an acceptance)
# before its fix.

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


@pytest.fixture
def adapter(tiny_moe: TinyMoe, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_moe.lora_dir, tmp_path / "adapter"))


def _set_config(d: Path, **changes: Any) -> None:
    config = json.loads((d / CFG).read_text())
    config.update(changes)
    (d / CFG).write_text(json.dumps(config))


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
