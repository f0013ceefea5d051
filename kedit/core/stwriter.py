"""safetensors files written one tensor at a time: writing a model holds one tensor, never the model.

safetensors' own writer (`safetensors.torch.save_file`) takes every tensor at once and copies each
to `bytes` before writing, so a 5 GB shard costs 5 GB of memory. The format is simple enough to
write in a stream: a little-endian u64 header length; a JSON header (`__metadata__` first, then
each tensor's dtype, shape and data_offsets, in data order) padded with spaces to a multiple of 8;
then the tensors' bytes back to back. The header needs only the names, dtypes and shapes, so it is
written first and each value is asked for, written from its own buffer and dropped in turn.

The order is safetensors' own (by dtype, widest first, then by name), so a file written here is
byte for byte what `save_file` writes for the same tensors; `safe_open` reads it
(tests/test_streaming.py checks both).

`StreamReader` is the same bytes as a seekable file object that is never on disk: an upload
reads it once for its sha256 and once more to send it, each time asking for one tensor at a
time, so a push writes nothing locally.
"""

from __future__ import annotations

import bisect
import io
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from kedit.core.tensors import DTYPE_SIZES, dtype_name, tensor_bytes

if TYPE_CHECKING:
    import torch

# safetensors sorts by its Dtype enum, largest first: this is that enum's order, reversed.
_DTYPE_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")


@dataclass(frozen=True)
class TensorSpec:
    """What the header says of a tensor before its value exists."""

    name: str
    dtype: str  # safetensors' spelling: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for dim in self.shape:
            n *= dim
        return n


def spec_of(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, dtype_name(t.dtype), tuple(t.shape))


def layout(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None) -> tuple[bytes, list[TensorSpec]]:
    """The file's first bytes (length and padded header) and the tensors in the order they follow."""
    ordered = sorted(specs, key=lambda s: (_DTYPE_ORDER.index(s.dtype), s.name))
    if len({s.name for s in ordered}) != len(ordered):
        raise ValueError("a safetensors file cannot hold two tensors of the same name")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in ordered:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


def write_stream(out: BinaryIO, specs: Iterable[TensorSpec], value_of: Callable[[str], torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file to `out`, asking `value_of(name)` for one tensor at a time.

    A value whose dtype or shape differs from its spec raises ValueError: the header already
    promised those bytes."""
    head, ordered = layout(specs, metadata)
    out.write(head)
    for s in ordered:
        value = value_of(s.name)
        if spec_of(s.name, value) != s:
            raise ValueError(f"{s.name}: expected {s.dtype}{list(s.shape)}, "
                             f"got {dtype_name(value.dtype)}{list(value.shape)}")
        out.write(tensor_bytes(value))
        del value


def write_tensors(out: BinaryIO, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> None:
    """Tensors already in memory, written from their own buffers (no copy to `bytes`)."""
    write_stream(out, [spec_of(n, t) for n, t in tensors.items()], tensors.__getitem__, metadata)


class StreamReader(io.BufferedIOBase):
    """The bytes `write_stream` would write, read (and sought) like a file that is never on disk.

    A read asks `value_of` for the tensor under the position and keeps it until a read goes past
    its end, so reading front to back holds one tensor; a seek backwards asks again. `size` is
    known from the header alone. A value whose dtype or shape differs from its spec raises
    ValueError, as in `write_stream`.
    """

    def __init__(self, specs: Iterable[TensorSpec], value_of: Callable[[str], torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._head, self._ordered = layout(specs, metadata)
        self._value_of = value_of
        self._starts = [len(self._head)]  # where each tensor begins; the last entry is the size
        for s in self._ordered:
            self._starts.append(self._starts[-1] + s.nbytes)
        self.size = self._starts[-1]
        self._pos = 0
        self._held: tuple[int, memoryview] | None = None  # (tensor index, its bytes)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def _bytes_of(self, i: int) -> memoryview:
        if self._held is None or self._held[0] != i:
            self._held = None
            s = self._ordered[i]
            value = self._value_of(s.name)
            if spec_of(s.name, value) != s:
                raise ValueError(f"{s.name}: expected {s.dtype}{list(s.shape)}, "
                                 f"got {dtype_name(value.dtype)}{list(value.shape)}")
            self._held = (i, tensor_bytes(value))
        return self._held[1]

    def _pieces(self, size: int) -> Iterator[memoryview]:
        """Views of the next `size` bytes (fewer at the end), moving the position past them."""
        while size > 0 and self._pos < self.size:
            if self._pos < len(self._head):
                piece = memoryview(self._head)[self._pos:]
            else:
                i = bisect.bisect_right(self._starts, self._pos) - 1
                piece = self._bytes_of(i)[self._pos - self._starts[i]:]
            n = min(len(piece), size)
            yield piece[:n]
            size -= n
            self._pos += n
            if n == len(piece) and self._pos > len(self._head):
                self._held = None  # read to its end: let it go

    def readinto(self, buffer) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        done = 0
        for piece in self._pieces(len(out)):
            out[done:done + len(piece)] = piece
            done += len(piece)
        return done

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.size
        return b"".join(self._pieces(size))  # one copy, from the tensor's own buffer

    read1 = read

    def close(self) -> None:
        self._held = None
        super().close()
