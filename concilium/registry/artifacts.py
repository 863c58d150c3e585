"""Content-addressed artifact store: adapter files and routing arrays, named by their sha256.

Layout under the store root::

    <sha256>/                 a directory artifact (a validated copy of an adapter)
    <sha256>.safetensors      an array artifact (pilot / description embeddings, prototypes)

Writes go to a temporary name and are renamed into place, so a crash never leaves a half artifact
under a content name; the same content written twice is stored once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from concilium.errors import RegistryError
from concilium.registry.safetensors_check import open_regular

_CHUNK = 1 << 20


def _copy_regular(src: Path, dest: Path, label: str) -> str:
    """Copy one regular file (no symlink followed, no FIFO opened for long); returns the sha256
    of the bytes copied."""
    h = hashlib.sha256()
    try:
        with open_regular(src, label) as f, dest.open("xb") as out:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
    except OSError as e:
        raise RegistryError(f"cannot copy {label} into the artifact store: {e}") from e
    return h.hexdigest()


def artifacts_at(home: Path) -> ArtifactStore:
    """The registry's artifact store inside data dir `home`."""
    return ArtifactStore(Path(home) / "artifacts")


class ArtifactStore:
    """Immutable blobs keyed by content hash."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, ref: str) -> Path:
        """Filesystem path of an artifact; the ref must be one this store produced."""
        name = ref.removesuffix(".safetensors")
        if len(name) != 64 or any(c not in "0123456789abcdef" for c in name):
            raise RegistryError(f"malformed artifact ref {ref!r}")
        p = self.root / ref
        if not p.exists():
            raise RegistryError(f"artifact {ref} is missing from {self.root}")
        return p

    def put_files(self, files: Mapping[str, Path]) -> str:
        """Copy named files into one directory artifact; returns its ref (the digest).

        The digest is of the bytes copied, so a source changed meanwhile cannot land under
        another content's name; a source that is (by now) a symlink, FIFO or device is refused
        (AdapterRejected) and nothing is left behind.
        """
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            h = hashlib.sha256()
            for name in sorted(files):
                h.update(f"{name}\0{_copy_regular(files[name], tmp / name, name)}\0".encode())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ref = h.hexdigest()
        dest = self.root / ref
        try:
            if dest.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                os.utime(dest)  # reused: fresh again, so a concurrent gc leaves it alone
                return ref
            os.replace(tmp, dest)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if dest.is_dir():  # a concurrent writer stored the same content first
                return ref
            raise RegistryError(f"cannot store artifact {ref}: {e}") from e
        return ref

    def put_arrays(self, arrays: Mapping[str, np.ndarray]) -> str:
        """Store named float arrays as one safetensors artifact; returns its ref."""
        from safetensors.numpy import save

        blob = save({k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())})
        ref = hashlib.sha256(blob).hexdigest() + ".safetensors"
        dest = self.root / ref
        if dest.exists():
            os.utime(dest)  # reused: fresh again, so a concurrent gc leaves it alone
        else:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, dest)
        return ref

    def discard(self, ref: str) -> None:
        """Remove one artifact (a copy that failed its post-copy validation)."""
        p = self.path(ref)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def load_arrays(self, ref: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.path(ref)))

    def gc(self, referenced: Iterable[str], grace_s: float = 600.0) -> list[str]:
        """Delete artifacts not in `referenced` (and stale temporaries); returns the removed.

        Entries written or reused within the last `grace_s` seconds are kept: a registration or a
        gate training stores its artifact before the row that refers to it, and a concurrent gc
        must not delete it in between.
        """
        keep = set(referenced)
        cutoff = time.time() - grace_s
        removed = []
        for p in self.root.iterdir():
            if p.name in keep:
                continue
            try:
                if p.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
        return removed
