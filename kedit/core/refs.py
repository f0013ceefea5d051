"""Refs (HEAD, branches, tags), their reflog, and revision parsing.

Calling sequence: every change goes through `Refs.update(name, new, expected_old, message)`
inside a write transaction; the expected old value makes it a compare-and-swap, as in git's
ref transactions, so two writers cannot silently overwrite each other. Each move is logged
in the reflog, which `kedit reflog` shows and `kedit gc` treats as reachable.

Revisions: a full id, a unique prefix of at least 4 hex digits, a branch, a tag, HEAD or `@`
(HEAD), or a reflog entry `REF@{n}` (where REF pointed n moves ago, as `kedit reflog` numbers
them: `HEAD@{1}` is where HEAD was before its last move; `@{n}` is the current branch's),
followed by any number of `~N` (N first parents back), `^` (one back) or `^N` (the Nth parent:
`^2` is a merge's second parent, `^0` the commit itself). Ranges of commits
(`A..B`, `A...B`) are in kedit/core/revisions.py.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from kedit.core import db as dbm
from kedit.core.db import Database
from kedit.core.errors import RefExistsError, RefNameError, RevisionError, StaleRefError

HEAD = "HEAD"
BRANCH_PREFIX = "refs/heads/"
TAG_PREFIX = "refs/tags/"
SHORT_ID = 12  # hex digits of an id shown to people; any unique prefix of 4 or more resolves


def short_id(object_id: str) -> str:
    """The abbreviated id shown in messages and listings (`CommitInfo.short`), as git's short hashes."""
    return object_id[:SHORT_ID]
DEFAULT_BRANCH = "main"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_SUFFIX_RE = re.compile(r"(~\d*|\^\d*)")
_REFLOG_RE = re.compile(r"^(.*)@\{(\d+)\}$")
MIN_PREFIX = 4
MAX_REF_NAME = 255


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def check_ref_name(name: str, what: str = "branch") -> str:
    """Return `name` if it is a valid branch or tag name, else raise RefNameError saying why."""
    problem = None
    if not name:
        problem = "it is empty"
    elif not _NAME_RE.match(name):
        problem = "use letters, digits, '.', '_', '-' and '/' only, starting with a letter or digit"
    elif ".." in name or "//" in name or name.endswith(("/", ".", ".lock")):
        problem = "it may not contain '..' or '//', nor end with '/', '.' or '.lock'"
    elif any(part.startswith(".") for part in name.split("/")):
        problem = "no part of it may start with '.'"
    elif len(name) > MAX_REF_NAME:
        problem = f"it is longer than {MAX_REF_NAME} characters"
    elif name == HEAD:
        problem = "HEAD is reserved"
    elif name.startswith("refs/"):
        problem = "give the short name (a full ref path could not be named by any command)"
    elif re.fullmatch(r"[0-9a-fA-F]{4,32}", name):
        problem = "it looks like a commit id and would shadow one"
    if problem:
        raise RefNameError(f"invalid {what} name {name!r}: {problem}")
    return name


