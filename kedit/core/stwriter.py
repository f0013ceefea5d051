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
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
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
