"""Property-based fuzz of adapter validation: whatever an uploader hands over, validation accepts a
well-formed adapter or raises ``AdapterRejected`` naming the problem; never another exception, a
hang, an allocation of a size the file only claims, an unpickling call, or a registry changed by a
refused registration.

Whole adapter directories (``validate_adapter_dir``) with an oracle that knows which mutations
are harmless, and full registrations (``Registry.register``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from hypothesis import event, given, settings
from hypothesis import strategies as st

from concilium.errors import AdapterRejected
from concilium.registry.fs_checks import CODE_SUFFIXES, PICKLE_SUFFIXES
from concilium.registry.registry import Registry
from concilium.registry.validate import (
    AdapterInfo,
    ModelInfo,
    validate_adapter_dir,
)
from tests.registry.conftest import TinyMoe
from tests.registry.fuzz.common import (
    CFG,
    FEW,
    FUZZ,
    PICKLE_BYTES,
    WEIGHTS,
    outcome,
)


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


_names = itertools.count()


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
