"""Tensor values as the engine keeps them: dtype names, byte view and hash; finiteness; JSON.

A tensor's hash is xxh3_128 over a header ('dtype|shape|') and its little-endian bytes
(`kedit.core.hashing` hashes bytes and records).

The engine's classes that keep files of tensors (the object store, the working model, the
tensor cache) import this module; torch (1.5 s to import) is imported by the functions below
when one is first called, so the commands that only read the history (log, show, status,
branch) never load it. `kedit/core/delta.py` does the same for the delta arithmetic, and
`kedit.core.store.save_tensors_atomic` for safetensors' writer.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import xxhash

from kedit.core.errors import DeltaError

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("kedit hashes tensors' little-endian bytes and needs a little-endian machine")


DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@functools.cache
def _dtype_names() -> dict[torch.dtype, str]:
    import torch  # on first use: see the module docstring

    return {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
    }


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors spelling of a dtype (F32, BF16, ...)."""
    try:
        return _dtype_names()[dtype]
    except KeyError:
        raise ValueError(f"kedit cannot store tensors of dtype {dtype}") from None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    import torch  # on first use: see the module docstring

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def tensor_hasher(dtype: str, shape: tuple[int, ...]) -> xxhash.xxh3_128:
    """The hash of a tensor of `dtype` (a safetensors name) and `shape`, waiting for its raw bytes:
    fed piece by piece, it gives `hash_tensor` of the whole tensor (a download hashed as it arrives)."""
    h = xxhash.xxh3_128()
    h.update(f"{dtype}|{','.join(map(str, shape))}|".encode())
    return h


def hash_tensor(t: torch.Tensor) -> str:
    """The tensor's id: xxh3_128 of 'dtype|shape|' followed by its raw bytes, as 32 hex digits."""
    h = tensor_hasher(dtype_name(t.dtype), tuple(t.shape))
    h.update(tensor_bytes(t))
    return h.hexdigest()


def finite(t: torch.Tensor) -> bool:
    """False when a floating-point tensor holds NaN or inf."""
    import torch  # on first use: see the module docstring

    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def require_finite(tensors: Mapping[str, Any], what: str) -> None:
    """Refuse NaN or infinite values before anything is stored: such weights load without a word and
    answer garbage (a GRACE codebook of NaN gives NaN logits). `what` names the owner in the message."""
    import torch  # on first use: see the module docstring

    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and not finite(tensor):
            raise DeltaError(f"{what} holds non-finite values (NaN or inf) in {name!r}; nothing was committed")


def jsonable(value: Any) -> Any:
    """Make method diagnostics JSON-safe: tensors become lists or floats, unknowns strings."""
    import torch  # on first use: see the module docstring

    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)
