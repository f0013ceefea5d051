"""The database's tables beside the commit graph: remotes and what was last seen of their branches,
the probe suite and the probe outputs kept per commit, trained editors' records.

The layers above (kedit.hub.remotes, kedit.eval.probes, kedit.edit.trained, kedit.hub) keep the rules
(names, URLs, protocols); these functions are the rows they read and write, so that no SQL lives
outside kedit.core. Writers are called inside `db.write`, as the caller's transaction decides what
goes together (a fetch records commits, tracking rows and probes at once).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kedit.core import db as dbm
from kedit.core.db import Database
from kedit.core.refs import now_iso

EDITOR_FIELDS = ("id", "method", "base_commit", "data_hash", "hparams", "metrics", "created")

# -- remotes -------------------------------------------------------------------------------


def remote_names(db: Database) -> list[str]:
    return [r[0] for r in db.execute("SELECT name FROM remotes ORDER BY name")]


def remote_row(db: Database, name: str) -> tuple[str, str | None] | None:
    """(url, token_env) of the remote `name`, or None."""
    return dbm.one(db, "SELECT url, token_env FROM remotes WHERE name = ?", [name])


def insert_remote(db: Database, name: str, url: str, token_env: str | None) -> None:
    db.execute("INSERT INTO remotes (name, url, created, token_env) VALUES (?, ?, ?, ?)",
               [name, url, now_iso(), token_env])


def delete_remote(db: Database, name: str, ref_prefix: str) -> None:
    """The remote, its branches' rows (by cascade) and every ref under `ref_prefix` (its tracking refs)."""
    db.execute("DELETE FROM refs WHERE substr(name, 1, ?) = ?", [len(ref_prefix), ref_prefix])  # LIKE would treat _
    db.execute("DELETE FROM remotes WHERE name = ?", [name])


def remote_branch_row(db: Database, remote: str, branch: str, ref: str) -> tuple[str, str, str | None] | None:
    """(kedit commit at `ref`, Hub commit, checkpoint commit) of a remote branch, or None."""
    return dbm.one(db, """SELECT r.target, b.hub_commit, b.checkpoint_commit FROM remote_branches b
                          JOIN refs r ON r.name = ? WHERE b.remote = ? AND b.branch = ?""", [ref, remote, branch])


def remote_branch_names(db: Database, remote: str) -> list[str]:
    return [r[0] for r in db.execute("SELECT branch FROM remote_branches WHERE remote = ?", [remote])]


def put_remote_branch(db: Database, remote: str, branch: str, hub_commit: str, checkpoint: str | None) -> None:
    db.execute("INSERT OR REPLACE INTO remote_branches (remote, branch, hub_commit, checkpoint_commit, updated) "
               "VALUES (?, ?, ?, ?, ?)", [remote, branch, hub_commit, checkpoint, now_iso()])


# -- probes --------------------------------------------------------------------------------


def insert_probes(db: Database, rows: Iterable[Mapping[str, Any]]) -> None:
    """Probes (kind, prompt, answer, commit_id, created) not already there."""
    for row in rows:  # (not INSERT OR IGNORE: UNIQUE holds rows with a NULL commit id apart)
        db.execute("""INSERT INTO probes (kind, prompt, answer, commit_id, created)
                      SELECT :kind, :prompt, :answer, :commit_id, :created WHERE NOT EXISTS (
                          SELECT 1 FROM probes WHERE kind = :kind AND prompt = :prompt
                          AND answer = :answer AND commit_id IS :commit_id)""", dict(row))


def probe_rows(db: Database) -> list[tuple[int, str, str, str, str | None]]:
    """(id, kind, prompt, answer, commit_id) of every probe, in the order they were added."""
    return db.execute("SELECT id, kind, prompt, answer, commit_id FROM probes ORDER BY id").fetchall()


def delete_probe(db: Database, probe_id: int) -> bool:
    """Whether there was such a probe."""
    return db.execute("DELETE FROM probes WHERE id = ?", [probe_id]).rowcount > 0


def probe_outputs_at(db: Database, commit_id: str, setting: str) -> list[tuple[int, str, float]]:
    """(probe id, output as JSON, score) kept at a commit under `setting`."""
    return db.execute("SELECT probe_id, predicted, accuracy FROM probe_outputs WHERE commit_id = ? AND setting = ?",
                      [commit_id, setting]).fetchall()


def put_probe_outputs(db: Database, rows: Iterable[tuple[int, str, str, str, float]]) -> None:
    """Keep (probe id, commit, setting, output as JSON, score) rows, replacing any with the same key."""
    db.conn.executemany("INSERT OR REPLACE INTO probe_outputs VALUES (?, ?, ?, ?, ?)", list(rows))


def probe_outputs_of_commits(db: Database, commit_ids: Sequence[str]) -> list[tuple[str, int, str, str, float]]:
    """(commit, probe id, setting, output as JSON, score) kept at these commits, by probe and setting."""
    marks = ", ".join("?" * len(commit_ids))
    return db.execute(f"SELECT commit_id, probe_id, setting, predicted, accuracy FROM probe_outputs "
                      f"WHERE commit_id IN ({marks}) ORDER BY probe_id, setting", list(commit_ids)).fetchall()


def probe_outputs_of_probe(db: Database, probe_id: int, setting: str,
                           commit_ids: Sequence[str]) -> list[tuple[str, str, float]]:
    """(commit, output as JSON, score) of one probe under `setting`, at those of these commits that keep one."""
    marks = ", ".join("?" * len(commit_ids))
    return db.execute(f"SELECT commit_id, predicted, accuracy FROM probe_outputs WHERE probe_id = ? AND setting = ? "
                      f"AND commit_id IN ({marks})", [probe_id, setting, *commit_ids]).fetchall()


# -- trained editors -----------------------------------------------------------------------


def editor_rows(db: Database, method: str | None = None) -> list[dict[str, Any]]:
    """Editors' records (EDITOR_FIELDS), newest first; only `method`'s when given."""
    sql = (f"SELECT {', '.join(EDITOR_FIELDS)} FROM editors" + (" WHERE method = ?" if method else "")
           + " ORDER BY created DESC, rowid DESC")
    return dbm.rows(db, sql, [method] if method else [])


def editor_rows_by_prefix(db: Database, prefix: str) -> list[dict[str, Any]]:
    """Editors' records whose id starts with `prefix` (lower case hex)."""
    return dbm.rows(db, f"SELECT {', '.join(EDITOR_FIELDS)} FROM editors WHERE substr(id, 1, ?) = ?",
                    [len(prefix), prefix])


def has_editor(db: Database, editor_id: str) -> bool:
    return dbm.one(db, "SELECT 1 FROM editors WHERE id = ?", [editor_id]) is not None


def insert_editor(db: Database, row: Mapping[str, str]) -> None:
    """An editor's record (EDITOR_FIELDS); one already there under its id is kept."""
    db.execute(f"INSERT OR IGNORE INTO editors ({', '.join(EDITOR_FIELDS)}) VALUES "
               f"({', '.join('?' * len(EDITOR_FIELDS))})", [row[k] for k in EDITOR_FIELDS])


def commits_using_editor(db: Database, editor_id: str) -> list[str]:
    """The commits made with this editor (named in their hyper-parameters), oldest first."""
    return [r[0] for r in db.execute(
        "SELECT id FROM commits WHERE json_extract(hparams, '$.editor') = ? ORDER BY depth", [editor_id])]
