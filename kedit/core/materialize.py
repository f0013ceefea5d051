"""Recompute any tensor of any commit from stored deltas, and prove it by hash.

The value of a change is its source value with its steps applied (`kedit.core.delta.apply_step`);
every intermediate result is hashed and compared with what its commit recorded, so damage
is caught at the commit that has it. Two caches keep the cost proportional to what changed,
not to the length of history:
  - the working model (`kedit.core.worktree`): the tensors of the checked-out commit;
  - keyframes: a value is saved under `cache/` after every KEYFRAME_STEPS replayed steps.
Both are looked up by tensor hash and verified when read; deleting them loses nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kedit.core import history
from kedit.core.db import Database
from kedit.core.delta import Dense, LowRank, Replace, WeightDelta, apply_step
from kedit.core.errors import CorruptObjectError, HashMismatchError
from kedit.core.refs import short_id
from kedit.core.store import ObjectStore, read_safetensors, save_tensors_atomic
from kedit.core.tensors import hash_tensor

if TYPE_CHECKING:
    import torch

    CachedLookup = Callable[[str, str], torch.Tensor | None]  # (name, hash) -> value or None

KEYFRAME_STEPS = 16


DEFAULT_CACHE_BYTES = 2 * 1024**3


class TensorCache:
    """Materialised tensors by hash: disposable, verified on read, bounded in size.

    Entries come from keyframes and from the working model: a checkout links the value it
    replaces here (no copy), so going back and forth between two commits costs a
    read, not a replay. The oldest entries go once the total passes $KEDIT_CACHE_BYTES (2 GiB).
    """

    def __init__(self, root: Path, *, writable: bool = True) -> None:
        self.root = root
        self.writable = writable  # False in a read-only repository: misses are recomputed, never kept
        self.budget = int(os.environ.get("KEDIT_CACHE_BYTES", DEFAULT_CACHE_BYTES))

    def path(self, tensor_hash: str) -> Path:
        return self.root / tensor_hash[:2] / f"{tensor_hash[2:]}.st"

    def get(self, tensor_hash: str) -> torch.Tensor | None:
        path = self.path(tensor_hash)
        if not path.exists():
            return None
        try:
            (value,) = read_safetensors(path)[0].values()  # keyframes say "value", adopted shards their name
        except Exception:  # a damaged cache entry is only a miss
            self._drop(path)
            return None
        if hash_tensor(value) != tensor_hash:
            self._drop(path)
            return None
        return value

    def _drop(self, path: Path) -> None:
        if self.writable:
            path.unlink(missing_ok=True)

    def put(self, tensor_hash: str, value: torch.Tensor) -> None:
        path = self.path(tensor_hash)
        if path.exists() or not self.writable:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(path, {"value": value}, {}, tmp_dir=path.parent, durable=False)  # a cache
        self._evict()

    def adopt(self, tensor_hash: str, file: Path) -> None:
        """Link a single-tensor safetensors file holding `tensor_hash` into the cache.

        A hard link, not a move: the file stays in place until its owner replaces it (with a
        rename, so the cached inode is never written to), and a crash in between loses nothing.
        """
        path = self.path(tensor_hash)
        if path.exists() or not self.writable:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, path)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(file, path)
        self._evict()

    def _evict(self) -> None:
        sized = []
        for _, path in self.entries():
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                sized.append((st.st_mtime_ns, st.st_size, path))
        total = sum(size for _, size, _ in sized)
        for _, size, path in sorted(sized):
            if total <= self.budget:
                break
            path.unlink(missing_ok=True)
            total -= size

    def entries(self) -> list[tuple[str, Path]]:
        if not self.root.exists():
            return []
        return [(p.parent.name + p.name.split(".")[0], p) for p in self.root.glob("*/*.st")]


def load_step(store: ObjectStore, step: history.Step) -> WeightDelta:
    tensors, _ = store.get_tensors(step.object_id)
    try:
        if step.encoding == "lowrank":
            return LowRank(tensors["a"], tensors["b"])
        if step.encoding == "dense":
            return Dense(tensors["delta"])
        return Replace(tensors["value"])
    except KeyError as e:  # a damaged header can rename a tensor and still parse
        raise CorruptObjectError(step.object_id, f"no tensor {e} for a {step.encoding} delta") from e


class Materializer:
    def __init__(self, db: Database, store: ObjectStore, cache: TensorCache,
                 lookups: tuple[CachedLookup, ...] = ()) -> None:
        self.db = db
        self.store = store
        self.cache = cache
        self.lookups = lookups

    def _cached(self, name: str, tensor_hash: str) -> torch.Tensor | None:
        for lookup in self.lookups:
            value = lookup(name, tensor_hash)
            if value is not None:
                return value
        return self.cache.get(tensor_hash)

    def value(self, commit_id: str, name: str) -> torch.Tensor:
        """The tensor `name` as it is at `commit_id`, verified against the recorded hash."""
        change = history.defining_change(self.db, commit_id, name)
        if change is None:
            raise KeyError(f"no tensor named {name!r} at commit {short_id(commit_id)}")
        return self.value_of(change)

    def value_of(self, change: history.Change, *, use_cache: bool = True) -> torch.Tensor:
        """Replay the chain of changes behind `change`, starting from the nearest cached value."""
        pending: list[history.Change] = []
        current: history.Change | None = change
        value: torch.Tensor | None = None
        while current is not None:
            value = self._cached(current.name, current.result_hash) if use_cache else None
            if value is not None:
                break
            pending.append(current)
            if current.source_commit is None or any(s.encoding == "exact" for s in current.steps):
                break  # a replacement: the earlier value is not needed
            current = history.defining_change(self.db, current.source_commit, current.name)
        replayed = 0
        for ch in reversed(pending):
            steps = list(ch.steps)
            if value is None:  # start at the last replacement
                exact = [i for i, s in enumerate(steps) if s.encoding == "exact"]
                if not exact:
                    raise HashMismatchError(ch.name, ch.result_hash, "no-base-value", ch.commit_id)
                steps = steps[exact[-1]:]
            for step in steps:
                delta = load_step(self.store, step)
                value = delta.value if isinstance(delta, Replace) else apply_step(value, delta)
                replayed += 1
            assert value is not None, f"change {short_id(ch.commit_id)}:{ch.name} has no steps"
            actual = hash_tensor(value)
            if actual != ch.result_hash:
                raise HashMismatchError(ch.name, ch.result_hash, actual, ch.commit_id)
            if replayed >= KEYFRAME_STEPS:
                self.cache.put(ch.result_hash, value)
                replayed = 0
        assert value is not None
        return value
