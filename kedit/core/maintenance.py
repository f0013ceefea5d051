"""fsck and gc: prove the repository intact, repair what hashes prove, reclaim what nothing needs.

fsck checks the database file (`PRAGMA integrity_check`, `foreign_key_check`), re-hashes every
object against its id, checks every commit record against its id and every row that restates a
record against it (`kedit.core.rowproof`), checks that refs and reflog entries name existing commits,
replays every tensor change of every commit from the stored deltas (never from caches), comparing
each result with the hash recorded at commit time, and re-hashes every shard and file of the
working model against its commit. Rows that no hash covers (metrics, probe outputs, the methods'
diagnostics, delta statistics, editors' training records) are counted as unproved, not errors.

`repair` (fsck --repair) holds the writer lock, rewrites the rows that records prove, restores
refs to their last reflog position and drops reflog entries naming missing commits, rewrites the
damaged shards and files of the working model from the objects (verified by hash), then runs fsck
again. A missing object or a record that does not hash to its id cannot be repaired from here.

gc keeps everything reachable (over all parents: both sides of a merge) from a ref or from a
reflog entry younger than the reflog expiry, and everything younger than the grace period; it
removes the rest (commit rows, objects, keyframes, stale temp files). Like git, it is safe against a concurrent writer
because it holds the writer lock and never deletes a young object.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import torch

from kedit.core import db as dbm
from kedit.core import history
from kedit.core.errors import KeditError
from kedit.core.hashing import hash_bytes, record_id
from kedit.core.implied import depths, implied_rows, load_records, parents_of
from kedit.core.materialize import Materializer, TensorCache
from kedit.core.progress import progress_bar
from kedit.core.refs import short_id
from kedit.core.repo import Repository
from kedit.core.rowproof import KNOWN_KINDS, REPAIR_HINT, check_rows, rewrite_commit_columns, rewrite_rows
from kedit.core.tensors import dtype_name, hash_tensor
from kedit.core.worktree import shard_name

DEFAULT_GRACE = timedelta(days=14)  # git's gc.pruneExpire
DEFAULT_REFLOG_EXPIRY = timedelta(days=90)  # git's gc.reflogExpire
TMP_GRACE_S = 3600.0
NOT_REPAIRABLE = "cannot be repaired from hashed data"


@dataclass
class FsckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    objects: int = 0
    commits: int = 0
    tensors: int = 0
    worktree_shards: int = 0  # re-hashed from their bytes
    unproved: dict[str, int] = field(default_factory=dict)  # rows no hash covers, by kind
    repaired: list[str] = field(default_factory=list)
    # What --repair acts on (found by this run):
    bad_rows: set[str] = field(default_factory=set)  # commits whose rows differ from their record
    value_fixes: dict[tuple[str, str], tuple[str, list[int]]] = field(default_factory=dict)
    bad_refs: list[str] = field(default_factory=list)
    bad_reflog: list[int] = field(default_factory=list)
    editor_fixes: dict[str, str] = field(default_factory=dict)  # editor id -> the method its object says
    damaged_shards: list[str] = field(default_factory=list)
    damaged_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict[str, Any]:
        """What `kedit fsck --json` prints."""
        keys = ("errors", "warnings", "objects", "commits", "tensors", "worktree_shards", "unproved", "repaired")
        return {"ok": self.ok, **{k: getattr(self, k) for k in keys}}


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
    _check_database(repo, report)
    records = _proved_records(repo, report)
    for cid, problems in check_rows(repo.db, records).items():
        report.bad_rows.add(cid)
        report.errors.extend(str(p) for p in problems)
    referenced = _referenced_objects(repo)
    stored = set()
    for object_id, _kind, _path in progress_bar(list(repo.store.iter_objects()), desc="objects",
                                                disable=not progress):
        stored.add(object_id)
        report.objects += 1
        try:
            repo.store.verify(object_id)
        except KeditError as e:
            fix = e.hint if e.hint and "fsck" not in e.hint else "fetch it again from a remote"
            report.errors.append(f"{e}; {NOT_REPAIRABLE} ({fix})")
    for object_id in sorted(set(referenced) - stored):
        needed_by = referenced[object_id]
        report.errors.append(f"object {object_id} is missing (needed by commit {short_id(needed_by)}); " + (
            f"{REPAIR_HINT} (its rows name objects its record does not)" if needed_by in report.bad_rows
            else f"{NOT_REPAIRABLE} (fetch it again from a remote)"))
    unreferenced = stored - set(referenced)
    if unreferenced:
        report.warnings.append(f"{len(unreferenced)} unreferenced objects (kedit gc removes them)")

    _check_refs(repo, report)
    _check_editors(repo, report)
    cycle = _parent_cycle(repo)
    if cycle is not None:  # every walk along parents (replay, manifests) would never end
        report.bad_rows.add(cycle)
        report.errors.append(f"commit {short_id(cycle)}: the parent columns form a cycle, so log never ends; "
                             f"{REPAIR_HINT}")
        report.warnings.append("replay and working-model checks skipped until the parent columns are repaired")
        report.unproved = _unproved(repo)
        return report
    _replay_all(repo, report, progress)

    for tensor_hash, path in repo.cache.entries():
        try:
            value = repo.cache.get(tensor_hash)
        except Exception:
            value = None
        if value is None:
            report.warnings.append(f"damaged keyframe {path.name} removed from the cache")
    _check_worktree(repo, report)
    report.unproved = _unproved(repo)
    return report


def _check_database(repo: Repository, report: FsckReport) -> None:
    damage = [r[0] for r in repo.db.execute("PRAGMA integrity_check")]
    if damage != ["ok"]:
        report.errors.append(f"the database file is damaged ({'; '.join(damage[:3])}); {NOT_REPAIRABLE} "
                             "(restore .kedit/kedit.db from a backup, or clone the repository again)")
    for table, rowid, parent, _ in repo.db.execute("PRAGMA foreign_key_check"):
        report.errors.append(f"table {table} row {rowid} refers to a missing row of {parent} "
                             "(kedit fsck --repair rewrites the column when a record proves it)")


def _proved_records(repo: Repository, report: FsckReport) -> dict[str, dict]:
    """Records that hash to their commit's id (the others are errors no repair can fix)."""
    rows = repo.db.execute("SELECT id, record FROM commits").fetchall()
    records = load_records(rows)
    for cid, _ in rows:
        report.commits += 1
        if cid not in records or record_id(records[cid]) != cid:
            records.pop(cid, None)
            report.errors.append(f"commit {short_id(cid)}: its record does not hash to its id; {NOT_REPAIRABLE} "
                                 "(fetch the commit again from a remote)")
    for cid, record in records.items():
        if record.get("kind") not in KNOWN_KINDS:
            report.warnings.append(f"commit {short_id(cid)}: a record of kind {record.get('kind')!r}, which this kedit "
                                   "does not know; its rows are not checked (pip install -U kedit)")
        for parent in parents_of(record):  # a merge names two
            if not _is_commit(repo, parent):
                report.errors.append(f"commit {short_id(cid)}: its parent {short_id(parent)} is missing; "
                                     f"{NOT_REPAIRABLE} (fetch it again from a remote)")
    return records


