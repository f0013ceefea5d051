"""Values derived from a tensor, kept while that tensor is unchanged: an explicit cache object.

ROME solves with the Cholesky factor of its statistics C (O(d³) once, then O(d²) per edit) and
AlphaEdit projects with the null space of C (an eigendecomposition). Both are worth keeping across
the edits that use the same C, and both used to be kept in module-level dictionaries: state that
outlived the call, was shared by every caller in the process, and was invisible in the signature.

A `TensorCache` is made by whoever owns the edits: a method's `apply` makes one per call (so the
requests of one call share a factor) unless the caller passes its own, to share it across calls
(a session that edits many times with the same C in memory). Not `functools.lru_cache`: a tensor
hashes by identity, not by content, and the cache would hold C alive and miss in-place changes.
Here an entry holds only a weak reference to its tensor and its in-place version, so a C that is
freed, replaced or modified in place is never matched.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

__all__ = ["TensorCache"]

T = TypeVar("T")


class TensorCache:
    """`get(key, tensor, compute)`: compute(tensor) once per key while `tensor` is the same object
    at the same in-place version; a different tensor under the key replaces the entry."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[weakref.ref[torch.Tensor], int, Any]] = {}

    def get(self, key: Hashable, tensor: torch.Tensor, compute: Callable[[torch.Tensor], T]) -> T:
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
            return hit[2]
        value = compute(tensor)  # an exception leaves the entry as it was
        self._entries[key] = (weakref.ref(tensor), tensor._version, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)
