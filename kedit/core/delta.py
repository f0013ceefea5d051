"""Weight deltas: what a method hands the engine, and the one canonical arithmetic that applies them.

Methods return deltas; the repository stores them and replays them. Floating point makes
(W + d) - d != W, so the engine never subtracts: every tensor of every commit is recomputed
from the base along its history with `apply_step`, whose arithmetic is fixed (float32
accumulation, elementwise only, one rounding to the tensor's dtype at the end). Elementwise
IEEE operations give the same bits on every CPU and thread count, which is what makes the
hashes recorded at commit time reproducible.

Caveats: a low-rank product is summed rank by rank (`torch.outer`, then an in-place add), never
with a matrix multiply, whose reduction order depends on the BLAS kernel, nor with `addr`, which
may fuse the multiply and the add. Accumulation is in float32 (float64 for float64 tensors): a
product of two float32 factors rounded once to float32 is far below the final rounding to a
16-bit dtype, and float32 keeps checkout at memory speed.

torch is imported by the functions that compute, when one is first called: the types alone
are what the history-reading commands import (see `kedit/core/tensors.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kedit.core.errors import DeltaError

if TYPE_CHECKING:
    import torch

# Rows per block when applying a delta: bounds the float64 working set to ~ROW_BLOCK x columns.
ROW_BLOCK = 4096


@dataclass(frozen=True)
class LowRank:
    """delta = a @ b, in the tensor's stored layout: a is (rows, r), b is (r, cols)."""

    a: torch.Tensor
    b: torch.Tensor

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[1] != self.b.shape[0]:
            raise ValueError(
                f"low-rank factors must be (rows, r) and (r, cols), got {tuple(self.a.shape)} "
                f"and {tuple(self.b.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[0], self.b.shape[1])

    @property
    def rank(self) -> int:
        return self.a.shape[1]


@dataclass(frozen=True)
class Dense:
    """delta added elementwise to the tensor."""

    delta: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)


@dataclass(frozen=True)
class Replace:
    """The tensor's new value, exactly."""

    value: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)


WeightDelta = LowRank | Dense | Replace


@dataclass(frozen=True)
class Adapter:
    """An opaque object for methods that leave the weights alone (e.g. GRACE's codebook).

    `kind` names the loader that knows how to put it into a model; `config` must be
    JSON-serialisable. The engine stores, versions and reverts adapters without reading them.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    import torch  # on first use: see the module docstring

    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_step(value: torch.Tensor, step: WeightDelta) -> torch.Tensor:
    """Return `value` changed by `step`, in `value`'s dtype, with the canonical arithmetic."""
    import torch  # on first use: see the module docstring

    if isinstance(step, Replace):
        if tuple(step.value.shape) != tuple(value.shape):
            raise ValueError(f"replacement shape {tuple(step.value.shape)} != {tuple(value.shape)}")
        return step.value.detach().to(device="cpu", dtype=value.dtype).contiguous()
    if tuple(step.shape) != tuple(value.shape):
        raise ValueError(f"delta shape {tuple(step.shape)} does not match tensor shape {tuple(value.shape)}")
    acc = accumulation_dtype(value.dtype)
    out = torch.empty_like(value, device="cpu")
    flat_out = out.view(value.shape[0], -1) if value.dim() > 1 else out.view(1, -1)
    flat_in = value.detach().cpu().reshape(flat_out.shape)
    if isinstance(step, Dense):
        flat_delta = step.delta.detach().cpu().reshape(flat_out.shape)
    a = step.a.detach().to(device="cpu", dtype=acc) if isinstance(step, LowRank) else None
    b = step.b.detach().to(device="cpu", dtype=acc) if isinstance(step, LowRank) else None
    for start in range(0, flat_out.shape[0], ROW_BLOCK):
        stop = min(start + ROW_BLOCK, flat_out.shape[0])
        block = flat_in[start:stop].to(acc, copy=True)
        if a is not None and b is not None:
            for r in range(a.shape[1]):  # rank by rank, fixed order: see the module docstring
                block.add_(torch.outer(a[start:stop, r], b[r]))
        else:
            block.add_(flat_delta[start:stop].to(acc))
        flat_out[start:stop] = block.to(value.dtype)
    return out


def delta_size_bytes(step: WeightDelta) -> int:
    """Bytes the step takes as stored tensors (payload only)."""
    if isinstance(step, LowRank):
        return step.a.numel() * 4 + step.b.numel() * 4
    if isinstance(step, Dense):
        return step.delta.numel() * 4
    return step.value.numel() * step.value.element_size()


def encode_delta(delta: WeightDelta, before: torch.Tensor) -> tuple[WeightDelta, str]:
    """Normalise a delta for storage and pick its encoding.

    Low-rank factors are kept as float32 while they are smaller than a dense delta. A dense
    delta is stored in the tensor's own dtype: it is then exactly what is applied, and its
    rounding error (relative to the delta) is far below the rounding of the result itself.
    Replacements are stored as exact bytes. Deltas, not results, are what a revert replays.
    """
    import torch  # on first use: see the module docstring

    if isinstance(delta, LowRank):
        step = LowRank(delta.a.detach().cpu().to(torch.float32).contiguous(),
                       delta.b.detach().cpu().to(torch.float32).contiguous())
        dense_bytes = before.numel() * before.element_size()
        if delta_size_bytes(step) < dense_bytes:
            return step, "lowrank"
        product = (step.a.to(torch.float64) @ step.b.to(torch.float64)).to(before.dtype)
        return Dense(product.contiguous()), "dense"
    if isinstance(delta, Dense):
        return Dense(delta.delta.detach().cpu().to(before.dtype).contiguous()), "dense"
    if isinstance(delta, Replace):
        return Replace(delta.value.detach().cpu().to(before.dtype).contiguous()), "exact"
    raise DeltaError(f"unsupported delta type {type(delta).__name__}")


def change_size(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float | None]:
    """How far `after` is from `before`: the norm of the difference (in float64) and that norm
    relative to `before`'s (None when `before` is zero)."""
    import torch  # on first use: see the module docstring

    norm = float((after.to(torch.float64) - before.to(torch.float64)).norm())
    base_norm = float(before.to(torch.float64).norm())
    return norm, norm / base_norm if base_norm else None
