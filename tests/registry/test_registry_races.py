"""Registration under races and odd inputs: sources changed mid-copy, FIFOs, vanished files,
symlinked parents, stale gates, unencodable names, unexpandable paths, site-local IPv6."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from concilium.errors import AdapterRejected, ExpertNotFound, SpecError, UnsafeURL
from concilium.registry import artifacts as artifacts_mod
from concilium.registry import fs_checks
from concilium.registry import validate as validate_mod
from concilium.registry.registry import Registry, RegistryLimits
from concilium.registry.validate import (
    validate_adapter_dir,
    validate_model_dir,
    validate_remote_url,
)
from tests.conftest import HashEncoder, remote_spec
from tests.registry.conftest import TinyMoe, tiny_registry

WEIGHTS = "adapter_model.safetensors"


def _lora(name: str, path: Path, **kw: Any) -> dict[str, Any]:
    return {"kind": "lora", "name": name, "base": "tiny", "path": str(path), **kw}


def _dir_digest(d: Path) -> str:
    """The ref `ArtifactStore.put_files` gives the files of `d`."""
    h = hashlib.sha256()
    for p in sorted(d.iterdir(), key=lambda p: p.name):
        h.update(f"{p.name}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\0".encode())
    return h.hexdigest()


def test_lookups_of_a_name_sqlite_cannot_encode_are_not_found(tmp_path: Path) -> None:
    """A lone surrogate in a looked-up name raised a raw UnicodeEncodeError out of sqlite3."""
    reg = Registry(tmp_path, HashEncoder())
    reg.register(remote_spec("a", ["x"]))
    for lookup in (reg.get, reg.remove):
        with pytest.raises(ExpertNotFound, match="no expert named"):
            lookup("a\ud800")
    assert reg.store.update_artifacts("a\ud800", {"x": 1}) is None
    assert reg.version() == 1 and [r.name for r in reg.list()] == ["a"]


def test_a_path_naming_an_unknown_users_home_is_a_spec_error(tmp_path: Path) -> None:
    """Path.expanduser raised RuntimeError('Could not determine home directory.')."""
    reg = Registry(tmp_path, HashEncoder())
    with pytest.raises(SpecError) as exc:
        reg.register({"kind": "model", "name": "m", "path": "~no-such-user-7f3a/model"})
    assert exc.value.field == "path" and "~no-such-user-7f3a" in str(exc.value)
    assert reg.version() == 0


@pytest.mark.parametrize("when", ["open", "close"])
def test_a_source_changed_between_hash_and_copy_cannot_poison_its_content_name(
    tmp_path: Path, tiny_moe: TinyMoe, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """put_files hashed the source, then copied it again: a file swapped in between was stored
    under the other content's name, and a later registration of that content got it instead.
    The source is rewritten in place either as the store first opens it (before reading) or
    when it closes that first handle (after one full read): whichever pass reads it, the
    artifact must be named by the bytes it holds."""
    reg = tiny_registry(tmp_path / "home", tiny_moe)
    good = Path(shutil.copytree(tiny_moe.lora_dir, tmp_path / "good"))
    other = Path(shutil.copytree(tiny_moe.lora_dir, tmp_path / "other"))
    from safetensors.torch import load, save_file

    tensors = {k: v * 2 for k, v in load((other / WEIGHTS).read_bytes()).items()}
    save_file(tensors, other / WEIGHTS)
    assert (other / WEIGHTS).read_bytes() != (good / WEIGHTS).read_bytes()
    good_bytes = (good / WEIGHTS).read_bytes()
    real_open = artifacts_mod.open_regular
    swapped: list[Path] = []

    def swap() -> None:  # a racing registrant rewrites the file in place
        shutil.copyfile(other / WEIGHTS, good / WEIGHTS)
        swapped.append(good / WEIGHTS)

    class SwapOnClose:
        """The first handle on the source weights; closing it (the store has read the file
        once) rewrites the file."""

        def __init__(self, f: Any) -> None:
            self._f = f

        def read(self, *args: Any) -> bytes:
            data: bytes = self._f.read(*args)
            return data

        def close(self) -> None:
            self._f.close()
            if not swapped:
                swap()

        def __enter__(self) -> SwapOnClose:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

    def open_then_swap(path: Path, label: str) -> Any:
        f = real_open(path, label)
        if Path(path) != good / WEIGHTS or swapped:
            return f
        if when == "close":
            return SwapOnClose(f)
        swap()  # same inode, so the handle just opened reads the new bytes
        return f

    # every read the store makes of a source goes through open_regular
    monkeypatch.setattr(artifacts_mod, "open_regular", open_then_swap)
    rec = reg.register(_lora("ad", good))
    assert swapped == [good / WEIGHTS], "the race was never staged"
    assert (good / WEIGHTS).read_bytes() == (other / WEIGHTS).read_bytes()
    stored = reg.runtime_path(rec)
    assert stored is not None and rec.artifacts["adapter"] == stored.name
    assert stored.name == _dir_digest(stored)  # named by what it holds
    held = good_bytes if when == "close" else (other / WEIGHTS).read_bytes()
    assert (stored / WEIGHTS).read_bytes() == held  # what the copying handle read
    rec2 = reg.register(_lora("ad2", other))
    stored2 = reg.runtime_path(rec2)
    assert stored2 is not None and rec2.artifacts["adapter"] == stored2.name
    assert (stored2 / WEIGHTS).read_bytes() == (other / WEIGHTS).read_bytes()
    assert (stored / WEIGHTS).read_bytes() == held


def test_a_source_swapped_for_a_fifo_after_validation_does_not_hang(
    tmp_path: Path, tiny_moe: TinyMoe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing opened the source without O_NONBLOCK: a FIFO swapped in blocked registration."""
    reg = tiny_registry(tmp_path / "home", tiny_moe)
    src = Path(shutil.copytree(tiny_moe.lora_dir, tmp_path / "src"))
    real_check = validate_mod.validate_adapter_dir

    def check_then_swap(path: Path, *args: Any, **kwargs: Any) -> Any:
        info = real_check(path, *args, **kwargs)
        if path == src:
            (src / WEIGHTS).unlink()
            os.mkfifo(src / WEIGHTS)
        return info

    monkeypatch.setattr(validate_mod, "validate_adapter_dir", check_then_swap)
    before = sorted(p.name for p in reg.artifacts.root.iterdir())
    done: list[BaseException] = []
    t = threading.Thread(target=lambda: _record_error(lambda: reg.register(_lora("ad", src)), done))
    t.start()
    t.join(20)
    if t.is_alive():  # unblock the hung open so the thread can end
        with open(src / WEIGHTS, "wb"):
            pass
        t.join(20)
        pytest.fail("registration hung on a FIFO")
    assert len(done) == 1 and isinstance(done[0], AdapterRejected), done
    assert "not a regular file" in str(done[0])
    assert [r.name for r in reg.list()] == ["tiny"]
    assert sorted(p.name for p in reg.artifacts.root.iterdir()) == before


