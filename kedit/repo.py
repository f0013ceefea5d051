"""The repository: a base checkpoint and the history of edits made to it.

Calling sequence:
    repo = Repository.init(path, "path/to/model")      # or Repository.open(path)
    info = repo.commit({"model.layers.5.mlp.down_proj.weight": LowRank(a, b)}, message=...)
    state = repo.materialize("HEAD~1")                   # {name: tensor}, verified by hash
    repo.revert(info.id); repo.checkout("main"); repo.log()

Error handling: every write takes the writer lock (`.kedit/LOCK`, an fcntl lock the OS
releases if the process dies), writes objects first, then records the commit and moves the
ref in one SQLite transaction with a compare-and-swap on the ref. A crash at any point leaves
either the old state or the new one, plus at most some unreferenced objects for `kedit gc`.

Caveats: history is first-parent only (no merges yet). The working model under
`.kedit/worktree` follows HEAD; commands that write bring it up to date first.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

import kedit
from kedit import db as dbm
from kedit import history
from kedit.db import DB_FILE, REPO_DIR, find_repository
from kedit.delta import Adapter, Dense, LowRank, Replace, WeightDelta, apply_step, delta_size_bytes
from kedit.errors import (
    DeltaError,
    KeditError,
    LockedError,
    RepositoryExistsError,
    RevisionError,
    WorktreeDirtyError,
)
from kedit.hashing import canonical_json, dtype_name, hash_tensor, record_id
from kedit.materialize import Materializer, TensorCache, load_step
from kedit.progress import progress_bar
from kedit.refs import BRANCH_PREFIX, DEFAULT_BRANCH, HEAD, TAG_PREFIX, Refs, check_ref_name, now_iso
from kedit.sources import open_source
from kedit.store import ObjectStore, read_safetensors
from kedit.worktree import Worktree

LOCK_FILE = "LOCK"
DEFAULT_LOCK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    protocol: str
    stage: str = "post"  # pre | post | eval
    suite: str = ""
    source: str = field(default="", compare=False)  # the remote it was fetched from; '' = measured here


@dataclass
class CommitInfo:
    id: str
    parent: str | None
    depth: int
    kind: str
    method: str | None
    hparams: dict[str, Any]
    requests: list[dict[str, Any]]
    info: dict[str, Any]
    message: str
    author: str
    created: str
    metrics: list[Metric] = field(default_factory=list)

    @property
    def short(self) -> str:
        return self.id[:12]


def _jsonable(value: Any) -> Any:
    """Make method diagnostics JSON-safe: tensors become lists or floats, unknowns strings."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def _author() -> str:
    if os.environ.get("KEDIT_AUTHOR"):
        return os.environ["KEDIT_AUTHOR"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class Repository:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = dbm.connect(path / DB_FILE)
        self.store = ObjectStore(path / "objects")
        self.cache = TensorCache(path / "cache")
        self.refs = Refs(self.db)
        self.worktree: Worktree | None = None
        if self.config.get("worktree", "1") == "1":
            self.worktree = Worktree(path / "worktree", path / "worktree.json")
        lookups = (self.worktree.lookup,) if self.worktree else ()
        self.materializer = Materializer(self.db, self.store, self.cache, lookups)

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, where: str | Path | None = None) -> Repository:
        """Open the repository at `where` (or $KEDIT_DIR, or the current directory and its parents)."""
        where = where or os.environ.get("KEDIT_DIR") or Path.cwd()
        return cls(find_repository(Path(where)))

    @classmethod
    def init(cls, where: str | Path | None, source: str | None = None, *, copy: bool = True,
             worktree: bool = True, dtype: torch.dtype | None = None, progress: bool = True,
             message: str | None = None) -> Repository:
        """Create a repository at `where`/.kedit holding `source` (default: the embedded SmolLM2)."""
        where = Path(where or os.environ.get("KEDIT_DIR") or Path.cwd())
        path = where if where.name == REPO_DIR else where / REPO_DIR
        if (path / DB_FILE).exists():
            raise RepositoryExistsError(f"a kedit repository already exists at {path}")
        with open_source(source) as src:
            if not copy and not src.can_reference:
                raise KeditError("--no-copy needs safetensors weights; a GGUF file is dequantised at init "
                                 "and its tensors must be stored")
            path.mkdir(parents=True, exist_ok=True)
            try:
                repo = cls._create(path, worktree)
                with repo.lock():
                    repo._commit_base(src, copy=copy, dtype=dtype, progress=progress, message=message)
            except BaseException:
                # Nothing refers to a half-made repository: remove it so init can be re-run.
                import shutil

                shutil.rmtree(path, ignore_errors=True)
                raise
        return repo

    @classmethod
    def _create(cls, path: Path, worktree: bool) -> Repository:
        db = dbm.connect(path / DB_FILE, create=True)
        with dbm.write(db):
            db["meta"].insert_all([{"key": "worktree", "value": "1" if worktree else "0"},
                                   {"key": "created_by", "value": f"kedit {kedit.__version__}"}])
        db.conn.close()
        ObjectStore(path / "objects").create()
        return cls(path)

    @property
    def config(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.db.execute("SELECT key, value FROM meta")}

    @property
    def root(self) -> Path:
        """The directory that holds `.kedit`."""
        return self.path.parent

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the writer lock; wait up to `timeout` s ($KEDIT_LOCK_TIMEOUT) for another writer."""
        if timeout is None:
            timeout = float(os.environ.get("KEDIT_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S))
        lock = FileLock(self.path / LOCK_FILE, timeout=timeout)
        try:
            lock.acquire()
        except Timeout:
            raise LockedError(f"another kedit command is writing to {self.path} (waited {timeout:g} s)") from None
        try:
            yield
        finally:
            lock.release()

    # -- reading ---------------------------------------------------------------------------

    def head(self) -> str | None:
        return self.refs.deref(HEAD)

    def head_branch(self) -> str | None:
        return self.refs.head_branch()

    def resolve(self, rev: str) -> str:
        return self.refs.resolve(rev)

    def get_commit(self, commit_id: str) -> CommitInfo:
        row = dbm.one(self.db, """SELECT id, parent, depth, kind, method, hparams, requests, info, message,
                                         author, created FROM commits WHERE id = ?""", [commit_id])
        if row is None:
            raise RevisionError(f"unknown commit {commit_id}", rev=commit_id)
        cid, parent, depth, kind, method, hp, reqs, info, message, author, created = row
        return CommitInfo(cid, parent, depth, kind, method, json.loads(hp or "{}"), json.loads(reqs or "[]"),
                          json.loads(info or "{}"), message, author, created, self.metrics(cid))

    def metrics(self, commit_id: str) -> list[Metric]:
        return dbm.rows(self.db, "SELECT name, value, protocol, stage, suite, source FROM metrics WHERE commit_id = ? "
                        "ORDER BY suite, stage, name", [commit_id], factory=Metric)

    def log(self, rev: str = HEAD, limit: int | None = None) -> list[CommitInfo]:
        """Commits from `rev` back along first parents, newest first."""
        ids = history.ancestors(self.db, self.resolve(rev))
        return [self.get_commit(c) for c in ids[:limit]]

    def manifest(self, rev: str = HEAD) -> dict[str, history.ManifestEntry]:
        return history.manifest(self.db, self.resolve(rev))

    def changes(self, rev: str) -> list[history.Change]:
        return history.changes(self.db, self.resolve(rev))

    def materialize(self, rev: str = HEAD, names: Iterable[str] | None = None,
                    progress: bool = False) -> dict[str, torch.Tensor]:
        """The model's tensors at `rev`, each recomputed and checked against its recorded hash."""
        commit_id = self.resolve(rev)
        manifest = history.manifest(self.db, commit_id)
        wanted = sorted(manifest) if names is None else list(names)
        out = {}
        for name in progress_bar(wanted, desc="materialise", disable=not progress):
            entry = manifest.get(name)
            if entry is None:
                raise KeyError(f"no tensor named {name!r} at {rev}")
            out[name] = self.materializer.value_of(history.change(self.db, entry.commit_id, name))
        return out

    def files(self, rev: str = HEAD) -> dict[str, bytes]:
        """The config and tokenizer files at `rev`."""
        return {p: self.store.get_blob(oid) for p, oid in history.files(self.db, self.resolve(rev)).items()}

    def memory(self, method: str, rev: str = HEAD) -> list[dict[str, torch.Tensor]]:
        """`method`'s memory of the edits in effect at `rev`, oldest first (reverted edits drop out)."""
        return [self.store.get_tensors(oid)[0] for _, oid in history.method_memory(self.db, self.resolve(rev), method)]

    def adapters(self, rev: str = HEAD) -> list[tuple[history.AdapterRef, Adapter]]:
        """Adapters in effect at `rev`, loaded."""
        out = []
        for ref in history.adapters(self.db, self.resolve(rev)):
            tensors, metadata = self.store.get_tensors(ref.object_id)
            out.append((ref, Adapter(ref.kind, tensors, json.loads(metadata.get("config", "{}")))))
        return out

    # -- writing: the base -----------------------------------------------------------------

    def _commit_base(self, src, *, copy: bool, dtype: torch.dtype | None, progress: bool,
                     message: str | None) -> None:
        with self.store.batch():
            changes, files, total = self._store_base(src, copy=copy, dtype=dtype, progress=progress)
        record = {
            "kind": "init", "parents": [], "origin": src.origin, "message": message or f"init from {src.description}",
            "tensors": {n: {"source": None, "steps": [["", c["object"], "exact"]], "hash": c["hash"]}
                        for n, c in changes.items()},
            "files": files, "author": _author(), "created": now_iso(), "kedit_version": kedit.__version__,
        }
        cid = record_id(record)
        with dbm.write(self.db):
            self._insert_commit(cid, None, 0, record, method=None, hparams={}, requests=[],
                                info={"origin": src.origin, "bytes": total})
            for name, c in changes.items():
                self._insert_change(cid, name, None, c["hash"], c["dtype"], c["shape"], "exact", None, None, None,
                                    c["stored"], [(cid, c["object"], "exact")])
            self.db["files"].insert_all([{"commit_id": cid, "path": p, "object_id": o} for p, o in files.items()])
            self.refs.update(BRANCH_PREFIX + DEFAULT_BRANCH, cid, None, "init")
            self.refs.update(HEAD, BRANCH_PREFIX + DEFAULT_BRANCH, None, "init", symbolic=True)
            self.refs.log(HEAD, None, cid, "init")
        self._sync_worktree(progress=progress)

    def _store_base(self, src, *, copy: bool, dtype: torch.dtype | None,
                    progress: bool) -> tuple[dict[str, dict], dict[str, str], int]:
        """Hash and store every tensor of the source (or reference it): one pass over the bytes."""
        changes: dict[str, dict] = {}
        total = 0
        for weight_file in src.weight_files:
            tensors, _ = read_safetensors(weight_file)
            for name in progress_bar(sorted(tensors), desc=f"hash+store {weight_file.name}", disable=not progress):
                tensor = tensors[name]
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensor_hash = hash_tensor(tensor)
                if copy or dtype is not None:
                    obj = self.store.put_tensors({"value": tensor}, tensor_hashes={"value": tensor_hash})
                else:
                    obj = self.store.put_reference(weight_file, name, tensor_hash)
                total += tensor.numel() * tensor.element_size()
                changes[name] = {"hash": tensor_hash, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                                 "object": obj.id, "stored": obj.size}
        files = {path: self.store.put_blob(p.read_bytes()).id for path, p in src.kept_files.items()}
        return changes, files, total

    def _insert_commit(self, cid: str, parent: str | None, depth: int, record: dict, *, method: str | None,
                       hparams: dict, requests: list, info: dict) -> None:
        self.db["commits"].insert({
            "id": cid, "parent": parent, "depth": depth, "kind": record["kind"], "method": method,
            "hparams": json.dumps(hparams), "requests": json.dumps(requests), "info": json.dumps(info),
            "message": record["message"], "author": record["author"], "created": record["created"],
            "record": canonical_json(record).decode(),
        })

    def _insert_change(self, cid: str, name: str, source: str | None, result_hash: str, dtype: str,
                       shape: list[int], encoding: str, rank: int | None, norm: float | None, rel: float | None,
                       stored: int, steps: list[tuple[str, str, str]]) -> None:
        self.db["tensor_changes"].insert({
            "commit_id": cid, "name": name, "source_commit": source, "result_hash": result_hash, "dtype": dtype,
            "shape": json.dumps(shape), "encoding": encoding, "rank": rank, "delta_norm": norm,
            "rel_change": rel, "stored_bytes": stored,
        })
        self.db["tensor_steps"].insert_all([
            {"commit_id": cid, "name": name, "seq": i, "origin_commit": origin, "object_id": oid, "encoding": enc}
            for i, (origin, oid, enc) in enumerate(steps)
        ])

    # -- writing: edits --------------------------------------------------------------------

    def commit(self, deltas: Mapping[str, WeightDelta], *, adapters: Iterable[Adapter] = (),
               requests: Iterable[Mapping[str, Any]] = (), method: str | None = None,
               hparams: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None,
               message: str | None = None, metrics: Iterable[Metric] = (),
               memory: Mapping[str, torch.Tensor] | None = None) -> CommitInfo:
        """Record an edit on top of HEAD and move the current branch to it.

        `memory`: tensors the method keeps for its later edits (`Repository.memory`).

        Each delta is applied to HEAD's tensor with the canonical arithmetic; the result's hash
        is recorded and the smallest exact encoding stored (low-rank factors or a dense delta;
        exact bytes for replacements). Raises DeltaError for unknown tensors, shape mismatches,
        non-finite results, or an edit that changes nothing.
        """
        adapters = list(adapters)
        with self.lock():
            self._sync_worktree()
            parent = self._require_head()
            manifest = history.manifest(self.db, parent)
            staged: dict[str, dict] = {}
            for name in sorted(deltas):
                staged_change = self._stage_delta(parent, manifest, name, deltas[name])
                if staged_change is not None:
                    staged[name] = staged_change
            adapter_objs = [self.store.put_tensors(a.tensors, {"kind": a.kind, "config": json.dumps(a.config)})
                            for a in adapters]
            if not staged and not adapters:
                raise DeltaError("the edit changes no tensor: nothing to commit")
            memory_obj = self.store.put_tensors(dict(memory), {"kind": "memory", "method": method or ""}) \
                if memory else None
            requests = [_jsonable(dict(r)) for r in requests]
            record = {
                "kind": "edit", "parents": [parent], "method": method, "hparams": _jsonable(dict(hparams or {})),
                "requests": requests, "message": message or _default_message(method, requests),
                "tensors": {n: {"source": parent, "steps": [["", s["object"], s["encoding"]]], "hash": s["hash"]}
                            for n, s in staged.items()},
                "adapters": [["add", o.id, a.kind, ""] for o, a in zip(adapter_objs, adapters, strict=True)],
                "author": _author(), "created": now_iso(), "kedit_version": kedit.__version__,
            }
            if memory_obj is not None:
                record["memory"] = memory_obj.id
            cid = record_id(record)
            depth = self.get_commit(parent).depth + 1
            with dbm.write(self.db):
                self._insert_commit(cid, parent, depth, record, method=method, hparams=record["hparams"],
                                    requests=requests, info=_jsonable(dict(info or {})))
                for name, s in staged.items():
                    steps = [(cid, s["object"], s["encoding"])]
                    self._insert_change(cid, name, parent, s["hash"], s["dtype"], s["shape"], s["encoding"],
                                        s["rank"], s["norm"], s["rel"], s["stored"], steps)
                self.db["adapter_ops"].insert_all([
                    {"commit_id": cid, "seq": i, "op": "add", "object_id": o.id, "kind": a.kind, "origin_commit": cid}
                    for i, (o, a) in enumerate(zip(adapter_objs, adapters, strict=True))])
                if memory_obj is not None:
                    self.db["method_memory"].insert(
                        {"commit_id": cid, "method": method or "", "object_id": memory_obj.id})
                self._insert_metrics(cid, metrics)
                self._advance_head(parent, cid, f"commit: {record['message']}")
            self._sync_worktree(known_values={n: s["value"] for n, s in staged.items()})
            return self.get_commit(cid)

    def _stage_delta(self, parent: str, manifest: dict[str, history.ManifestEntry], name: str,
                     delta: WeightDelta) -> dict | None:
        if name not in manifest:
            close = [n for n in manifest if name.split(".")[-1] in n][:3]
            raise DeltaError(f"the model has no tensor named {name!r}"
                             + (f" (did you mean {', '.join(close)}?)" if close else ""))
        before = self.materializer.value(parent, name)
        step, encoding = _encode(delta, before)
        try:
            after = apply_step(before, step)
        except ValueError as e:
            raise DeltaError(f"delta for {name}: {e}") from e
        if after.is_floating_point() and not torch.isfinite(after).all():
            raise DeltaError(f"the delta for {name} produces non-finite values; nothing was committed")
        result_hash = hash_tensor(after)
        if result_hash == manifest[name].hash:
            return None
        payload = {"lowrank": lambda: {"a": step.a, "b": step.b}, "dense": lambda: {"delta": step.delta},
                   "exact": lambda: {"value": step.value}}[encoding]()
        obj = self.store.put_tensors(payload)
        diff = after.to(torch.float64) - before.to(torch.float64)
        norm = float(diff.norm())
        base_norm = float(before.to(torch.float64).norm())
        return {"hash": result_hash, "dtype": dtype_name(after.dtype), "shape": list(after.shape),
                "encoding": encoding, "rank": step.rank if isinstance(step, LowRank) else None,
                "norm": norm, "rel": norm / base_norm if base_norm else None, "stored": obj.size,
                "object": obj.id, "value": after}

    def _insert_metrics(self, cid: str, metrics: Iterable[Metric]) -> None:
        self.db["metrics"].upsert_all([
            {"commit_id": cid, "name": m.name, "value": float(m.value), "protocol": m.protocol, "stage": m.stage,
             "suite": m.suite, "created": now_iso(), "source": ""}  # measured here, replacing a remote's
            for m in metrics], pk=("commit_id", "name", "stage", "suite"))

    def record_metrics(self, rev: str, metrics: Iterable[Metric]) -> None:
        """Store (or replace) measurements of a commit; they are not part of its id."""
        cid = self.resolve(rev)
        with dbm.write(self.db):
            self._insert_metrics(cid, metrics)

    def _require_head(self) -> str:
        head = self.head()
        if head is None:
            raise RevisionError("HEAD points to no commit", rev=HEAD)
        return head

    def _advance_head(self, old: str, new: str, message: str) -> None:
        branch = self.head_branch()
        self.refs.update(BRANCH_PREFIX + branch if branch else HEAD, new, old, message)
        if branch:
            self.refs.log(HEAD, old, new, message)

    def revert(self, rev: str, message: str | None = None) -> CommitInfo:
        """A new commit whose state is HEAD's history without `rev`'s delta, recomputed from the
        base (never subtracted), so reverting every edit gives the base bit for bit."""
        with self.lock():
            self._sync_worktree()
            head = self._require_head()
            target = self.resolve(rev)
            if target not in history.ancestors(self.db, head):
                raise RevisionError(f"{rev} is not in the history of HEAD", rev=rev)
            reverted = self.get_commit(target)
            if reverted.parent is None:
                raise KeditError("the initial commit (the base model) cannot be reverted")
            staged: dict[str, dict] = {}
            adapter_ops: list[list[str]] = []
            if reverted.kind == "revert":  # reverting a revert re-applies the original edit's own deltas
                original = reverted.info["reverts"]
                for ch in history.changes(self.db, original):
                    own = [s for s in ch.steps if s.origin == original]
                    staged[ch.name] = self._replay(head, ch.name, head, own)
                active = {r.object_id for r in history.adapters(self.db, head)}
                adapter_ops = [["add", oid, kind, original] for oid, kind in self.db.execute(
                    "SELECT object_id, kind FROM adapter_ops WHERE commit_id = ? AND op = 'add' ORDER BY seq",
                    [original]) if oid not in active]
            else:
                for ch in history.changes(self.db, target):
                    replay = self._replay_without(head, ch.name, target)
                    if replay is not None:
                        staged[ch.name] = replay
                adapter_ops = [["remove", r.object_id, r.kind, r.origin]
                               for r in history.adapters(self.db, head) if r.origin == target]
            if not staged and not adapter_ops:
                raise KeditError(f"commit {target[:12]} has no effect left at HEAD (already reverted?)")
            msg = message or f'Revert "{reverted.message}"'
            record = {
                "kind": "revert", "parents": [head], "reverts": target, "message": msg,
                "tensors": {n: {"source": s["source"], "steps": [list(x) for x in s["steps"]], "hash": s["hash"]}
                            for n, s in staged.items()},
                "adapters": adapter_ops,
                "author": _author(), "created": now_iso(), "kedit_version": kedit.__version__,
            }
            cid = record_id(record)
            later = [c for c in history.ancestors(self.db, head)
                     if c != target and self.get_commit(c).depth > reverted.depth]
            info = {"reverts": target, "later_commits": later,
                    "note": "later edits were computed on a model that contained the reverted one; re-evaluate"}
            with dbm.write(self.db):
                self._insert_commit(cid, head, self.get_commit(head).depth + 1, record, method=None, hparams={},
                                    requests=reverted.requests, info=info)
                for name, s in staged.items():
                    self._insert_change(cid, name, s["source"], s["hash"], s["dtype"], s["shape"], "replay", None,
                                        s["norm"], s["rel"], 0, s["steps"])
                self.db["adapter_ops"].insert_all([
                    {"commit_id": cid, "seq": i, "op": op, "object_id": oid, "kind": kind, "origin_commit": origin}
                    for i, (op, oid, kind, origin) in enumerate(adapter_ops)])
                self._advance_head(head, cid, f"revert: {msg}")
            self._sync_worktree(known_values={n: s["value"] for n, s in staged.items()})
            return self.get_commit(cid)

    def _replay_without(self, head: str, name: str, target: str) -> dict | None:
        """How `name` is recomputed without `target`'s steps: a source commit and the steps after it."""
        chain: list[history.Change] = []
        current = history.defining_change(self.db, head, name)
        while current is not None:
            chain.append(current)
            if current.source_commit is None:
                break
            current = history.defining_change(self.db, current.source_commit, name)
        chain.reverse()  # oldest first
        effective = [s for ch in chain for s in ch.steps]
        kept = [s for s in effective if s.origin != target]
        if len(kept) == len(effective):
            return None
        source, prefix = None, 0
        for ch in chain:
            if any(s.origin == target for s in ch.steps):
                break
            source, prefix = ch.commit_id, prefix + len(ch.steps)
        return self._replay(head, name, source, kept[prefix:])

    def _replay(self, head: str, name: str, source: str | None, steps: list[history.Step]) -> dict:
        """Stage a change of `name`: `source`'s value with `steps` applied, compared with HEAD's."""
        value = self.materializer.value(source, name) if source else None
        for step in steps:
            delta = load_step(self.store, step)
            value = delta.value if value is None and isinstance(delta, Replace) else apply_step(value, delta)
        before = self.materializer.value(head, name)
        diff = value.to(torch.float64) - before.to(torch.float64)
        base_norm = float(before.to(torch.float64).norm())
        return {"source": source, "steps": [(s.origin, s.object_id, s.encoding) for s in steps],
                "hash": hash_tensor(value), "dtype": dtype_name(value.dtype), "shape": list(value.shape),
                "norm": float(diff.norm()), "rel": float(diff.norm()) / base_norm if base_norm else None,
                "value": value}

    # -- refs and the working model --------------------------------------------------------

    def _sync_worktree(self, *, force: bool = False, progress: bool = False,
                       known_values: dict[str, torch.Tensor] | None = None) -> list[str]:
        """Bring the working model to HEAD (refusing to overwrite hand-made changes unless forced)."""
        if self.worktree is None:
            return []
        head = self._require_head()
        if self.worktree.commit == head and not force:
            self._refuse_if_dirty()  # before a write command changes anything, not after
            return []
        return self._update_worktree(head, force=force, progress=progress, known_values=known_values)

    def _refuse_if_dirty(self) -> None:
        assert self.worktree is not None
        dirty = self.worktree.modified()
        if dirty:
            names = ", ".join(sorted(dirty)[:3]) + (" ..." if len(dirty) > 3 else "")
            raise WorktreeDirtyError(f"the working model has changes kedit did not make: {names}")

    def _update_worktree(self, commit_id: str, *, force: bool, progress: bool = False,
                         known_values: dict[str, torch.Tensor] | None = None) -> list[str]:
        assert self.worktree is not None
        if not force:
            self._refuse_if_dirty()
        manifest = history.manifest(self.db, commit_id)
        old_files = set(self.worktree.read_index().get("files", []))
        new_files = history.files(self.db, commit_id)
        files = {p: (self.store.get_blob(o) if p not in old_files or force else None) for p, o in new_files.items()}
        bar = progress_bar(total=len(manifest), desc="checkout", disable=not progress)

        def value_of(name: str) -> torch.Tensor:
            bar.update(1)
            return self.materializer.value_of(history.change(self.db, manifest[name].commit_id, name))

        with bar:
            return self.worktree.update(commit_id, manifest, files, value_of, known_values, keep=self.cache.adopt)

    def checkout(self, rev: str, *, force: bool = False) -> str:
        """Switch HEAD (and the working model) to a branch, or detach it at a commit."""
        with self.lock():
            commit_id = self.resolve(rev)
            is_branch = self.refs.deref(BRANCH_PREFIX + rev) is not None
            if self.worktree is not None:
                self._update_worktree(commit_id, force=force)
            current = self.refs.get(HEAD)
            old_commit = self.head()
            with dbm.write(self.db):
                new = (BRANCH_PREFIX + rev, True) if is_branch else (commit_id, False)
                if current != new:
                    message = f"checkout: moving to {rev}"
                    self.refs.update(HEAD, new[0], current[0] if current else None, message, symbolic=new[1])
                    if new[1]:
                        self.refs.log(HEAD, old_commit, commit_id, message)
            return commit_id

    def reset(self, rev: str, *, force: bool = False) -> str:
        """Move the current branch (or a detached HEAD) to `rev`; the reflog keeps the old position."""
        with self.lock():
            commit_id = self.resolve(rev)
            old = self._require_head()
            if self.worktree is not None:
                self._update_worktree(commit_id, force=force)
            with dbm.write(self.db):
                self._advance_head(old, commit_id, f"reset: moving to {rev}")
            return commit_id

    def create_branch(self, name: str, rev: str = HEAD) -> str:
        check_ref_name(name, "branch")
        with self.lock(), dbm.write(self.db):
            commit_id = self.resolve(rev)
            self.refs.create(BRANCH_PREFIX + name, commit_id, f"branch: created from {rev}")
            return commit_id

    def delete_branch(self, name: str) -> str:
        with self.lock(), dbm.write(self.db):
            target = self.refs.deref(BRANCH_PREFIX + name)
            if target is None:
                raise RevisionError(f"no branch named {name!r}", rev=name)
            if self.head_branch() == name:
                raise KeditError(f"cannot delete the branch {name!r}: it is checked out",
                                 hint="kedit checkout another branch first")
            self.refs.update(BRANCH_PREFIX + name, None, target, "branch: deleted")
            return target

    def create_tag(self, name: str, rev: str = HEAD) -> str:
        check_ref_name(name, "tag")
        with self.lock(), dbm.write(self.db):
            commit_id = self.resolve(rev)
            self.refs.create(TAG_PREFIX + name, commit_id, f"tag: {name}")
            return commit_id

    def delete_tag(self, name: str) -> str:
        with self.lock(), dbm.write(self.db):
            target = self.refs.deref(TAG_PREFIX + name)
            if target is None:
                raise RevisionError(f"no tag named {name!r}", rev=name)
            self.refs.update(TAG_PREFIX + name, None, target, "tag: deleted")
            return target

    def reflog(self, ref: str = HEAD, limit: int | None = None) -> list[dict[str, Any]]:
        name = ref if ref == HEAD or ref.startswith("refs/") else BRANCH_PREFIX + ref
        sql = "SELECT id, ref, old, new, message, created FROM reflog WHERE ref = ? ORDER BY id DESC"
        found = dbm.rows(self.db, sql + (f" LIMIT {int(limit)}" if limit else ""), [name])
        if not found and name != HEAD and self.refs.get(name) is None:
            raise RevisionError(f"no ref named {ref!r}", rev=ref)
        return found

    def status(self) -> dict[str, Any]:
        head = self.head()
        out: dict[str, Any] = {"branch": self.head_branch(), "head": head, "path": str(self.path)}
        if self.worktree is not None:
            out["worktree"] = str(self.worktree.folder)
            out["worktree_commit"] = self.worktree.commit
            out["modified"] = self.worktree.modified()
        return out


def _encode(delta: WeightDelta, before: torch.Tensor) -> tuple[WeightDelta, str]:
    """Normalise a delta for storage and pick its encoding.

    Low-rank factors are kept as float32 while they are smaller than a dense delta. A dense
    delta is stored in the tensor's own dtype: it is then exactly what is applied, and its
    rounding error (relative to the delta) is far below the rounding of the result itself.
    Replacements are stored as exact bytes. Deltas, not results, are what a revert replays.
    """
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


def _default_message(method: str | None, requests: list[dict[str, Any]]) -> str:
    if requests:
        r = requests[0]
        prompt = r.get("prompt", "").replace("{}", r.get("subject", ""))
        more = f" (+{len(requests) - 1} more)" if len(requests) > 1 else ""
        return f"{method or 'edit'}: {prompt} -> {r.get('target_new', '?')}{more}"
    return f"{method or 'edit'}"
