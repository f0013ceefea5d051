"""Content-addressed object store: immutable files named by the hash of their content.

Layout under the repository directory:
    objects/ab/cdef….st    a safetensors file (tensors + string metadata)
    objects/ab/cdef….ref   a verified reference to a tensor in a file outside the repository
                           (`kedit init --no-copy`); JSON: path, tensor name, size, mtime, hash
    objects/ab/cdef….blob  raw bytes (config and tokenizer files)
    objects/tmp/           files being written

Calling sequence: `put_*` returns the object's id; `get_*` reads it back. An id is
xxh3_128 over the content (for tensors: over each tensor's own hash plus the metadata,
see `kedit.core.hashing`), so a reference and a copy of the same tensor share an id.

Error handling: writes go to objects/tmp, are fsynced and renamed into place, so a reader
never sees a partial object under its name and a killed writer leaves only a temp file.
A missing object raises ObjectMissingError; `verify` raises CorruptObjectError.

Caveats: objects are never overwritten (the first copy of identical content wins), and
nothing here knows which objects are still needed: that is `kedit gc`'s job.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from safetensors import SafetensorError, safe_open

from kedit.core.errors import CorruptObjectError, ExternalFileError, ObjectMissingError
from kedit.core.hashing import hash_bytes, tensors_object_id
from kedit.core.names import inside
from kedit.core.stwriter import TensorSpec, layout, write_stream, write_tensors
from kedit.core.tensors import hash_tensor, tensor_hasher

if TYPE_CHECKING:
    import torch

KINDS = ("st", "ref", "blob")


@dataclass(frozen=True)
class StoredObject:
    id: str
    size: int  # bytes on disk (0 for a reference)
    tensor_hashes: dict[str, str]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_replace(path: Path, write: Callable[[Path], None], tmp_dir: Path | None, durable: bool,
                    root: Path | None) -> None:
    """Write through a temp file and a rename, fsynced unless `durable` is off: caches that
    kedit can rebuild (the working model, keyframes) skip the fsync; the history never does.

    With `root`, `path` (relative to it, or absolute) must resolve inside it (`names.inside`):
    every destination built from a name that came from outside is written this way. Its
    parent folders are made, and so is `tmp_dir` (git and some copy tools drop empty folders)."""
    if tmp_dir is not None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
    if root is not None:
        path = inside(root, path)
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = (tmp_dir or path.parent) / f".tmp-{os.urandom(8).hex()}"  # secrets.token_hex's bytes; a cheaper import
    try:
        write(tmp)
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, tmp_dir: Path | None = None, *, durable: bool = True,
                       root: Path | None = None) -> None:
    _atomic_replace(path, lambda tmp: tmp.write_bytes(data) and None, tmp_dir, durable, root)


WRITE_PIECE = 1 << 16


class PieceWriter:
    """A file that takes writes of any size and hands them to the kernel 64 KB at a time.

    A single write of a whole tensor (tens or hundreds of MB) lets the page cache take large
    folios, which on a virtual machine that returns free memory to its host cost many times the
    kernel time of small ones: writing 3.6 GB of 90 MB tensors took 20 s of system time there,
    against 1.5 s in 64 KB pieces (bench/README.md, "Write size"). 64 KB is what `cp` moves at a
    time (`copy_file_range` splices through a pipe's buffer); elsewhere it costs nothing."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_PIECE):
            self._out.write(view[start:start + WRITE_PIECE])
        return len(view)

    def __getattr__(self, name: str) -> object:
        """Everything but `write` (name, flush, tell, fileno...) is the wrapped file's, so that a
        writer or a hook given this object may treat it as the file it is."""
        return getattr(self._out, name)


def _write_with(write: Callable[[BinaryIO], None]) -> Callable[[Path], None]:
    def run(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            write(PieceWriter(out))  # type: ignore[arg-type]  # it has all that the writers use
    return run


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                        tmp_dir: Path | None = None, *, durable: bool = True, root: Path | None = None) -> None:
    """Tensors in memory as one safetensors file, written from their own buffers (`stwriter`)."""
    _atomic_replace(path, _write_with(lambda out: write_tensors(out, tensors, metadata)), tmp_dir, durable, root)


def stream_tensors_atomic(path: Path, specs: list[TensorSpec], value_of: Callable[[str], torch.Tensor],
                          metadata: dict[str, str], tmp_dir: Path | None = None, *, durable: bool = True,
                          root: Path | None = None) -> None:
    """A safetensors file whose tensors are made one at a time by `value_of` while it is written:
    a shard of many tensors costs the memory of one."""
    _atomic_replace(path, _write_with(lambda out: write_stream(out, specs, value_of, metadata)), tmp_dir, durable,
                    root)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iter
    return tensors, metadata


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self._deferred: list[Path] | None = None

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Write many objects, then make them durable together before the caller records them.

        One fsync per file and one per folder at the end, instead of a folder fsync per object:
        `kedit init` writes hundreds of objects.
        """
        self._deferred = []
        try:
            yield
            for path in self._deferred:
                _fsync_file(path)
            for folder in {p.parent for p in self._deferred}:
                fsync_dir(folder)
        finally:
            self._deferred = None

    def _durable(self, path: Path) -> bool:
        if self._deferred is None:
            return True
        self._deferred.append(path)
        return False

    def create(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, object_id: str, kind: str) -> Path:
        return self.root / object_id[:2] / f"{object_id[2:]}.{kind}"

    def kind_of(self, object_id: str) -> str | None:
        for kind in KINDS:
            if self.path(object_id, kind).exists():
                return kind
        return None

    def has(self, object_id: str) -> bool:
        return self.kind_of(object_id) is not None

    # -- writing ---------------------------------------------------------------------------

    def _place(self, object_id: str, kind: str) -> Path | None:
        """The final path for a new object, or None when it is already stored."""
        path = self.path(object_id, kind)
        if path.exists():
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def put_tensors(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                    tensor_hashes: dict[str, str] | None = None) -> StoredObject:
        """Store tensors as one object. Pass `tensor_hashes` when they are already known."""
        metadata = dict(metadata or {})
        hashes = tensor_hashes or {name: hash_tensor(t) for name, t in tensors.items()}
        object_id = tensors_object_id(hashes, metadata)
        path = self._place(object_id, "st")
        if path is not None and not self.path(object_id, "ref").exists():
            save_tensors_atomic(path, tensors, metadata, tmp_dir=self.tmp, durable=self._durable(path),
                                root=self.root)
        stored = self.path(object_id, "st")
        return StoredObject(object_id, stored.stat().st_size if stored.exists() else 0, hashes)

    def put_streamed_tensor(self, dtype: str, shape: tuple[int, ...], read_into: Callable[[memoryview], int],
                            tensor_hash: str) -> StoredObject:
        """One tensor as the object `put_tensors({"value": t})` makes, written while `read_into`
        fills a 1 MB buffer (fewer bytes only at the end) and hashed on the way: it is moved into
        place only if all its bytes came and they hash to `tensor_hash`, else ValueError says
        which, and nothing is stored. Memory: the buffer, whatever the tensor's size."""
        spec = TensorSpec("value", dtype, shape)
        hashes = {"value": tensor_hash}
        object_id = tensors_object_id(hashes, {})
        head, _ = layout([spec], None)

        def copy(out: BinaryIO | None) -> None:
            digest = tensor_hasher(dtype, shape)
            if out is not None:
                out.write(head)
            view, left = memoryview(bytearray(min(spec.nbytes, 1 << 20))), spec.nbytes
            while left:
                n = read_into(view[:min(len(view), left)])
                if n == 0:
                    raise ValueError("is cut short")
                digest.update(view[:n])
                if out is not None:
                    out.write(view[:n])
                left -= n
            if digest.hexdigest() != tensor_hash:
                raise ValueError("does not match its hash")

        path = self._place(object_id, "st")
        if path is None or self.path(object_id, "ref").exists():
            copy(None)  # already stored: the bytes are still read (and checked)
        else:
            _atomic_replace(path, _write_with(copy), self.tmp, self._durable(path), self.root)
        stored = self.path(object_id, "st")
        return StoredObject(object_id, stored.stat().st_size if stored.exists() else 0, hashes)

    def put_reference(self, file: Path, tensor_name: str, tensor_hash: str) -> StoredObject:
        """Record a tensor inside an external safetensors file instead of copying it."""
        hashes = {"value": tensor_hash}
        object_id = tensors_object_id(hashes, {})
        stat = file.stat()
        record = {"path": str(file.resolve()), "tensor": tensor_name, "hash": tensor_hash,
                  "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        path = self._place(object_id, "ref")
        if path is not None and not self.path(object_id, "st").exists():
            atomic_write_bytes(path, json.dumps(record).encode(), tmp_dir=self.tmp, durable=self._durable(path),
                               root=self.root)
        return StoredObject(object_id, 0, hashes)

    def put_blob(self, data: bytes) -> StoredObject:
        object_id = hash_bytes(data)
        path = self._place(object_id, "blob")
        if path is not None:
            atomic_write_bytes(path, data, tmp_dir=self.tmp, durable=self._durable(path), root=self.root)
        return StoredObject(object_id, len(data), {})

    # -- reading ---------------------------------------------------------------------------

    def get_tensors(self, object_id: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The object's tensors and metadata. References are re-hashed on every read."""
        path = self.path(object_id, "st")
        if path.exists():
            try:
                return read_safetensors(path)
            except (SafetensorError, OSError, ValueError) as e:
                raise CorruptObjectError(object_id, f"unreadable safetensors file ({e})") from e
        ref = self.path(object_id, "ref")
        if ref.exists():
            return {"value": self._read_reference(object_id, ref)}, {}
        raise ObjectMissingError(object_id)

    def get_metadata(self, object_id: str) -> dict[str, str]:
        """A tensors object's metadata, from the safetensors header alone: no tensor is read, and
        torch is not needed (`kedit show` lists an adapter's config this way)."""
        if self.path(object_id, "ref").exists():
            return {}  # a reference names one tensor of a base file, without metadata
        path = self.path(object_id, "st")
        if not path.exists():
            raise ObjectMissingError(object_id)
        try:
            with open(path, "rb") as f:  # the format: a little-endian u64 length, then that much JSON
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            return dict(header.get("__metadata__") or {})
        except (OSError, ValueError, AttributeError, struct.error) as e:
            raise CorruptObjectError(object_id, f"unreadable safetensors header ({e})") from e

    def _read_reference(self, object_id: str, ref: Path) -> torch.Tensor:
        try:
            record = json.loads(ref.read_text())
        except (OSError, ValueError) as e:
            raise CorruptObjectError(object_id, f"unreadable reference ({e})") from e
        file = Path(record["path"])
        if not file.exists():
            raise ExternalFileError(
                f"the base file {file} has moved or been deleted (kedit init --no-copy keeps only a reference)",
                hint="put it back, or re-create the repository without --no-copy",
            )
        try:
            with safe_open(str(file), framework="pt") as f:
                tensor = f.get_tensor(record["tensor"])
        except (SafetensorError, OSError, KeyError) as e:
            raise ExternalFileError(f"the base file {file} cannot be read any more ({e})") from e
        if hash_tensor(tensor) != record["hash"]:
            raise ExternalFileError(
                f"the base file {file} has changed since 'kedit init' (tensor {record['tensor']} differs)",
                hint="restore the original file, or re-create the repository without --no-copy",
            )
        return tensor

    def get_blob(self, object_id: str) -> bytes:
        path = self.path(object_id, "blob")
        if not path.exists():
            raise ObjectMissingError(object_id)
        return path.read_bytes()

    def size(self, object_id: str) -> int:
        kind = self.kind_of(object_id)
        return 0 if kind in (None, "ref") else self.path(object_id, kind).stat().st_size

    # -- maintenance -----------------------------------------------------------------------

    def iter_objects(self) -> Iterator[tuple[str, str, Path]]:
        """(id, kind, path) of every stored object."""
        if not self.root.exists():
            return
        for sub in sorted(self.root.iterdir()):
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for file in sorted(sub.iterdir()):
                stem, _, kind = file.name.partition(".")
                if kind in KINDS:
                    yield sub.name + stem, kind, file

    def verify(self, object_id: str) -> None:
        """Re-hash the object against its id; raise CorruptObjectError on any difference."""
        kind = self.kind_of(object_id)
        if kind is None:
            raise ObjectMissingError(object_id)
        if kind == "blob":
            if hash_bytes(self.get_blob(object_id)) != object_id:
                raise CorruptObjectError(object_id, "content does not match its id")
            return
        tensors, metadata = self.get_tensors(object_id)
        hashes = {name: hash_tensor(t) for name, t in tensors.items()}
        if tensors_object_id(hashes, metadata) != object_id:
            raise CorruptObjectError(object_id, "content does not match its id")

    def delete(self, object_id: str) -> int:
        """Remove an object; returns the bytes freed."""
        freed = 0
        for kind in KINDS:
            path = self.path(object_id, kind)
            with contextlib.suppress(FileNotFoundError):
                freed += path.stat().st_size
                path.unlink()
        return freed

    def clean_tmp(self, older_than_s: float, now: float) -> int:
        removed = 0
        if self.tmp.exists():
            for file in self.tmp.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if now - file.stat().st_mtime > older_than_s:
                        file.unlink()
                        removed += 1
        return removed