def _record_error(fn: Any, out: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as e:  # handed to the test thread
        out.append(e)


def test_a_failed_post_copy_check_keeps_an_artifact_another_expert_uses(
    tmp_path: Path, tiny_moe: TinyMoe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy whose content was already stored (by an expert registered earlier) was discarded
    when its post-copy check failed, deleting that expert's adapter."""
    reg = tiny_registry(tmp_path / "home", tiny_moe)
    first = reg.register(_lora("ad", tiny_moe.lora_dir))
    real_check = validate_mod.validate_adapter_dir

    def copy_fails(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path.parent == reg.artifacts.root:  # as if the source had changed after its check
            raise AdapterRejected("adapter_model.safetensors: changed after validation")
        return real_check(path, *args, **kwargs)

    monkeypatch.setattr(validate_mod, "validate_adapter_dir", copy_fails)
    with pytest.raises(AdapterRejected, match="changed after validation"):
        reg.register(_lora("ad2", tiny_moe.lora_dir))
    stored = reg.runtime_path(reg.get("ad"))
    assert stored is not None and stored == reg.runtime_path(first) and stored.is_dir()


def test_a_file_removed_while_the_directory_is_walked_is_rejected(
    tmp_path: Path, tiny_moe: TinyMoe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DirEntry.stat raised a raw FileNotFoundError for a file deleted after the listing."""
    adapter = Path(shutil.copytree(tiny_moe.lora_dir, tmp_path / "adapter"))
    (adapter / "notes.md").write_text("x")
    base = validate_model_dir(tiny_moe.base_dir)
    real_scandir = fs_checks._scandir

    def list_then_delete(d: Path) -> list[os.DirEntry[str]]:
        items = real_scandir(d)
        (adapter / "notes.md").unlink(missing_ok=True)
        return items

    monkeypatch.setattr(fs_checks, "_scandir", list_then_delete)
    with pytest.raises(AdapterRejected, match=r"notes\.md: cannot examine"):
        validate_adapter_dir(adapter, base)


def test_a_model_path_through_a_symlinked_parent_is_stored_resolved(
    tmp_path: Path, tiny_moe: TinyMoe
) -> None:
    """The check ran on the resolved directory but the row kept the given path: repointing a
    symlink in it later sent the runtime to a directory outside model_root, never validated."""
    root, outside = tmp_path / "models", tmp_path / "outside"
    shutil.copytree(tiny_moe.base_dir, root / "m")
    outside.mkdir()
    os.symlink(root, outside / "link")
    reg = Registry(tmp_path / "home", HashEncoder(), limits=RegistryLimits(model_root=root))
    rec = reg.register({"kind": "model", "name": "m", "path": str(outside / "link" / "m")})
    (outside / "elsewhere" / "m").mkdir(parents=True)
    os.unlink(outside / "link")
    os.symlink(outside / "elsewhere", outside / "link")  # repointed after registration
    for r in (rec, reg.get("m")):
        path = reg.runtime_path(r)
        assert path is not None and path.resolve().is_relative_to(root.resolve())
        assert path == (root / "m").resolve()


def test_a_gate_trained_for_a_removed_expert_is_not_given_to_its_successor(
    tmp_path: Path, tiny_moe: TinyMoe
) -> None:
    """The gate of an expert removed and re-registered (same name, same adapter) while it
    trained was stored on the new row, though it was trained on the old row's examples."""
    started, release = threading.Event(), threading.Event()
    seen: list[list[tuple[str, str]]] = []

    def trainer(base: Path, adapter: Path, examples: Any, stop: Any) -> dict[str, np.ndarray]:
        seen.append(list(examples))
        started.set()
        assert release.wait(30)
        return {"m": np.full(2, float(len(seen)), dtype=np.float32)}

    reg = tiny_registry(tmp_path / "home", tiny_moe)
    reg.gate_trainer = trainer
    old = [{"prompt": "old prompt", "completion": "old"}]
    new = [{"prompt": "new prompt", "completion": "new"}]
    reg.register(_lora("ad", tiny_moe.lora_dir, train_examples=old))
    assert started.wait(30)
    reg.remove("ad")
    reg.register(_lora("ad", tiny_moe.lora_dir, train_examples=new))
    release.set()
    assert reg.wait_for_gates(timeout=30)
    assert seen[0] == [("old prompt", "old")] and seen[-1] == [("new prompt", "new")]
    assert reg.token_routing(reg.get("ad"), "phatgoose")["m"].tolist() == [2.0, 2.0]


def test_site_local_ipv6_is_private() -> None:
    """fec0::/10 (site-local, RFC 3879) is not globally reachable, but ipaddress calls it
    global: it passed `allow_private=False`."""
    url = "http://[fec0::1]:8000/v1"
    with pytest.raises(UnsafeURL, match="private or loopback"):
        validate_remote_url(url, allow_private=False)
    assert validate_remote_url(url) == url
