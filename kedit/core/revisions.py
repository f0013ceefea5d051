"""Sets of commits named on the command line: ranges, several revisions, and log's filters.

As in git, `A..B` is the commits reachable from B but not from A, `A...B` those reachable from
exactly one of them, `^A` excludes A's history, and an empty side means HEAD (`main..` is
`main..HEAD`). Reachable means over all parents of a commit (both sides of a merge). `diff A...B`
compares B with the merge base of A and B (their nearest common ancestor).

Calling sequence: `select(db, refs, specs)` gives the commit ids newest first, and
`CommitFilter(...).keep(row)` narrows them (log's --grep, --author, --since/--until, --subject,
--method). Single revisions are resolved by `refs.Refs.resolve`. No torch import: the CLI's
`log` stays fast.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kedit.core.db import Database
from kedit.core.errors import KeditError, RevisionError
from kedit.core.refs import HEAD, Refs

_REACHABLE = """
WITH RECURSIVE reach(id) AS (
    SELECT value FROM json_each(:starts)
    UNION
    SELECT p.parent_id FROM commit_parents p JOIN reach ON p.commit_id = reach.id
)
SELECT id FROM reach
"""


def reachable(db: Database, starts: Iterable[str]) -> set[str]:
    """Every commit reachable from `starts` (themselves included), over all parents."""
    starts = list(starts)
    if not starts:
        return set()
    return {r[0] for r in db.execute(_REACHABLE, {"starts": json.dumps(starts)})}


def split_range(spec: str) -> tuple[str, str, str] | None:
    """('A', '..' or '...', 'B') for a range, with HEAD for an empty side; None for one revision.
    (Ref names may not hold '..', so the split is unambiguous.)"""
    match = re.fullmatch(r"(.*?)(\.\.\.?)(.*)", spec)
    if match is None:
        return None
    left, dots, right = match.groups()
    return left or HEAD, dots, right or HEAD


def select(db: Database, refs: Refs, specs: Iterable[str]) -> list[str]:
    """The commits `specs` name together (`kedit log main exp`, `A..B`, `A...B`, `^A`), newest first."""
    specs = list(specs)
    include: set[str] = set()
    exclude: set[str] = set()
    if len(specs) == 1 and split_range(specs[0]) is None and not specs[0].startswith("^"):
        return [r[0] for r in db.execute(  # one history: child before parent, whatever the clocks said
            "SELECT id FROM commits WHERE id IN (SELECT value FROM json_each(?)) ORDER BY depth DESC",
            [json.dumps(sorted(reachable(db, [refs.resolve(specs[0])])))])]
    for spec in specs:
        parts = split_range(spec)
        if parts is None and spec.startswith("^"):
            exclude |= reachable(db, [refs.resolve(spec[1:])])
        elif parts is None:
            include |= reachable(db, [refs.resolve(spec)])
        elif parts[1] == "..":
            exclude |= reachable(db, [refs.resolve(parts[0])])
            include |= reachable(db, [refs.resolve(parts[2])])
        else:
            left, right = reachable(db, [refs.resolve(parts[0])]), reachable(db, [refs.resolve(parts[2])])
            include |= left ^ right
    return newest_first(db, include - exclude)


def newest_first(db: Database, ids: set[str]) -> list[str]:
    """`ids` by creation time, newest first (a child before its parent when the times tie)."""
    rows = db.execute("SELECT id, created, depth FROM commits WHERE id IN (SELECT value FROM json_each(?))",
                      [json.dumps(sorted(ids))]).fetchall()
    return [cid for cid, _, _ in sorted(rows, key=lambda r: (_when(r[1]), r[2]), reverse=True)]


def merge_base(db: Database, a: str, b: str) -> str | None:
    """The nearest common ancestor of `a` and `b` (None when their histories are unrelated)."""
    common = reachable(db, [a]) & reachable(db, [b])
    return newest_first(db, common)[0] if common else None


def diff_endpoints(refs: Refs, db: Database, rev_a: str, rev_b: str | None) -> tuple[str, str]:
    """The two commits `kedit diff` compares: REV_A REV_B, `A..B` (A with B) or `A...B` (the
    merge base of A and B with B); REV_B defaults to HEAD."""
    parts = split_range(rev_a)
    if parts is None:
        return refs.resolve(rev_a), refs.resolve(rev_b or HEAD)
    if rev_b is not None:
        raise RevisionError(f"give either a range or two revisions, not {rev_a!r} and {rev_b!r}", rev=rev_b)
    left, dots, right = parts
    a, b = refs.resolve(left), refs.resolve(right)
    if dots == "...":
        base = merge_base(db, a, b)
        if base is None:
            raise RevisionError(f"{left} and {right} have no common ancestor", rev=rev_a)
        a = base
    return a, b


# -- log's filters ---------------------------------------------------------------------------


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """A point in time for --since/--until: an ISO date or time (UTC unless it says otherwise),
    or an age such as '2 weeks ago', '3d' or '12 hours'."""
    now = now or datetime.now(UTC)
    age = re.fullmatch(r"\s*(\d+)\s*(s|sec|second|m|min|minute|h|hour|d|day|w|week)s?(\s+ago)?\s*", text)
    if age:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[age.group(2)[0]]
        return now - timedelta(**{unit: int(age.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise KeditError(f"{text!r} is not a date: give an ISO date (2026-12-01, 2026-12-01T09:30) "
                         "or an age (2 weeks ago, 3d, 12h)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _when(created: str) -> datetime:
    when = datetime.fromisoformat(created)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _pattern(text: str | None, option: str) -> re.Pattern[str] | None:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as e:
        raise KeditError(f"{option} {text!r} is not a regular expression ({e})") from None


@dataclass
class CommitFilter:
    """log's filters; a commit is kept when it passes every one given (as in git)."""

    grep: str | None = None  # a regular expression searched in the message
    author: str | None = None  # a regular expression searched in the author
    since: datetime | None = None
    until: datetime | None = None
    subject: str | None = None  # an edit request names this subject (case-insensitive)
    method: str | None = None  # the editing method (case-insensitive)

    def __post_init__(self) -> None:
        self._grep = _pattern(self.grep, "--grep")
        self._author = _pattern(self.author, "--author")

    def keep(self, row: dict[str, Any]) -> bool:
        """`row`: a commits row (message, author, created, method, requests as JSON text)."""
        created = _when(row["created"])
        if (self.since is not None and created < self.since) or (self.until is not None and created > self.until):
            return False
        if self._grep is not None and not self._grep.search(row["message"]):
            return False
        if self._author is not None and not self._author.search(row["author"]):
            return False
        if self.method is not None and (row["method"] or "").lower() != self.method.lower():
            return False
        if self.subject is not None:
            subjects = {str(r.get("subject", "")).lower() for r in json.loads(row["requests"] or "[]")
                        if isinstance(r, dict)}
            return self.subject.lower() in subjects
        return True


def filtered(db: Database, ids: list[str], keep: CommitFilter, limit: int | None = None) -> list[str]:
    """The commits of `ids` (in that order) that `keep` keeps, at most `limit` of them."""
    if keep == CommitFilter():
        return ids[:limit]
    out: list[str] = []
    for cid in ids:
        if limit is not None and len(out) >= limit:
            break
        row = db.execute("SELECT message, author, created, method, requests FROM commits WHERE id = ?",
                         [cid]).fetchone()
        if row and keep.keep(dict(zip(("message", "author", "created", "method", "requests"), row, strict=True))):
            out.append(cid)
    return out
