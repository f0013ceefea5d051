"""Prove the rows that restate commit records (`kedit fsck`), and rebuild them (`--repair`).

Calling sequence: `records = implied.load_records(...)`; `problems = check_rows(db, records)`
lists every row or column that differs from what its commit's record says; inside a write
transaction, `rewrite_rows(db, store, value_of, cid, rows)` makes the commit's rows say exactly
what the record says, for each commit with a problem (`rewrite_commit_columns` first for all
of them when parent columns may be wrong: replaying a value walks them).

Caveats: only what a record proves is rewritten. A change row the record names but the database
lacks is re-inserted with its dtype and shape taken from the replayed value (proved by its hash)
and its statistics (rank, norms) left empty: nothing a hash does not prove is invented.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kedit.core import history
from kedit.core.db import Database
from kedit.core.implied import COMMIT_COLUMNS, JSON_COLUMNS, ImpliedChange, ImpliedRows, depths, implied_rows
from kedit.core.refs import short_id
from kedit.core.store import ObjectStore
from kedit.core.tensors import dtype_name

REPAIR_HINT = "kedit fsck --repair rewrites it from the record"
KNOWN_KINDS = ("init", "edit", "revert", "merge")


@dataclass(frozen=True)
class RowProblem:
    commit: str
    what: str

    def __str__(self) -> str:
        return f"commit {short_id(self.commit)}: {self.what}; {REPAIR_HINT}"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return text  # unparsable text differs from any record value


class _Rows:
    """The database's rows about every commit, read in a few queries (not one per commit)."""

    def __init__(self, db: Database) -> None:
        cols = ", ".join(COMMIT_COLUMNS)
        self.commits = {r[0]: dict(zip(("id", *COMMIT_COLUMNS, "info"), r, strict=True))
                        for r in db.execute(f"SELECT id, {cols}, info FROM commits")}
        self.changes: dict[str, dict[str, list]] = {}
        for cid, name, source, result_hash, encoding in db.execute(
                "SELECT commit_id, name, source_commit, result_hash, encoding FROM tensor_changes"):
            self.changes.setdefault(cid, {})[name] = [source, result_hash, encoding, []]
        for cid, name, origin, oid, encoding in db.execute(
                "SELECT commit_id, name, origin_commit, object_id, encoding FROM tensor_steps ORDER BY seq"):
            change = self.changes.get(cid, {}).get(name)
            if change is not None:
                change[3].append((origin, oid, encoding))
        self.parents: dict[str, list[str]] = {}
        for cid, parent in db.execute("SELECT commit_id, parent_id FROM commit_parents ORDER BY seq"):
            self.parents.setdefault(cid, []).append(parent)
        self.adapter_ops: dict[str, list[tuple]] = {}
        for cid, *op in db.execute(
                "SELECT commit_id, op, object_id, kind, origin_commit FROM adapter_ops ORDER BY seq"):
            self.adapter_ops.setdefault(cid, []).append(tuple(op))
        self.files: dict[str, dict[str, str]] = {}
        for cid, path, oid in db.execute("SELECT commit_id, path, object_id FROM files"):
            self.files.setdefault(cid, {})[path] = oid
        self.memory = {cid: (method, oid) for cid, method, oid in
                       db.execute("SELECT commit_id, method, object_id FROM method_memory")}


def check_rows(db: Database, records: Mapping[str, dict]) -> dict[str, list[RowProblem]]:
    """commit id -> what its rows say that its record does not (only commits with problems)."""
    actual = _Rows(db)
    depth = depths(records)
    found: dict[str, list[RowProblem]] = {}
    for cid, record in records.items():
        if record.get("kind") not in KNOWN_KINDS:
            continue  # a newer kedit's record: fsck warns about it
        problems = [RowProblem(cid, what) for what in _differences(cid, implied_rows(cid, records, depth), actual)]
        if problems:
            found[cid] = problems
    return found


def _differences(cid: str, rows: ImpliedRows, actual: _Rows) -> list[str]:
    row = actual.commits[cid]
    out = []
    for column, expected in rows.columns.items():
        if expected is None and column in ("depth", "requests"):
            continue  # not derivable: an ancestor's record is missing (reported on its own)
        value = _json(row[column]) if column in JSON_COLUMNS else row[column]
        if value != expected:
            out.append(f"column {column} is {_short(value)}, its record says {_short(expected)}")
    if tuple(actual.parents.get(cid, [])) != rows.parents:
        out.append(f"its parent rows name {_short(actual.parents.get(cid, []))}, its record says "
                   f"{_short(list(rows.parents))}")
    if rows.reverts is not None:
        info = _json(row["info"])
        said = info.get("reverts") if isinstance(info, dict) else None
        if said != rows.reverts:
            out.append(f"info names {_short(said)} as the reverted commit, its record says {_short(rows.reverts)}")
    changes = actual.changes.get(cid, {})
    for name in sorted(set(changes) - set(rows.changes)):
        out.append(f"a change row for {name} that its record does not name")
    for name, expected_change in sorted(rows.changes.items()):
        have = changes.get(name)
        if have is None:
            out.append(f"no change row for {name}, which its record names")
            continue
        for label, value, want in (("source_commit", have[0], expected_change.source),
                                   ("result_hash", have[1], expected_change.hash),
                                   ("encoding", have[2], expected_change.encoding)):
            if value != want:
                out.append(f"tensor {name}: {label} is {_short(value)}, its record says {_short(want)}")
        if tuple(have[3]) != expected_change.steps:
            out.append(f"tensor {name}: its delta steps differ from the record's")
    if tuple(actual.adapter_ops.get(cid, [])) != rows.adapter_ops:
        out.append("its adapter rows differ from the record's")
    if actual.files.get(cid, {}) != rows.files:
        out.append("its file rows differ from the record's")
    if actual.memory.get(cid) != rows.memory:
        out.append(f"its method memory row is {_short(actual.memory.get(cid))}, its record says {_short(rows.memory)}")
    return out


