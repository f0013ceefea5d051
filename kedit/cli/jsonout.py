"""The one JSON convention of `--json`: every document is an object that starts with its format
version (`kedit_json`), and a commit has the same shape wherever it appears (log, show, edit,
revert, init). The keys each command prints are listed in the README ("JSON output"), and a test
holds every command to that list.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from kedit.core.repo import CommitInfo

JSON_VERSION = 1  # raise when a key changes meaning or goes away; new keys keep the version


def emit_json(**fields: Any) -> None:
    """Print one document: `{"kedit_json": 1, ...fields}`."""
    click.echo(json.dumps({"kedit_json": JSON_VERSION, **fields}, indent=2, default=str))


def commit_json(commit: CommitInfo, refs: list[str] | None = None) -> dict[str, Any]:
    """A commit as every command shows it: record, metrics, and the refs that point at it."""
    return {"id": commit.id, "short": commit.short, "parents": list(commit.parents),
            "depth": commit.depth, "kind": commit.kind, "method": commit.method, "message": commit.message,
            "author": commit.author, "created": commit.created, "hparams": commit.hparams,
            "requests": commit.requests, "info": commit.info, "metrics": [m.__dict__ for m in commit.metrics],
            "refs": refs or []}
