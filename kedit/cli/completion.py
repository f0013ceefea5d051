"""Shell completion of revisions and branch names (click's `_KEDIT_COMPLETE` protocol).

Completion runs on every Tab, so it reads the refs table straight from SQLite and never
imports torch or opens the model store.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import click
from click.shell_completion import CompletionItem

from kedit.core.db import DB_FILE, connect, find_repository
from kedit.core.errors import KeditError
from kedit.core.refs import HEAD, Refs

CompleteFn = Callable[[click.Context, click.Parameter, str], list[CompletionItem]]


def _refs(ctx: click.Context) -> Refs | None:
    where = ctx.find_root().params.get("repo_path") or os.environ.get("KEDIT_DIR") or Path.cwd()
    try:
        return Refs(connect(find_repository(Path(where)) / DB_FILE))
    except (KeditError, OSError, sqlite3.Error):
        return None  # outside a repository, or an unreadable one: nothing to offer


def _items(names: list[str], incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(name) for name in names if name.startswith(incomplete)]


def complete_revision(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """HEAD, branches and tags."""
    refs = _refs(ctx)
    return _items([HEAD, *refs.branches(), *refs.tags()], incomplete) if refs else []


def complete_branch(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    refs = _refs(ctx)
    return _items(list(refs.branches()), incomplete) if refs else []


# Argument names the commands use for a revision or a branch, completed wherever they appear.
COMPLETERS: dict[str, CompleteFn] = {
    "rev": complete_revision, "rev_a": complete_revision, "rev_b": complete_revision, "ref": complete_revision,
    "branch": complete_branch, "branches": complete_branch,
}


def add_completion(command: click.Command) -> None:
    """Give `command`'s revision and branch arguments their completion (unless they have one)."""
    for param in command.params:
        if isinstance(param, click.Argument) and param.name in COMPLETERS and param._custom_shell_complete is None:
            param._custom_shell_complete = COMPLETERS[param.name]  # what click's shell_complete= sets
