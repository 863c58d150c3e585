"""Strategies, guards and builders shared by the adapter-validation fuzz tests."""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from peft import LoraConfig

from concilium.errors import AdapterRejected
from concilium.registry.peft_config import LoraAdapterConfig
from concilium.registry.safetensors_check import (
    ADAPTER_DTYPES,
    TensorInfo,
    parse_safetensors_bytes,
)
from concilium.registry.validate import (
    ModelInfo,
    read_safetensors_header,
)
from tests.conftest import no_hang as shared_no_hang

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


OFF_KEYS = ["use_dora", "modules_to_save", "lora_bias", "target_parameters"]


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
