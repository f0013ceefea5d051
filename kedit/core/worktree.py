"""The working model: the checked-out commit as a folder `from_pretrained` can load.

Each tensor is its own safetensors shard, listed in `model.safetensors.index.json`, so a
checkout rewrites only the tensors that differ between two commits. An index file
(`worktree.json`, beside the folder) records each shard's hash and stat (size, mtime, inode),
as git's index does: a shard whose stat is unchanged is trusted without reading it, and one
whose stat changed is re-hashed.

Calling sequence: `update(commit, manifest, files, value_of)` brings the folder to a commit;
`modified()` lists tensors changed by hand. Crash safety: before touching shards, `update`
records the hashes it is about to write as pending, so after a crash a shard holding its
pending value is recognised as kedit's own write, not a user's change.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kedit.core.history import ManifestEntry
from kedit.core.names import check_file_set, check_tensor_name
from kedit.core.store import atomic_write_bytes, read_safetensors, save_tensors_atomic
from kedit.core.tensors import hash_tensor

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"


def shard_name(tensor_name: str) -> str:
    return f"{tensor_name}.safetensors"


class Worktree:
    def __init__(self, folder: Path, index_path: Path) -> None:
        self.folder = folder
        self.index_path = index_path
        self._cached: tuple[tuple[int, int, int], dict] | None = None
        self._prefix = str(folder) + os.sep

    # -- index -----------------------------------------------------------------------------

    def read_index(self) -> dict:
        """The index, parsed once per change of the file. Read-only: `update` parses its own copy."""
        try:
            stat = os.stat(self.index_path)
        except FileNotFoundError:
            return {"commit": None, "tensors": {}, "files": [], "pending": {}}
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, json.loads(self.index_path.read_text()))
        return self._cached[1]

    def _write_index(self, index: dict) -> None:
        # The working model is a cache of the history, rebuilt and re-hashed at will: no fsync.
        atomic_write_bytes(self.index_path, json.dumps(index, sort_keys=True).encode(), durable=False)
        self._cached = None

    @property
    def commit(self) -> str | None:
        return self.read_index().get("commit")

    def _stat(self, tensor_name: str) -> list[int] | None:
        try:
            st = os.stat(self._prefix + shard_name(tensor_name))  # hot: called per tensor per checkout
        except FileNotFoundError:
            return None
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def _load_shard(self, tensor_name: str) -> torch.Tensor | None:
        try:
            return read_safetensors(self.folder / shard_name(tensor_name))[0][tensor_name]
        except Exception:  # unreadable or missing: treated as modified
            return None

    def current_hash(self, tensor_name: str, entry: dict | None) -> str | None:
        """The shard's hash: from the index when its stat is unchanged, else by reading it."""
        stat = self._stat(tensor_name)
        if stat is None:
            return None
        if entry is not None and entry.get("stat") == stat:
            return entry["hash"]
        value = self._load_shard(tensor_name)
        return hash_tensor(value) if value is not None else "unreadable"

    def hash_on_disk(self, tensor_name: str) -> str | None:
        """The shard's hash from its bytes, whatever its stat says (fsck does not trust the stat)."""
        if self._stat(tensor_name) is None:
            return None
        value = self._load_shard(tensor_name)
        return hash_tensor(value) if value is not None else "unreadable"

    def lookup(self, tensor_name: str, tensor_hash: str) -> torch.Tensor | None:
        """The shard's value if it holds exactly `tensor_hash` (a cache for materialisation)."""
        entry = self.read_index()["tensors"].get(tensor_name)
        if entry is None or entry["hash"] != tensor_hash or entry.get("stat") != self._stat(tensor_name):
            return None
        value = self._load_shard(tensor_name)
        return value if value is not None and hash_tensor(value) == tensor_hash else None

    # -- queries ---------------------------------------------------------------------------

    def modified(self) -> dict[str, str]:
        """Tensors whose shard differs from the index: name -> 'modified' | 'deleted'."""
        index = self.read_index()
        found: dict[str, str] = {}
        for name, entry in index["tensors"].items():
            actual = self.current_hash(name, entry)
            pending = index.get("pending", {}).get(name)
            if actual is None:
                found[name] = "deleted"
            elif actual not in (entry["hash"], pending):
                found[name] = "modified"
        return found

    # -- writing ---------------------------------------------------------------------------

    def update(self, commit_id: str, manifest: dict[str, ManifestEntry], files: dict[str, bytes | None],
               value_of: Callable[[str], torch.Tensor], known_values: dict[str, torch.Tensor] | None = None,
               keep: Callable[[str, Path], None] | None = None) -> list[str]:
        """Bring the folder to `commit_id`, writing only differing shards. Returns those written.

        `keep(hash, path)` may take a shard about to be replaced (to cache it). `files` maps
        config/tokenizer paths to their bytes (None: unchanged, keep the file); a file the folder
        had that `files` does not name is removed.
        """
        for name in manifest:  # names from the history: checked again where they become file names
            check_tensor_name(name)
        check_file_set(files)
        self.folder.mkdir(parents=True, exist_ok=True)
        # from an update killed mid-write (we hold the lock): ours are .tmp-<hex>, and safetensors' own
        # writer (the Rust tempfile crate) leaves .tmpXXXXXX beside the file it was writing
        for leftover in self.folder.glob(".tmp*"):
            leftover.unlink(missing_ok=True)
        index = json.loads(self.index_path.read_text()) if self.index_path.exists() else copy.deepcopy(
            self.read_index())  # a private, mutable copy
        entries: dict[str, dict] = index["tensors"]
        names_before = set(entries)
        stale = []
        for name, m in manifest.items():
            entry = entries.get(name)
            if self.current_hash(name, entry) != m.hash:
                stale.append(name)
            elif entry is None or entry["hash"] != m.hash or entry.get("stat") != self._stat(name):
                # It already holds the value (an interrupted update wrote it): adopt it in the index.
                entries[name] = {"hash": m.hash, "stat": self._stat(name)}
        removed = [name for name in entries if name not in manifest]
        index["pending"] = {name: manifest[name].hash for name in stale}
        self._write_index(index)
        for name in stale:
            value = (known_values or {}).get(name)
            if value is None:
                value = value_of(name)
            old = entries.get(name)
            if keep is not None and old is not None and old.get("stat") == self._stat(name):
                keep(old["hash"], self.folder / shard_name(name))  # the replaced value, for the way back
            save_tensors_atomic(shard_name(name), {name: value}, {"format": "pt"}, durable=False, root=self.folder)
            entries[name] = {"hash": manifest[name].hash, "stat": self._stat(name)}
        for name in removed:
            (self.folder / shard_name(name)).unlink(missing_ok=True)
            del entries[name]
        for path, data in files.items():
            if data is not None:
                atomic_write_bytes(path, data, durable=False, root=self.folder)
        for path in sorted(set(index.get("files", [])) - set(files)):  # a file the commit (another base) lacks
            check_file_set({path: None})
            (self.folder / path).unlink(missing_ok=True)
        if set(manifest) != names_before or not (self.folder / INDEX_FILE).exists():
            self._write_weight_map(manifest)
        index.update(commit=commit_id, tensors=entries, pending={})
        index["files"] = sorted(files)
        self._write_index(index)
        return stale

    def restore(self, values: dict[str, tuple[str, torch.Tensor]], files: dict[str, bytes]) -> None:
        """Rewrite damaged shards (name -> (hash, value verified by the caller)) and files, in place.

        Unlike `update`, nothing else is touched: shards with hand-made changes stay as they are.
        """
        index = json.loads(self.index_path.read_text())
        for name, (tensor_hash, value) in values.items():
            save_tensors_atomic(self.folder / shard_name(name), {name: value}, {"format": "pt"}, durable=False)
            index["tensors"][name] = {"hash": tensor_hash, "stat": self._stat(name)}
        for path, data in files.items():
            target = self.folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data, durable=False)
        self._write_index(index)

    def _write_weight_map(self, manifest: dict[str, ManifestEntry]) -> None:
        total = sum(m.nbytes for m in manifest.values())
        weight_map = {name: shard_name(name) for name in sorted(manifest)}
        body = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_bytes(self.folder / INDEX_FILE, json.dumps(body, indent=2).encode(), durable=False)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.index_path.exists():
            os.unlink(self.index_path)

