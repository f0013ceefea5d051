"""Helpers shared by the engine robustness tests (crash safety, CLI errors)."""

from __future__ import annotations

from kedit.repo import Repository


def snapshot(repo: Repository) -> dict:
    """Everything a refused command must leave alone: refs, reflog, commits, stored objects."""
    refs = sorted(tuple(r) for r in repo.db.execute("SELECT name, target, symbolic FROM refs"))
    reflog = repo.db.execute("SELECT COUNT(*) FROM reflog").fetchone()[0]
    commits = repo.db.execute("SELECT COUNT(*) FROM commits").fetchone()[0]
    objects = sorted(oid for oid, _kind, _path in repo.store.iter_objects())
    return {"head": repo.head(), "branch": repo.head_branch(), "refs": refs, "reflog": reflog,
            "commits": commits, "log": len(repo.log()), "objects": objects}
