"""Safetensors headers checked by hand, before a single tensor byte is trusted.

A safetensors file is ``[u64 little-endian N][N bytes of JSON header][data section]``. The header
maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section) plus an optional ``"__metadata__"`` str→str map. We check every field here, so a
pickle renamed ``.safetensors``, a truncated file or a header that points outside the file fails
with a message naming the file and the tensor, and the safetensors library only ever sees a file
that already parses.

The JSON must be what a strict parser (serde_json, in the safetensors library) reads the same way:
no duplicate keys, NaN, unpaired ``\\udXXX`` surrogate escapes or ``-0``; and a shape whose non-zero
dims multiply past 64-bit sizes is refused even when a zero dim makes the tensor empty (torch's
sizes and strides are int64). The fuzz tests check that the library loads whatever passes here
with the same table.

Dtypes: adapters carry floating weights only (``ADAPTER_DTYPES``: F32, F16, BF16). Model directories
may also hold integer and bool buffers (``MODEL_DTYPES``), e.g. BERT's I64 ``position_ids``.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

from concilium.errors import AdapterRejected
from concilium.registry.specs import invalid_text

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_NDIM = 8
# torch's sizes and strides are int64: a shape whose non-zero dims multiply past this (in bytes)
# breaks the loaders even when a zero dim makes the tensor empty
MAX_TENSOR_BYTES = 2**63 - 1
DTYPE_SIZES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
ADAPTER_DTYPES = frozenset({"F32", "F16", "BF16"})
MODEL_DTYPES = frozenset(DTYPE_SIZES)
_OFFSETS = "data_offsets"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return prod(self.shape)


def read_safetensors_header(
    path: Path, *, max_bytes: int, allowed_dtypes: frozenset[str] = ADAPTER_DTYPES
) -> dict[str, TensorInfo]:
    """Check the header of the safetensors file at `path`; never reads the tensor data.

    Raises AdapterRejected naming the file and the first problem found.
    """
    return read_header_as(path, path.name, max_bytes=max_bytes, allowed_dtypes=allowed_dtypes)


def read_header_as(
    path: Path, label: str, *, max_bytes: int, allowed_dtypes: frozenset[str]
) -> dict[str, TensorInfo]:
    """`read_safetensors_header` reporting problems under `label` (a name relative to its dir)."""
    with open_regular(path, label) as f:
        size = os.fstat(f.fileno()).st_size
        _check_file_size(label, size, max_bytes)
        n = header_length(label, f.read(8), size)
        raw = _read(f, n, label)
    return parse_header(label, raw, size - 8 - n, allowed_dtypes)


def parse_safetensors_bytes(
    label: str, data: bytes, allowed_dtypes: frozenset[str]
) -> dict[str, TensorInfo]:
    """The same checks on a whole file already read into memory."""
    n = header_length(label, data[:8], len(data))
    return parse_header(label, data[8 : 8 + n], len(data) - 8 - n, allowed_dtypes)


def read_bytes(path: Path, label: str, *, max_bytes: int) -> bytes:
    """The whole content of a regular file (no symlink followed), at most `max_bytes` long."""
    with open_regular(path, label) as f:
        _check_file_size(label, os.fstat(f.fileno()).st_size, max_bytes)
        data = f.read(max_bytes + 1)
    _check_file_size(label, len(data), max_bytes)
    return data


def open_regular(path: Path, label: str) -> BinaryIO:
    """Open a regular file for reading, refusing symlinks, FIFOs and devices."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise AdapterRejected(f"{label}: file not found") from None
    except OSError as e:
        if os.path.islink(path):
            raise AdapterRejected(f"{label}: is a symlink; symlinks are not allowed") from None
        raise AdapterRejected(f"{label}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterRejected(f"{label}: not a regular file")
    return os.fdopen(fd, "rb")


def header_length(label: str, first8: bytes, file_size: int) -> int:
    """N from the first 8 bytes, checked against the file size and the 100 MB limit."""
    if file_size < 8 or len(first8) < 8:
        raise AdapterRejected(
            f"{label}: file is {file_size} bytes, too short for a safetensors header (needs 8+)"
        )
    (n,) = struct.unpack("<Q", first8)
    if n == 0:
        raise AdapterRejected(f"{label}: header length is 0")
    if n > file_size - 8:
        raise AdapterRejected(
            f"{label}: header length {n} exceeds file size {file_size}{_sniff(first8)}"
        )
    if n > MAX_HEADER_BYTES:
        raise AdapterRejected(
            f"{label}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit"
        )
    return n


def parse_header(
    label: str, raw: bytes, data_len: int, allowed_dtypes: frozenset[str]
) -> dict[str, TensorInfo]:
    """Parse and check the JSON header; `data_len` is the size of the data section after it."""
    obj = _json_object(label, raw)
    _check_metadata(label, obj.pop("__metadata__", {}))
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in obj.items():
        info, begin, end = _tensor_entry(label, key, entry, allowed_dtypes)
        if end > data_len:
            raise AdapterRejected(
                f"{label}: tensor {key!r} ends at byte {end} but the data section has only "
                f"{data_len} bytes (truncated file?)"
            )
        tensors[key] = info
        spans.append((begin, end, key))
    _check_coverage(label, spans, data_len)
    return tensors


def _check_file_size(label: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise AdapterRejected(f"{label}: {size} bytes exceeds the size cap of {max_bytes} bytes")


def _read(f: BinaryIO, n: int, label: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise AdapterRejected(f"{label}: file changed while being read (short read)")
    return data


def _sniff(first8: bytes) -> str:
    """A hint when the file is plainly some other format."""
    if first8[:1] == b"\x80":
        return " (starts like a pickle stream: not a safetensors file)"
    if first8[:2] == b"PK":
        return " (starts like a zip archive, e.g. torch.save: not a safetensors file)"
    return ""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def loads_strict(label: str, raw: bytes, what: str) -> Any:
    """json.loads that refuses duplicate keys, NaN/Infinity, bad UTF-8 and unpaired surrogate
    escapes, as AdapterRejected."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterRejected(f"{label}: {what} is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
        )
    except (ValueError, RecursionError) as e:
        raise AdapterRejected(f"{label}: {what} is not valid JSON ({e})") from None
    if "\\u" in text and (bad := invalid_text(obj)) is not None:
        raise AdapterRejected(
            f"{label}: {what} string {bad[1][:40]!r} has an unpaired UTF-16 surrogate escape "
            "(not valid Unicode)"
        )
    return obj


def _parse_int(digits: str) -> int:
    """JSON `-0` is a float to strict parsers (serde_json, so the safetensors library)."""
    if digits.startswith("-") and not digits.strip("-0"):
        raise ValueError(f"{digits} is a negative zero, not an integer")
    return int(digits)


def _json_object(label: str, raw: bytes) -> dict[str, Any]:
    obj = loads_strict(label, raw, "header")
    if not isinstance(obj, dict):
        raise AdapterRejected(f"{label}: header must be a JSON object, got {type(obj).__name__}")
    return obj


def _check_metadata(label: str, meta: Any) -> None:
    ok = isinstance(meta, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    )
    if not ok:
        raise AdapterRejected(f"{label}: __metadata__ must be a map of strings to strings")


def _is_nat(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensor_entry(
    label: str, key: str, entry: Any, allowed_dtypes: frozenset[str]
) -> tuple[TensorInfo, int, int]:
    """Check one header entry; returns the tensor and its [begin, end) span in the data section."""
    where = f"{label}: tensor {key!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", _OFFSETS}:
        raise AdapterRejected(f"{where}: entry must have exactly dtype, shape and {_OFFSETS}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry[_OFFSETS]
    if not isinstance(dtype, str) or dtype not in allowed_dtypes:
        raise AdapterRejected(
            f"{where}: dtype {dtype!r} not allowed (allowed: {', '.join(sorted(allowed_dtypes))})"
        )
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(map(_is_nat, shape)):
        raise AdapterRejected(f"{where}: shape {shape!r} must be a list of non-negative ints")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_nat, offsets)):
        raise AdapterRejected(f"{where}: {_OFFSETS} {offsets!r} must be [begin, end] ints")
    if prod(d for d in shape if d) * DTYPE_SIZES[dtype] > MAX_TENSOR_BYTES:
        raise AdapterRejected(f"{where}: shape {shape} of {dtype} overflows 64-bit sizes")
    begin, end = offsets
    need = prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != need:
        raise AdapterRejected(
            f"{where}: {_OFFSETS} {offsets} span {end - begin} bytes but dtype {dtype} "
            f"shape {shape} needs {need}"
        )
    return TensorInfo(name=key, dtype=dtype, shape=tuple(shape)), begin, end


def _check_coverage(label: str, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, no trailing bytes."""
    pos, prev = 0, None
    for begin, end, key in sorted(spans):
        if begin < pos:
            raise AdapterRejected(f"{label}: tensors {prev!r} and {key!r} overlap")
        if begin > pos:
            raise AdapterRejected(f"{label}: {begin - pos} unused bytes before tensor {key!r}")
        pos, prev = end, key
    if pos != data_len:
        raise AdapterRejected(f"{label}: {data_len - pos} trailing bytes after the last tensor")
