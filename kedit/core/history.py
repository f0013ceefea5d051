"""Read-only queries over the commit graph: manifests, tensor changes, effective deltas.

A commit changes some tensors. Each change says where its value starts (`source_commit`: the
value that tensor had at that commit, or nothing for a replacement) and which stored delta
steps are applied to it, in order. The value of a tensor at a commit is the value of the
latest change to it along the first-parent chain, so history is never rewritten: a revert
is a new change whose steps are the old ones without the reverted commit's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kedit.core import db as dbm
from kedit.core.db import Database
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


def edits_in_effect(db: Database, commit_id: str) -> set[str]:
    """Edit commits whose change is in effect at `commit_id` (reverts and re-applies followed)."""
    sql = _ANCESTORS + "SELECT c.id, c.kind, c.info FROM anc JOIN commits c ON c.id = anc.id ORDER BY anc.dist DESC"
    active: set[str] = set()
    kinds: dict[str, str] = {}
    reverts: dict[str, str | None] = {}
    for cid, kind, info in db.execute(sql, {"commit": commit_id}):
        kinds[cid] = kind
        if kind == "edit":
            active.add(cid)
        elif kind == "revert":
            target = reverts[cid] = json.loads(info or "{}").get("reverts")
            if target in active:
                active.discard(target)
            elif target and kinds.get(target) == "revert":  # a revert of a revert re-applies the edit
                active.add(reverts[target])
    return active


def method_memory(db: Database, commit_id: str, method: str) -> list[tuple[str, str]]:
    """(commit, object) of `method`'s memory for the commits in effect at `commit_id`, oldest first."""
    sql = _ANCESTORS + """
        SELECT m.commit_id, m.object_id FROM anc JOIN method_memory m ON m.commit_id = anc.id
        WHERE m.method = :method ORDER BY anc.dist DESC"""
    rows = db.execute(sql, {"commit": commit_id, "method": method}).fetchall()
    if not rows:
        return []
    live = edits_in_effect(db, commit_id)
    return [(cid, oid) for cid, oid in rows if cid in live]


@dataclass(frozen=True)
class AdapterRef:
    object_id: str
    kind: str
    origin: str


def adapter_ops(db: Database, commit_id: str) -> list[tuple[str, str, str]]:
    """(op, object id, kind) of the adapter operations one commit made ("add" or "remove"), in order."""
    return db.execute("SELECT op, object_id, kind FROM adapter_ops WHERE commit_id = ? ORDER BY seq",
                      [commit_id]).fetchall()


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