class Refs:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reading ---------------------------------------------------------------------------

    def get(self, name: str) -> tuple[str, bool] | None:
        row = dbm.one(self.db, "SELECT target, symbolic FROM refs WHERE name = ?", [name])
        return (row[0], bool(row[1])) if row else None

    def deref(self, name: str) -> str | None:
        """The commit a ref points to, following a symbolic HEAD; None for an unborn branch."""
        seen = 0
        ref = self.get(name)
        while ref is not None and ref[1]:
            seen += 1
            if seen > 5:
                raise RevisionError(f"symbolic ref loop at {name}", rev=name)
            ref = self.get(ref[0])
        return ref[0] if ref else None

    def head_branch(self) -> str | None:
        """The branch HEAD is on (short name), or None when HEAD is detached."""
        ref = self.get(HEAD)
        if ref and ref[1] and ref[0].startswith(BRANCH_PREFIX):
            return ref[0][len(BRANCH_PREFIX):]
        return None

    def list(self, prefix: str) -> dict[str, str]:
        found = dbm.rows(self.db, "SELECT name, target FROM refs WHERE name LIKE ? AND symbolic = 0 "
                         "ORDER BY name", [prefix + "%"])
        return {r["name"][len(prefix):]: r["target"] for r in found}

    def branches(self) -> dict[str, str]:
        return self.list(BRANCH_PREFIX)

    def tags(self) -> dict[str, str]:
        return self.list(TAG_PREFIX)

    # -- writing (call inside db.write) ----------------------------------------------------

    def update(self, name: str, new: str | None, expected_old: str | None, message: str,
               *, symbolic: bool = False) -> None:
        """Compare-and-swap `name` from `expected_old` to `new` (None deletes), and log it."""
        current = self.get(name)
        old = current[0] if current else None
        if old != expected_old:
            raise StaleRefError(
                f"{name} moved while this command ran "
                f"(expected {short_id(str(expected_old))}, found {short_id(str(old))})",
                hint="run the command again",
            )
        if new is None:
            self.db.execute("DELETE FROM refs WHERE name = ?", [name])
        else:
            self.db.execute("INSERT OR REPLACE INTO refs (name, target, symbolic) VALUES (?, ?, ?)",
                            [name, new, int(symbolic)])
        if not symbolic:  # HEAD's own reflog records commits: see log()
            self.log(name, old, new, message)

    def log(self, name: str, old: str | None, new: str | None, message: str) -> None:
        self.db.execute("INSERT INTO reflog (ref, old, new, message, created) VALUES (?, ?, ?, ?, ?)",
                        [name, old, new, message, now_iso()])

    def create(self, full_name: str, commit_id: str, message: str) -> None:
        if self.get(full_name) is not None:
            kind = "branch" if full_name.startswith(BRANCH_PREFIX) else "tag"
            short = full_name.split("/", 2)[2]
            raise RefExistsError(f"a {kind} named {short!r} already exists")
        self.update(full_name, commit_id, None, message)

    # -- revisions -------------------------------------------------------------------------

    def resolve(self, rev: str) -> str:
        """The full id of the commit `rev` names; RevisionError if none or several."""
        if not rev or not rev.strip():
            raise RevisionError("empty revision", rev=rev)
        base, suffixes = _split_revision(rev)
        commit = self._resolve_base(base, rev)
        for suffix in suffixes:
            if suffix.startswith("^") and suffix not in ("^", "^1"):  # ^N: the Nth parent (of a merge)
                n = int(suffix[1:])
                if n == 0:
                    continue
                row = dbm.one(self.db, "SELECT parent_id FROM commit_parents WHERE commit_id = ? AND seq = ?",
                              [commit, n - 1])
                if row is None:
                    raise RevisionError(f"revision {rev!r}: {short_id(commit)} has no parent number {n}", rev=rev)
                commit = row[0]
                continue
            steps = 1 if suffix in ("^", "^1", "~") else int(suffix[1:])
            for _ in range(steps):
                row = dbm.one(self.db, "SELECT parent FROM commits WHERE id = ?", [commit])
                if row is None or row[0] is None:
                    raise RevisionError(f"revision {rev!r} goes back past the initial commit", rev=rev)
                commit = row[0]
        return commit

    def _resolve_base(self, base: str, rev: str) -> str:
        if base == "@":
            base = HEAD
        reflog = _REFLOG_RE.match(base)
        if reflog:
            return self._reflog_entry(reflog.group(1), int(reflog.group(2)), rev)
        if base == HEAD or base.startswith("refs/"):
            target = self.deref(base)
            if target is None:
                raise RevisionError(f"unknown revision {rev!r}", rev=rev)
            return target
        for prefix in (BRANCH_PREFIX, TAG_PREFIX):
            target = self.deref(prefix + base)
            if target is not None:
                return target
        if re.fullmatch(r"[0-9a-fA-F]+", base) and len(base) >= MIN_PREFIX:
            found = [r[0] for r in self.db.execute(
                "SELECT id FROM commits WHERE id >= ? AND id < ? ORDER BY id LIMIT 6",
                [base.lower(), base.lower() + "g"]).fetchall()]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                shown = ", ".join(short_id(f) for f in found[:5])
                raise RevisionError(f"ambiguous revision {rev!r}: it matches {shown}", rev=rev)
        raise RevisionError(f"unknown revision {rev!r}: not a commit, branch or tag", rev=rev)


    def reflog_name(self, ref: str) -> str:
        """The full name whose reflog `ref` means: HEAD, a full ref path, or a branch's short name."""
        return ref if ref == HEAD or ref.startswith("refs/") else BRANCH_PREFIX + ref

    def _reflog_entry(self, ref: str, n: int, rev: str) -> str:
        """Where `ref` pointed `n` moves ago (`kedit reflog`'s REF@{n}); '' is the current branch."""
        if ref == "":
            branch = self.head_branch()
            ref = branch if branch is not None else HEAD
        name = self.reflog_name(HEAD if ref == "@" else ref)
        row = dbm.one(self.db, "SELECT new FROM reflog WHERE ref = ? ORDER BY id DESC LIMIT 1 OFFSET ?", [name, n])
        if row is None:
            count = dbm.one(self.db, "SELECT COUNT(*) FROM reflog WHERE ref = ?", [name])[0]
            if count == 0:
                raise RevisionError(f"unknown revision {rev!r}: {ref} has no reflog", rev=rev)
            raise RevisionError(f"unknown revision {rev!r}: the reflog of {ref} has only {count} entries", rev=rev)
        if row[0] is None:
            raise RevisionError(f"revision {rev!r}: {ref} was deleted at that point", rev=rev)
        return row[0]


def _split_revision(rev: str) -> tuple[str, list[str]]:
    match = re.search(r"(~\d*|\^\d*)+$", rev)
    if not match:
        return rev, []
    return rev[: match.start()], _SUFFIX_RE.findall(match.group(0))
