"""fsck and gc: prove the repository intact, and reclaim what nothing needs.

fsck re-hashes every object against its id, checks every commit record against its id,
checks every ref, and replays every tensor change of every commit from the stored deltas
(never from caches), comparing each result with the hash recorded at commit time.

gc keeps everything reachable from a ref or from a reflog entry younger than the reflog
expiry, and everything younger than the grace period; it removes the rest (commit rows,
objects, keyframes, stale temp files). Like git, it is safe against a concurrent writer
because it holds the writer lock and never deletes a young object.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import torch

from kedit import db as dbm
from kedit import history
from kedit.errors import KeditError
from kedit.hashing import hash_tensor, record_id
from kedit.materialize import Materializer, TensorCache
from kedit.progress import progress_bar
from kedit.repo import Repository

DEFAULT_GRACE = timedelta(days=14)  # git's gc.pruneExpire
DEFAULT_REFLOG_EXPIRY = timedelta(days=90)  # git's gc.reflogExpire
TMP_GRACE_S = 3600.0


@dataclass
class FsckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    objects: int = 0
    commits: int = 0
    tensors: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


class _NoCache(TensorCache):
    """fsck proves values from objects alone: no keyframes read or written."""

    def get(self, tensor_hash: str) -> torch.Tensor | None:
        return None

    def put(self, tensor_hash: str, value: torch.Tensor) -> None:
        return None


class _RecentValues:
    """The last few verified values per tensor name, so a replay starts from its parent."""

    def __init__(self, per_name: int = 2) -> None:
        self.per_name = per_name
        self.values: dict[str, OrderedDict[str, torch.Tensor]] = {}

    def lookup(self, name: str, tensor_hash: str) -> torch.Tensor | None:
        return self.values.get(name, {}).get(tensor_hash)

    def add(self, name: str, tensor_hash: str, value: torch.Tensor) -> None:
        slot = self.values.setdefault(name, OrderedDict())
        slot[tensor_hash] = value
        while len(slot) > self.per_name:
            slot.popitem(last=False)


def fsck(repo: Repository, *, progress: bool = False) -> FsckReport:
    report = FsckReport()
    referenced = _referenced_objects(repo)
    stored = set()
    for object_id, _kind, _path in progress_bar(list(repo.store.iter_objects()), desc="objects",
                                                disable=not progress):
        stored.add(object_id)
        report.objects += 1
        try:
            repo.store.verify(object_id)
        except KeditError as e:
            report.errors.append(str(e))
    for object_id in sorted(set(referenced) - stored):
        report.errors.append(f"object {object_id} is missing (needed by commit {referenced[object_id][:12]})")
    unreferenced = stored - set(referenced)
    if unreferenced:
        report.warnings.append(f"{len(unreferenced)} unreferenced objects (kedit gc removes them)")

    for cid, record in repo.db.execute("SELECT id, record FROM commits"):
        report.commits += 1
        if record_id(json.loads(record)) != cid:
            report.errors.append(f"commit {cid[:12]}: its record does not hash to its id")
    for name, target, symbolic in repo.db.execute("SELECT name, target, symbolic FROM refs"):
        if symbolic:
            if repo.refs.get(target) is None:
                report.errors.append(f"{name} points to {target}, which does not exist")
        elif dbm.one(repo.db, "SELECT 1 FROM commits WHERE id = ?", [target]) is None:
            report.errors.append(f"{name} points to {target[:12]}, which is not a commit")

    _replay_all(repo, report, progress)

    for tensor_hash, path in repo.cache.entries():
        try:
            value = repo.cache.get(tensor_hash)
        except Exception:
            value = None
        if value is None:
            report.warnings.append(f"damaged keyframe {path.name} removed from the cache")
    if repo.worktree is not None:
        dirty = repo.worktree.modified()
        if dirty:
            report.warnings.append(f"the working model has {len(dirty)} tensors changed by hand: "
                                   + ", ".join(sorted(dirty)[:3]))
        if repo.worktree.commit not in (None, repo.head()):
            report.warnings.append("the working model is not at HEAD (the next kedit write brings it there)")
    return report


def _replay_all(repo: Repository, report: FsckReport, progress: bool) -> None:
    recent = _RecentValues()
    materializer = Materializer(repo.db, repo.store, _NoCache(repo.path / "cache"), (recent.lookup,))
    pairs = repo.db.execute("""SELECT tc.commit_id, tc.name FROM tensor_changes tc JOIN commits c
                               ON c.id = tc.commit_id ORDER BY c.depth, c.created, tc.name""").fetchall()
    for cid, name in progress_bar(pairs, desc="replay", disable=not progress):
        report.tensors += 1
        change = history.change(repo.db, cid, name)
        try:
            value = materializer.value_of(change, use_cache=False)
        except KeditError as e:
            report.errors.append(f"commit {cid[:12]} tensor {name}: {e}")
            continue
        except (KeyError, ValueError, RuntimeError) as e:
            report.errors.append(f"commit {cid[:12]} tensor {name} cannot be replayed: {e}")
            continue
        if hash_tensor(value) == change.result_hash:
            recent.add(name, change.result_hash, value)


def _referenced_objects(repo: Repository) -> dict[str, str]:
    """object id -> a commit that needs it."""
    found: dict[str, str] = {}
    for sql in ("SELECT object_id, commit_id FROM tensor_steps", "SELECT object_id, commit_id FROM adapter_ops",
                "SELECT object_id, commit_id FROM files", "SELECT object_id, commit_id FROM method_memory",
                "SELECT id, 'editor ' || id FROM editors"):
        for oid, cid in repo.db.execute(sql):
            found.setdefault(oid, cid)
    return found


@dataclass
class GcReport:
    commits_removed: int = 0
    objects_removed: int = 0
    bytes_freed: int = 0
    keyframes_removed: int = 0
    reflog_expired: int = 0


def gc(repo: Repository, *, grace: timedelta = DEFAULT_GRACE,
       reflog_expiry: timedelta = DEFAULT_REFLOG_EXPIRY) -> GcReport:
    report = GcReport()
    now = datetime.now(UTC)
    with repo.lock():
        with dbm.write(repo.db):
            cutoff = (now - reflog_expiry).isoformat()
            report.reflog_expired = repo.db.execute("DELETE FROM reflog WHERE created < ?", [cutoff]).rowcount
            keep = _reachable_commits(repo)
            young = (now - grace).isoformat()
            doomed = [cid for cid, created in repo.db.execute("SELECT id, created FROM commits")
                      if cid not in keep and created < young]
            # Children before parents: delete deepest first (parent is a foreign key).
            doomed.sort(key=lambda c: -repo.get_commit(c).depth)
            for cid in doomed:
                repo.db.execute("DELETE FROM commits WHERE id = ?", [cid])
            report.commits_removed = len(doomed)
        needed = set(_referenced_objects(repo))
        oldest_allowed = time.time() - grace.total_seconds()
        for object_id, _kind, path in list(repo.store.iter_objects()):
            if object_id in needed:
                continue
            try:
                if path.stat().st_mtime > oldest_allowed:
                    continue
            except FileNotFoundError:
                continue
            report.bytes_freed += repo.store.delete(object_id)
            report.objects_removed += 1
        live_hashes = {r[0] for r in repo.db.execute("SELECT result_hash FROM tensor_changes")}
        for tensor_hash, path in repo.cache.entries():
            if tensor_hash not in live_hashes:
                report.bytes_freed += path.stat().st_size
                path.unlink(missing_ok=True)
                report.keyframes_removed += 1
        repo.store.clean_tmp(TMP_GRACE_S, time.time())
        for leftover in repo.cache.root.glob("*/.tmp*"):  # keyframes whose writer was killed (ours or safetensors')
            if time.time() - leftover.stat().st_mtime > TMP_GRACE_S:
                leftover.unlink(missing_ok=True)
    return report


def _reachable_commits(repo: Repository) -> set[str]:
    tips = {r[0] for r in repo.db.execute("SELECT target FROM refs WHERE symbolic = 0")}
    for old, new in repo.db.execute("SELECT old, new FROM reflog"):
        tips.update(x for x in (old, new) if x and not x.startswith("refs/"))
    keep: set[str] = set()
    stack = [t for t in tips if dbm.one(repo.db, "SELECT 1 FROM commits WHERE id = ?", [t])]
    while stack:
        cid = stack.pop()
        if cid in keep:
            continue
        keep.add(cid)
        row = dbm.one(repo.db, "SELECT parent FROM commits WHERE id = ?", [cid])
        if row and row[0]:
            stack.append(row[0])
        stack.extend(r[0] for r in repo.db.execute(
            "SELECT DISTINCT source_commit FROM tensor_changes WHERE commit_id = ? AND source_commit IS NOT NULL",
            [cid]))
        stack.extend(r[0] for r in repo.db.execute(
            "SELECT DISTINCT origin_commit FROM tensor_steps WHERE commit_id = ?", [cid]))
    return keep