def _parent_cycle(repo: Repository) -> str | None:
    """A commit on a cycle of `parent` columns (only a hand-edited database has one), or None."""
    parents = dict(repo.db.execute("SELECT id, parent FROM commits").fetchall())
    done: set[str] = set()
    for start in parents:
        path: set[str] = set()
        cid = start
        while cid is not None and cid not in done:
            if cid in path:
                return cid
            path.add(cid)
            cid = parents.get(cid)
        done |= path
    return None


def _is_commit(repo: Repository, cid: str) -> bool:
    return dbm.one(repo.db, "SELECT 1 FROM commits WHERE id = ?", [cid]) is not None


def _check_refs(repo: Repository, report: FsckReport) -> None:
    commits = {r[0] for r in repo.db.execute("SELECT id FROM commits")}
    for name, target, symbolic in repo.db.execute("SELECT name, target, symbolic FROM refs"):
        if symbolic:
            if repo.refs.get(target) is None:
                report.errors.append(f"{name} points to {target}, which does not exist "
                                     "(kedit checkout a branch to set it)")
        elif target not in commits:
            report.bad_refs.append(name)
            report.errors.append(f"{name} points to {short_id(target)}, which is not a commit "
                                 "(kedit fsck --repair moves it back to its last reflog position)")
    for entry, ref, old, new in repo.db.execute("SELECT id, ref, old, new FROM reflog ORDER BY id"):
        missing = [x for x in (old, new) if x and not x.startswith("refs/") and x not in commits]
        if missing:
            report.bad_reflog.append(entry)
            report.errors.append(f"reflog entry {entry} of {ref} names {short_id(missing[0])}, which is not a commit "
                                 "(kedit fsck --repair removes the entry)")


