"""Helpers shared by the engine robustness tests (crash safety, CLI errors, bad inputs)."""

from __future__ import annotations

from click.testing import CliRunner, Result

from kedit.cli import cli
from kedit.core.repo import Repository


def snapshot(repo: Repository) -> dict:
    """Everything a refused command must leave alone: refs, reflog, commits (every column), stored objects,
    probes and editors."""
    refs = sorted(tuple(r) for r in repo.db.execute("SELECT name, target, symbolic FROM refs"))
    reflog = repo.db.execute("SELECT COUNT(*) FROM reflog").fetchone()[0]
    commits = repo.db.execute("SELECT COUNT(*) FROM commits").fetchone()[0]
    commit_rows = repo.db.execute("SELECT * FROM commits ORDER BY id").fetchall()
    counts = {table: repo.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
              for table in ("probes", "editors", "metrics", "method_memory")}
    objects = sorted(oid for oid, _kind, _path in repo.store.iter_objects())
    return {"head": repo.head(), "branch": repo.head_branch(), "refs": refs, "reflog": reflog,
            "commits": commits, "commit_rows": commit_rows, "log": len(repo.log()), "objects": objects, **counts}


def kedit(*args: str, repo: Repository | None = None) -> Result:
    argv = (["--repo", str(repo.root)] if repo is not None else []) + list(args)
    return CliRunner().invoke(cli, argv)


def refused(*args: str, repo: Repository | None = None, code: int = 1) -> str:
    """Run a command that must fail cleanly; return its one error line."""
    result = kedit(*args, repo=repo)
    assert result.exit_code == code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), f"an exception escaped: {result.exception!r}"
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {result.stderr!r}"
    assert lines[0].startswith("kedit: error: "), lines[0]
    assert "internal error" not in lines[0], lines[0]  # an unexpected exception type, i.e. a bug
    return lines[0]
