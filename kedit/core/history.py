"""Read-only queries over the commit graph: manifests, tensor changes, effective deltas.

A commit changes some tensors. Each change says where its value starts (`source_commit`: the
value that tensor had at that commit, or nothing for a replacement) and which stored delta
steps are applied to it, in order. The value of a tensor at a commit is the value of the
latest change to it along the first-parent chain, so history is never rewritten: a revert
is a new change whose steps are the old ones without the reverted commit's, and a merge commit
records a change for every tensor whose value differs from its first parent's (its steps are
the other side's, applied after the first parent's), so first-parent walks give every value.
Reachability (what a branch contains, what gc keeps) goes over all parents (`revisions.reachable`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from kedit.core import db as dbm
from kedit.core.db import Database
from kedit.core.revisions import reachable
from kedit.core.tensors import DTYPE_SIZES


@dataclass(frozen=True)
class Step:
    origin: str  # the commit that introduced this delta
    object_id: str
    encoding: str  # lowrank | dense | exact


@dataclass(frozen=True)
class Change:
    commit_id: str
    name: str
    source_commit: str | None
    result_hash: str
    dtype: str
    shape: tuple[int, ...]
    encoding: str
    rank: int | None
    delta_norm: float | None
    rel_change: float | None
    stored_bytes: int
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class ManifestEntry:
    hash: str
    commit_id: str  # the commit whose change defines this value
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES.get(self.dtype, 4)
        for dim in self.shape:
            n *= dim
        return n


_ANCESTORS = """
WITH RECURSIVE anc(id, parent, dist) AS (
    SELECT id, parent, 0 FROM commits WHERE id = :commit
    UNION ALL
    SELECT c.id, c.parent, anc.dist + 1 FROM commits c JOIN anc ON c.id = anc.parent
)
"""


def ancestors(db: Database, commit_id: str) -> list[str]:
    """First-parent ancestors of a commit, itself first."""
    return [r[0] for r in db.execute(_ANCESTORS + "SELECT id FROM anc ORDER BY dist", {"commit": commit_id})]


def parents(db: Database, commit_id: str) -> list[str]:
    """A commit's parents in order (the first parent first; two for a merge)."""
    return [r[0] for r in db.execute("SELECT parent_id FROM commit_parents WHERE commit_id = ? ORDER BY seq",
                                     [commit_id])]


def oldest_first(db: Database, ids: Iterable[str]) -> list[str]:
    """`ids` by first-parent depth, then creation time: a commit after its first parent."""
    rows = db.execute("SELECT id, depth, created FROM commits WHERE id IN (SELECT value FROM json_each(?))",
                      [json.dumps(sorted(set(ids)))]).fetchall()
    return [cid for cid, _, _ in sorted(rows, key=lambda r: (r[1], r[2], r[0]))]


def manifest(db: Database, commit_id: str) -> dict[str, ManifestEntry]:
    """Every tensor of the model at `commit_id`: its hash and the change that made it."""
    sql = _ANCESTORS + """
        SELECT tc.name, tc.result_hash, tc.commit_id, tc.dtype, tc.shape, MIN(anc.dist)
        FROM anc JOIN tensor_changes tc ON tc.commit_id = anc.id GROUP BY tc.name ORDER BY tc.name"""
    return {
        name: ManifestEntry(h, c, dtype, _shape(shape))
        for name, h, c, dtype, shape, _ in db.execute(sql, {"commit": commit_id})
    }


def _shape(text: str) -> tuple[int, ...]:
    """'[576, 1536]' -> (576, 1536); faster than json.loads on the checkout path."""
    inner = text.strip()[1:-1]
    return tuple(int(x) for x in inner.split(",")) if inner.strip() else ()


def files(db: Database, commit_id: str) -> dict[str, str]:
    """Config and tokenizer files at `commit_id`: path -> blob id."""
    sql = _ANCESTORS + """
        SELECT f.path, f.object_id, MIN(anc.dist) FROM anc JOIN files f ON f.commit_id = anc.id
        GROUP BY f.path ORDER BY f.path"""
    return {path: oid for path, oid, _ in db.execute(sql, {"commit": commit_id})}


def changes(db: Database, commit_id: str) -> list[Change]:
    """The tensor changes a commit itself made."""
    names = [r[0] for r in db.execute(
        "SELECT name FROM tensor_changes WHERE commit_id = ? ORDER BY name", [commit_id])]
    return [change(db, commit_id, n) for n in names]


def change(db: Database, commit_id: str, name: str) -> Change:
    row = dbm.one(db, """SELECT source_commit, result_hash, dtype, shape, encoding, rank, delta_norm,
                                rel_change, stored_bytes
                         FROM tensor_changes WHERE commit_id = ? AND name = ?""", [commit_id, name])
    if row is None:
        raise KeyError((commit_id, name))
    steps = tuple(Step(*s) for s in db.execute(
        "SELECT origin_commit, object_id, encoding FROM tensor_steps WHERE commit_id = ? AND name = ? "
        "ORDER BY seq", [commit_id, name]))
    source, result_hash, dtype, shape, encoding, rank, norm, rel, stored = row
    return Change(commit_id, name, source, result_hash, dtype, tuple(json.loads(shape)), encoding, rank,
                  norm, rel, stored, steps)


def defining_change(db: Database, commit_id: str, name: str) -> Change | None:
    """The change that gives `name` its value at `commit_id` (the latest along first parents)."""
    sql = _ANCESTORS + """
        SELECT tc.commit_id FROM anc JOIN tensor_changes tc ON tc.commit_id = anc.id
        WHERE tc.name = :name ORDER BY anc.dist LIMIT 1"""
    row = db.execute(sql, {"commit": commit_id, "name": name}).fetchone()
    return change(db, row[0], name) if row else None


