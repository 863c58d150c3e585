"""Directory checks shared by model and adapter validation: walk, link and file-type rules.

Nothing here follows a symlink while walking (``lstat`` only). ``walk`` lists every file and
symlink under a directory (capped at ``MAX_ENTRIES``) and refuses names that are not UTF-8 (every
rejection names files, and is sent as UTF-8 JSON); ``refuse_links`` is the adapter rule (no
symlink at all), ``resolve_links`` the model rule (each link must resolve to a regular file inside
a fence; loops and dangling links refused); ``refuse_unsafe_files`` rejects pickle-based and code
files by suffix. JSON files are read with a size cap and parsed strictly
(``safetensors_check.loads_strict``). Paths in messages go through ``shown``, so a message is
always valid UTF-8. Links are resolved with ``os.path.realpath``: ``Path.resolve`` raises
RuntimeError on a symlink loop on Python 3.11.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from concilium.errors import AdapterRejected
from concilium.registry.safetensors_check import loads_strict, read_bytes

__all__ = [
    "CODE_SUFFIXES",
    "MAX_ENTRIES",
    "MAX_JSON_BYTES",
    "PICKLE_SUFFIXES",
    "Entry",
    "check_dir",
    "json_object",
    "load_json",
    "refuse_links",
    "refuse_unsafe_files",
    "resolve_links",
    "shown",
    "total_bytes",
    "walk",
]

PICKLE_SUFFIXES = frozenset(
    {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}
)
CODE_SUFFIXES = frozenset({".py", ".pyc", ".so", ".pyd"})
MAX_ENTRIES = 10_000
MAX_JSON_BYTES = 32 * 1024**2


@dataclass(frozen=True, slots=True)
class Entry:
    rel: str  # '/'-separated path relative to the validated directory
    path: Path  # where to read it (a symlink's resolved target for model dirs)
    is_link: bool
    size: int


def check_dir(path: Path, allowed_root: Path | None, what: str) -> Path:
    """The resolved directory, refused when missing, a symlink, or outside `allowed_root`."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        raise AdapterRejected(f"{shown(path)}: {what} directory not found") from None
    except ValueError as e:  # a NUL byte, or a surrogate no file name can hold
        raise AdapterRejected(f"{shown(path)!r}: not a valid file system path ({e})") from None
    if stat.S_ISLNK(mode):
        raise AdapterRejected(f"{shown(path)}: {what} directory is a symlink; give the real path")
    if not stat.S_ISDIR(mode):
        raise AdapterRejected(f"{shown(path)}: not a directory")
    real = path.resolve()
    if allowed_root is not None and not real.is_relative_to(allowed_root.resolve()):
        raise AdapterRejected(
            f"{shown(path)}: resolves to {shown(real)}, outside the allowed root "
            f"{shown(allowed_root.resolve())}"
        )
    return real


def walk(root: Path) -> list[Entry]:
    """Every file and symlink under `root` (lstat only: nothing is followed)."""
    out: list[Entry] = []
    stack = [root]
    while stack:
        for item in _scandir(stack.pop()):
            p = Path(item.path)
            rel = p.relative_to(root).as_posix()
            if not _is_utf8(rel):  # every message names files, and is sent as UTF-8
                raise AdapterRejected(f"{shown(rel)}: file name is not valid UTF-8")
            mode, size = (st := _lstat(item, rel)).st_mode, st.st_size
            if stat.S_ISDIR(mode):
                stack.append(p)
            elif stat.S_ISLNK(mode) or stat.S_ISREG(mode):
                out.append(Entry(rel, p, stat.S_ISLNK(mode), 0 if stat.S_ISLNK(mode) else size))
            else:
                raise AdapterRejected(f"{rel}: not a regular file, directory or symlink")
        if len(out) + len(stack) > MAX_ENTRIES:
            raise AdapterRejected(f"{shown(root)}: more than {MAX_ENTRIES} entries")
    return sorted(out, key=lambda e: e.rel)


def _lstat(item: os.DirEntry[str], rel: str) -> os.stat_result:
    try:
        return item.stat(follow_symlinks=False)
    except OSError as e:  # listed, then removed or replaced before it could be examined
        raise AdapterRejected(f"{rel}: cannot examine ({e.strerror}); did it change?") from None


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes the file system decoded as surrogate escapes
        return False
    return True


def shown(name: str | Path) -> str:
    """`name` printable as UTF-8: surrogates (undecodable bytes) written as backslash escapes."""
    return str(name).encode("utf-8", "backslashreplace").decode("utf-8")


def _scandir(d: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(d) as it:
            return list(it)
    except OSError as e:
        raise AdapterRejected(f"{shown(d)}: cannot list directory ({e.strerror})") from None


def refuse_unsafe_files(entries: list[Entry]) -> None:
    for e in entries:
        suffix = PurePosixPath(e.rel).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise AdapterRejected(
                f"{e.rel}: pickle-based files ({suffix}) are not allowed; use .safetensors"
            )
        if suffix in CODE_SUFFIXES:
            raise AdapterRejected(f"{e.rel}: code files ({suffix}) are not allowed")


def refuse_links(entries: list[Entry], root: Path) -> None:
    for e in entries:
        if e.is_link:
            inside = _realpath(e.path).is_relative_to(root)
            where = "inside the directory" if inside else "escapes the adapter directory"
            raise AdapterRejected(
                f"{e.rel}: symlink to {shown(os.readlink(e.path))} ({where}); "
                "adapter directories may not contain symlinks"
            )


def resolve_links(entries: list[Entry], fence: Path) -> list[Entry]:
    """Model dirs: each symlink replaced by its target, which must be a regular file in `fence`."""
    out = []
    for e in entries:
        if not e.is_link:
            out.append(e)
            continue
        target = _realpath(e.path)
        if not target.is_relative_to(fence):
            raise AdapterRejected(f"{e.rel}: symlink to {shown(target)} escapes {shown(fence)}")
        try:
            st = os.stat(target)
        except OSError as err:
            why = "a symlink loop" if err.errno == errno.ELOOP else "dangling"
            raise AdapterRejected(f"{e.rel}: {why} symlink to {shown(target)}") from None
        if not stat.S_ISREG(st.st_mode):
            raise AdapterRejected(
                f"{e.rel}: symlink to {shown(target)}, which is not a regular file"
            )
        out.append(Entry(e.rel, target, False, st.st_size))
    return out


def _realpath(p: Path) -> Path:
    """Where a symlink leads; unlike Path.resolve on Python 3.11, a loop does not raise."""
    return Path(os.path.realpath(p))


def total_bytes(path: Path, entries: list[Entry], max_bytes: int) -> int:
    total = sum(e.size for e in entries)
    if total > max_bytes:
        raise AdapterRejected(
            f"{shown(path)}: {total} bytes in {len(entries)} files exceeds the size cap of "
            f"{max_bytes}"
        )
    return total


def load_json(e: Entry) -> Any:
    return loads_strict(e.rel, read_bytes(e.path, e.rel, max_bytes=MAX_JSON_BYTES), "content")


def json_object(e: Entry) -> dict[str, Any]:
    obj = load_json(e)
    if not isinstance(obj, dict):
        raise AdapterRejected(f"{e.rel}: must be a JSON object, got {type(obj).__name__}")
    return obj