def _check_editors(repo: Repository, report: FsckReport) -> None:
    """An editor's method is in its weights' metadata, which its id hashes; the rest of its row is not."""
    for editor_id, method in repo.db.execute("SELECT id, method FROM editors"):
        try:
            said = repo.store.get_tensors(editor_id)[1].get("method")
        except KeditError:
            continue  # a missing or damaged object: reported with the objects
        if said != method:
            report.editor_fixes[editor_id] = said
            report.errors.append(f"editor {short_id(editor_id)}: its row says method {method!r}, its weights "
                                 f"(hashed into its id) say {said!r}; kedit fsck --repair rewrites it")


def _replay_all(repo: Repository, report: FsckReport, progress: bool) -> None:
    recent = _RecentValues()
    materializer = Materializer(repo.db, repo.store, _NoCache(repo.path / "cache"), (recent.lookup,))
    pairs = repo.db.execute("""SELECT tc.commit_id, tc.name FROM tensor_changes tc JOIN commits c
                               ON c.id = tc.commit_id ORDER BY c.depth, c.created, tc.name""").fetchall()
    for cid, name in progress_bar(pairs, desc="replay", disable=not progress):
        report.tensors += 1
        hint = f"; {REPAIR_HINT}" if cid in report.bad_rows else ""
        try:
            change = history.change(repo.db, cid, name)
            value = materializer.value_of(change, use_cache=False)
        except KeditError as e:
            report.errors.append(f"commit {short_id(cid)} tensor {name}: {e}{hint}")
            continue
        except (KeyError, ValueError, RuntimeError) as e:
            report.errors.append(f"commit {short_id(cid)} tensor {name} cannot be replayed: {e}{hint}")
            continue
        if hash_tensor(value) != change.result_hash:
            continue
        recent.add(name, change.result_hash, value)
        proved = (dtype_name(value.dtype), list(value.shape))
        if proved != (change.dtype, list(change.shape)):
            report.value_fixes[(cid, name)] = proved
            report.errors.append(f"commit {short_id(cid)} tensor {name}: its row says {change.dtype} "
                                 f"{list(change.shape)}, its value (proved by hash) is {proved[0]} {proved[1]}; "
                                 "kedit fsck --repair rewrites it")


def _check_worktree(repo: Repository, report: FsckReport) -> None:
    """Re-hash every shard and file of the working model: `status` trusts size and time, fsck does not."""
    worktree = repo.worktree
    if worktree is None or worktree.commit is None:
        return
    commit = worktree.commit
    if not _is_commit(repo, commit):
        report.errors.append(f"the working model is at {short_id(commit)}, which is not a commit "
                             "(kedit checkout --force HEAD rebuilds it)")
        return
    by_hand = worktree.modified()
    if by_hand:
        report.warnings.append(f"the working model has {len(by_hand)} tensors changed by hand: "
                               + ", ".join(sorted(by_hand)[:3]) + " (kedit checkout --force HEAD discards them)")
    if commit != repo.head():
        report.warnings.append("the working model is not at HEAD (the next kedit write brings it there)")
    pending = worktree.read_index().get("pending", {})
    for name, entry in history.manifest(repo.db, commit).items():
        if name in by_hand:
            continue
        report.worktree_shards += 1
        if worktree.hash_on_disk(name) not in (entry.hash, pending.get(name)):
            report.damaged_shards.append(name)
            report.errors.append(f"working model: {shard_name(name)} does not hold {name} of {short_id(commit)} "
                                 "although its size and time say unchanged; "
                                 "kedit fsck --repair rewrites it from the objects")
    for path, blob in history.files(repo.db, commit).items():
        try:
            intact = hash_bytes((worktree.folder / path).read_bytes()) == blob
        except OSError:
            intact = False
        if not intact:
            report.damaged_files.append(path)
            report.errors.append(f"working model: {path} is missing or differs from {short_id(commit)}'s; "
                                 "kedit fsck --repair rewrites it from the objects")


def _unproved(repo: Repository) -> dict[str, int]:
    """Rows that no hash covers, counted by kind: fsck can only say they are there."""
    counts = {f"metrics fetched from {source}" if source else "metrics measured here": n
              for source, n in repo.db.execute("SELECT source, COUNT(*) FROM metrics GROUP BY source ORDER BY source")}
    for label, sql in (("probe facts", "SELECT COUNT(*) FROM probes"),
                       ("probe outputs", "SELECT COUNT(*) FROM probe_outputs"),
                       ("commit diagnostics (info)", "SELECT COUNT(*) FROM commits WHERE info NOT IN ('{}', 'null')"),
                       ("delta statistics (rank, norms, stored size)", "SELECT COUNT(*) FROM tensor_changes"),
                       ("editor training records (base, data, metrics)", "SELECT COUNT(*) FROM editors")):
        counts[label] = dbm.one(repo.db, sql)[0]
    return {k: v for k, v in counts.items() if v}