def defining_chain(db: Database, commit_id: str, name: str) -> list[Change]:
    """The changes whose steps produce `name` at `commit_id`, oldest first: from its first
    replacement on, each change's source value being the previous one's result."""
    chain: list[Change] = []
    current = defining_change(db, commit_id, name)
    while current is not None:
        chain.append(current)
        if current.source_commit is None:
            break
        current = defining_change(db, current.source_commit, name)
    return chain[::-1]


def edits_in_effect(db: Database, commit_id: str,
                    _memo: dict[str, frozenset[str]] | None = None) -> set[str]:
    """Edit commits whose change is in effect at `commit_id` (reverts, re-applies and merges followed).

    A merge keeps what either side has of what came after their merge base, and drops what
    either side removed of the merge base's and what it left out of a conflict (as its compose
    arithmetic does)."""
    memo = {} if _memo is None else _memo
    if commit_id in memo:
        return set(memo[commit_id])
    sql = _ANCESTORS + ("SELECT c.id, c.kind, c.info, c.record FROM anc JOIN commits c ON c.id = anc.id "
                        "ORDER BY anc.dist DESC")
    active: set[str] = set()
    for cid, kind, info, record in db.execute(sql, {"commit": commit_id}).fetchall():
        if kind == "edit":
            active.add(cid)
        elif kind == "revert":
            target = json.loads(info or "{}").get("reverts")
            if target in active:
                active.discard(target)
            elif target and _kind(db, target) == "revert":  # a revert of a revert re-applies the edit
                active.add(json.loads(_info(db, target)).get("reverts"))
        elif kind == "merge":
            rec = json.loads(record)
            other = set(edits_in_effect(db, rec["parents"][1], memo))
            base = set(edits_in_effect(db, rec["merge_base"], memo)) if rec.get("merge_base") else set()
            active = (active | other) - ((base - active) | (base - other)) - set(rec.get("dropped", []))
        memo[cid] = frozenset(active)
    return active


def _kind(db: Database, cid: str) -> str | None:
    row = db.execute("SELECT kind FROM commits WHERE id = ?", [cid]).fetchone()
    return row[0] if row else None


def _info(db: Database, cid: str) -> str:
    row = db.execute("SELECT info FROM commits WHERE id = ?", [cid]).fetchone()
    return (row[0] if row else None) or "{}"


def method_memory(db: Database, commit_id: str, method: str) -> list[tuple[str, str]]:
    """(commit, object) of `method`'s memory for the commits in effect at `commit_id`, oldest first
    (over all parents: a merge brings the other side's memory)."""
    rows = db.execute("SELECT commit_id, object_id FROM method_memory WHERE method = ?", [method]).fetchall()
    if not rows:
        return []
    live = edits_in_effect(db, commit_id) & reachable(db, [commit_id])
    objects = {cid: oid for cid, oid in rows if cid in live}
    return [(cid, objects[cid]) for cid in oldest_first(db, objects)]


@dataclass(frozen=True)
class AdapterRef:
    object_id: str
    kind: str
    origin: str


def adapter_ops(db: Database, commit_id: str) -> list[tuple[str, str, str]]:
    """(op, object id, kind) of the adapter operations one commit made ("add" or "remove"), in order."""
    return db.execute("SELECT op, object_id, kind FROM adapter_ops WHERE commit_id = ? ORDER BY seq",
                      [commit_id]).fetchall()


def adapter_op_rows(db: Database, commit_id: str) -> list[tuple[str, str, str, str]]:
    """(op, object id, kind, origin commit) of one commit's adapter operations, in order, as stored."""
    return db.execute("SELECT op, object_id, kind, origin_commit FROM adapter_ops WHERE commit_id = ? ORDER BY seq",
                      [commit_id]).fetchall()


def own_files(db: Database, commit_id: str) -> dict[str, str]:
    """The files one commit itself recorded (path -> blob id), not those it inherits."""
    return dict(db.execute("SELECT path, object_id FROM files WHERE commit_id = ? ORDER BY path", [commit_id]))


def own_memory(db: Database, commit_id: str) -> tuple[str, str] | None:
    """(method, object id) of the memory one commit stored, or None."""
    return db.execute("SELECT method, object_id FROM method_memory WHERE commit_id = ?", [commit_id]).fetchone()


def record(db: Database, commit_id: str) -> str:
    """The canonical JSON a commit's id is the hash of, as stored."""
    return db.execute("SELECT record FROM commits WHERE id = ?", [commit_id]).fetchone()[0]


def exists(db: Database, commit_id: str) -> bool:
    return db.execute("SELECT 1 FROM commits WHERE id = ?", [commit_id]).fetchone() is not None


def count_commits(db: Database) -> int:
    return db.execute("SELECT COUNT(*) FROM commits").fetchone()[0]


def adapters(db: Database, commit_id: str) -> list[AdapterRef]:
    """Adapters in effect at `commit_id`, in the order they were added."""
    sql = _ANCESTORS + """
        SELECT a.op, a.object_id, a.kind, a.origin_commit FROM anc JOIN adapter_ops a ON a.commit_id = anc.id
        ORDER BY anc.dist DESC, a.seq"""
    active: list[AdapterRef] = []
    for op, object_id, kind, origin in db.execute(sql, {"commit": commit_id}):
        ref = AdapterRef(object_id, kind, origin)
        if op == "add":
            active.append(ref)
        elif ref in active:
            active.remove(ref)
    return active
