"""The database rows that a commit's hashed record implies, derived from the records alone.

A commit's id is the hash of its record (the canonical JSON kept in `commits.record`). Every
other row about the commit restates part of that record so that queries stay fast: the commit
row's columns (parent, depth, kind, method, hparams, requests, message, author, created), its
parents (`commit_parents`: every parent, for a merge both), its tensor changes and their steps,
adapter operations, files and method memory. `implied_rows` derives them, so `kedit fsck` can
prove each row and `kedit fsck --repair` rebuild it.

Caveats: a revert's record names the commit it reverts; its `requests` column is that commit's
requests, so it is derived through the reverted record. What no record holds (metrics, probe
outputs, the method's diagnostics in `info`, delta statistics) is not derived here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Commit columns that hold JSON: compared as values, not as text (the text is not hashed).
JSON_COLUMNS = ("hparams", "requests")
COMMIT_COLUMNS = ("parent", "depth", "kind", "method", "hparams", "requests", "message", "author", "created")


@dataclass(frozen=True)
class ImpliedChange:
    source: str | None
    hash: str
    encoding: str
    steps: tuple[tuple[str, str, str], ...]  # (origin commit, object id, encoding), in order


@dataclass(frozen=True)
class ImpliedRows:
    columns: dict[str, Any]  # COMMIT_COLUMNS -> value (JSON columns as parsed values)
    parents: tuple[str, ...]  # every parent, in order (the `commit_parents` rows)
    reverts: str | None  # a revert's target, restated in `info` (history.edits_in_effect reads it)
    changes: dict[str, ImpliedChange]
    adapter_ops: tuple[tuple[str, str, str, str], ...]  # (op, object id, kind, origin commit)
    files: dict[str, str]  # path -> blob id
    memory: tuple[str, str] | None  # (method, object id)


def load_records(rows: Any) -> dict[str, dict[str, Any]]:
    """commit id -> parsed record, from (id, record text) rows; unparsable records are left out."""
    records = {}
    for cid, text in rows:
        try:
            record = json.loads(text)
        except ValueError:
            continue
        if isinstance(record, dict):
            records[cid] = record
    return records


def parent_of(record: Mapping[str, Any]) -> str | None:
    parents = record.get("parents") or []
    return parents[0] if parents else None


def parents_of(record: Mapping[str, Any]) -> tuple[str, ...]:
    """All parents a record names, the first parent first (a merge names two)."""
    return tuple(record.get("parents") or [])


def depths(records: Mapping[str, Mapping[str, Any]]) -> dict[str, int | None]:
    """First-parent distance from the initial commit; None where a parent's record is missing."""
    found: dict[str, int | None] = {}
    for start in records:
        chain: list[str] = []
        cid: str | None = start
        while cid is not None and cid not in found and cid in records and cid not in chain:
            chain.append(cid)
            cid = parent_of(records[cid])
        base = -1 if cid is None else found.get(cid)
        for c in reversed(chain):
            base = None if base is None else base + 1
            found[c] = base
    return found


def _requests(cid: str, records: Mapping[str, Mapping[str, Any]]) -> list[Any] | None:
    """An edit's requests; a revert restates those of the edit it reverts (through revert chains)."""
    seen: set[str] = set()
    while cid in records and cid not in seen:
        seen.add(cid)
        record = records[cid]
        if record.get("kind") != "revert":
            return list(record.get("requests", []))
        cid = record.get("reverts", "")
    return None  # the reverted commit's record is missing: nothing proves the column


def implied_rows(cid: str, records: Mapping[str, Mapping[str, Any]],
                 depth: Mapping[str, int | None]) -> ImpliedRows:
    """Every row about commit `cid` that its record (and its ancestors' records) prove."""
    record = records[cid]
    kind = record.get("kind")
    is_edit = kind == "edit"

    def own(origin: str) -> str:
        return origin or cid  # an edit's record names itself as "" (its id is not known yet)

    columns = {
        "parent": parent_of(record), "depth": depth.get(cid), "kind": kind,
        "method": record.get("method") if is_edit else None,
        "hparams": record.get("hparams", {}) if is_edit else {},
        "requests": _requests(cid, records),
        "message": record.get("message"), "author": record.get("author"), "created": record.get("created"),
    }
    changes = {}
    for name, t in record.get("tensors", {}).items():
        steps = tuple((own(o), oid, enc) for o, oid, enc in t["steps"])
        encoding = {"init": "exact", "revert": "replay", "merge": "replay"}.get(kind, steps[-1][2] if steps else "")
        changes[name] = ImpliedChange(t["source"], t["hash"], encoding, steps)
    memory = record.get("memory")
    return ImpliedRows(
        columns=columns, parents=parents_of(record), reverts=record.get("reverts") if kind == "revert" else None,
        changes=changes,
        adapter_ops=tuple((op, oid, k, own(origin)) for op, oid, k, origin in record.get("adapters", [])),
        files=dict(record.get("files", {})),
        memory=(record.get("method") or "", memory) if memory else None,
    )