def repair(repo: Repository, *, progress: bool = False) -> FsckReport:
    """Rebuild what hashes prove (rows, refs, reflog, working model), then fsck again."""
    with repo.lock():
        found = fsck(repo, progress=progress)
        repaired: list[str] = []
        with dbm.write(repo.db):
            repaired += _repair_rows(repo, found)
            for (cid, name), (dtype, shape) in sorted(found.value_fixes.items()):
                repo.db.execute("UPDATE tensor_changes SET dtype = ?, shape = ? WHERE commit_id = ? AND name = ?",
                                [dtype, json.dumps(shape), cid, name])
                repaired.append(f"commit {short_id(cid)} tensor {name}: dtype and shape from its value")
            for editor_id, method in sorted(found.editor_fixes.items()):
                repo.db.execute("UPDATE editors SET method = ? WHERE id = ?", [method, editor_id])
                repaired.append(f"editor {short_id(editor_id)}: method from its weights' metadata")
            for entry in found.bad_reflog:
                repo.db.execute("DELETE FROM reflog WHERE id = ?", [entry])
                repaired.append(f"reflog entry {entry} removed (it named a missing commit)")
            repaired += _repair_refs(repo, found)
        repaired += _repair_worktree(repo, found)
        report = fsck(repo, progress=progress)
    report.repaired = repaired
    return report


def _repair_rows(repo: Repository, found: FsckReport) -> list[str]:
    if not found.bad_rows:
        return []
    records = {cid: record for cid, record in load_records(repo.db.execute("SELECT id, record FROM commits")).items()
               if record_id(record) == cid}
    depth = depths(records)
    bad = sorted(found.bad_rows, key=lambda c: depth.get(c) or 0)
    for cid in bad:  # parent columns first: a re-inserted change row walks them to replay its value
        rewrite_commit_columns(repo.db, cid, implied_rows(cid, records, depth))
    for cid in bad:
        rewrite_rows(repo.db, repo.store, repo.materializer.value_of, cid, implied_rows(cid, records, depth))
    return [f"commit {short_id(cid)}: its rows rewritten from its record" for cid in sorted(found.bad_rows)]


def _repair_refs(repo: Repository, found: FsckReport) -> list[str]:
    done = []
    for name in found.bad_refs:
        last = next((new for (new,) in repo.db.execute("SELECT new FROM reflog WHERE ref = ? ORDER BY id DESC", [name])
                     if new and _is_commit(repo, new)), None)
        if last is None:
            continue  # nothing proves where it was: fsck keeps reporting it
        repo.db.execute("UPDATE refs SET target = ? WHERE name = ?", [last, name])
        repo.refs.log(name, None, last, "fsck --repair: back to its last reflog position")
        done.append(f"{name} moved back to {short_id(last)}, its last reflog position")
    return done


def _repair_worktree(repo: Repository, found: FsckReport) -> list[str]:
    worktree = repo.worktree
    if worktree is None or not (found.damaged_shards or found.damaged_files):
        return []
    commit = worktree.commit
    manifest = history.manifest(repo.db, commit)
    values = {}
    for name in found.damaged_shards:
        change = history.change(repo.db, manifest[name].commit_id, name)
        values[name] = (change.result_hash, repo.materializer.value_of(change))  # verified by its hash
    blobs = history.files(repo.db, commit)
    files = {path: repo.store.get_blob(blobs[path]) for path in found.damaged_files}
    worktree.restore(values, files)
    return [f"working model: {shard_name(n)} rewritten from the objects" for n in found.damaged_shards] + [
        f"working model: {p} rewritten from the objects" for p in found.damaged_files]


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
        stack.extend(history.parents(repo.db, cid))  # both sides of a merge
        stack.extend(r[0] for r in repo.db.execute(
            "SELECT DISTINCT source_commit FROM tensor_changes WHERE commit_id = ? AND source_commit IS NOT NULL",
            [cid]))
        stack.extend(r[0] for r in repo.db.execute(
            "SELECT DISTINCT origin_commit FROM tensor_steps WHERE commit_id = ?", [cid]))
    return keep