ValueOf = Callable[[history.Change], torch.Tensor]


def rewrite_commit_columns(db: Database, cid: str, rows: ImpliedRows) -> None:
    """The commit row's columns, its parent rows (and a revert's target in `info`) as the record says."""
    columns = {c: (json.dumps(v) if c in JSON_COLUMNS else v) for c, v in rows.columns.items()
               if v is not None or c not in ("depth", "requests")}
    db.execute(f"UPDATE commits SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?", [*columns.values(), cid])
    db.execute("DELETE FROM commit_parents WHERE commit_id = ?", [cid])
    db["commit_parents"].insert_all([{"commit_id": cid, "seq": i, "parent_id": p} for i, p in enumerate(rows.parents)])
    if rows.reverts is not None:
        info = _json(db.execute("SELECT info FROM commits WHERE id = ?", [cid]).fetchone()[0])
        info = {**(info if isinstance(info, dict) else {}), "reverts": rows.reverts}
        db.execute("UPDATE commits SET info = ? WHERE id = ?", [json.dumps(info), cid])


def rewrite_rows(db: Database, store: ObjectStore, value_of: ValueOf, cid: str,
                 rows: ImpliedRows) -> None:
    """Make every row about `cid` say what its record says (inside the caller's write transaction)."""
    rewrite_commit_columns(db, cid, rows)
    have = {r[0] for r in db.execute("SELECT name FROM tensor_changes WHERE commit_id = ?", [cid])}
    for name in have - set(rows.changes):
        db.execute("DELETE FROM tensor_steps WHERE commit_id = ? AND name = ?", [cid, name])
        db.execute("DELETE FROM tensor_changes WHERE commit_id = ? AND name = ?", [cid, name])
    for name, change in rows.changes.items():
        db.execute("DELETE FROM tensor_steps WHERE commit_id = ? AND name = ?", [cid, name])
        if name in have:
            db.execute("UPDATE tensor_changes SET source_commit = ?, result_hash = ?, encoding = ? "
                       "WHERE commit_id = ? AND name = ?", [change.source, change.hash, change.encoding, cid, name])
        else:
            _insert_change(db, store, value_of, cid, name, change)
        db["tensor_steps"].insert_all([
            {"commit_id": cid, "name": name, "seq": i, "origin_commit": origin, "object_id": oid, "encoding": enc}
            for i, (origin, oid, enc) in enumerate(change.steps)])
    db.execute("DELETE FROM adapter_ops WHERE commit_id = ?", [cid])
    db["adapter_ops"].insert_all([
        {"commit_id": cid, "seq": i, "op": op, "object_id": oid, "kind": kind, "origin_commit": origin}
        for i, (op, oid, kind, origin) in enumerate(rows.adapter_ops)])
    db.execute("DELETE FROM files WHERE commit_id = ?", [cid])
    db["files"].insert_all([{"commit_id": cid, "path": p, "object_id": o} for p, o in rows.files.items()])
    db.execute("DELETE FROM method_memory WHERE commit_id = ?", [cid])
    if rows.memory is not None:
        db["method_memory"].insert({"commit_id": cid, "method": rows.memory[0], "object_id": rows.memory[1]})


def _insert_change(db: Database, store: ObjectStore, value_of: ValueOf, cid: str, name: str,
                   change: ImpliedChange) -> None:
    """Re-insert a change row the record names: dtype and shape from its value, proved by its hash."""
    steps = tuple(history.Step(*s) for s in change.steps)
    value = value_of(history.Change(cid, name, change.source, change.hash, "", (), change.encoding, None, None,
                                    None, 0, steps))
    db["tensor_changes"].insert({
        "commit_id": cid, "name": name, "source_commit": change.source, "result_hash": change.hash,
        "dtype": dtype_name(value.dtype), "shape": json.dumps(list(value.shape)), "encoding": change.encoding,
        "rank": None, "delta_norm": None, "rel_change": None,
        "stored_bytes": sum(store.size(s.object_id) for s in steps if s.origin == cid),
    })
