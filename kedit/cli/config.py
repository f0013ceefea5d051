"""kedit config: read and write settings (kedit/core/config.py), with git's command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from kedit.cli.common import command, json_option
from kedit.cli.jsonout import emit_json
from kedit.core import config
from kedit.core.errors import KeditError, RepositoryNotFoundError


def method_name(value: str) -> str:
    """`edit.method` names a registered method (the engine's config module knows no methods)."""
    from kedit.methods.registry import method_names

    known = method_names()
    if value not in known:
        raise ValueError(f"unknown method {value!r}; known methods: {', '.join(known)}")
    return value


CHECKS = {"edit.method": method_name}  # checks beyond kedit.core.config.KEYS, by key


def _repo_dir(ctx: click.Context, required: bool) -> Path | None:
    """The repository's .kedit folder; None outside one unless `required`."""
    from kedit.core.repo import find_repository

    try:
        return find_repository(Path(ctx.obj["repo_path"] or os.environ.get("KEDIT_DIR") or Path.cwd()))
    except RepositoryNotFoundError as e:
        if required:
            raise KeditError(f"{e}", hint="use --global for your own settings") from None
        return None


@command(name="config")
@click.argument("key", required=False)
@click.argument("value", required=False)
@click.option("--global", "scope", flag_value="global", help="Your settings for every repository.")
@click.option("--local", "scope", flag_value="local", help="This repository's settings (the default for writing).")
@click.option("-l", "--list", "list_all", is_flag=True, help="Every setting in effect (or of the given scope).")
@click.option("--unset", is_flag=True, help="Remove KEY from the repository's (or --global) settings.")
@json_option
@click.pass_context
def config_(ctx: click.Context, key: str | None, value: str | None, scope: str | None, list_all: bool,
            unset: bool, as_json: bool) -> None:
    """Get or set KEY (user.name, user.email, edit.method, stats.samples, core.pager).

    Settings live in the repository (.kedit/config) and globally ($XDG_CONFIG_HOME/kedit/config,
    else ~/.config/kedit/config); the repository's win. KEY alone prints its value (exit
    status 1 when it is not set).

    \b
    Example:
        kedit config --global user.name "Ada Lovelace"
        kedit config --global user.email ada@example.org
        kedit config edit.method memit
        kedit config --list
    """
    if list_all:
        if key is not None:
            raise click.UsageError("--list takes no KEY")
        found = _scoped(ctx, scope)
        if as_json:
            emit_json(settings=found)
            return
        for k, v in sorted(found.items()):
            click.echo(f"{k}={v}")
        return
    if key is None:
        raise click.UsageError("give a KEY (or --list)")
    config.check_key(key)
    if unset and value is not None:
        raise click.UsageError("--unset takes no VALUE")
    if unset or value is not None:
        path = config.global_path() if scope == "global" else config.repo_path(_repo_dir(ctx, required=True))
        if unset:
            config.unset(path, key)
            if as_json:
                emit_json(unset=key)
            return
        stored = config.set_value(path, key, value, check=CHECKS.get(key))
        if as_json:
            emit_json(settings={key: stored})
    else:
        found = _scoped(ctx, scope).get(key)
        if found is None:
            sys.exit(1)
        if as_json:
            emit_json(settings={key: found})
        else:
            click.echo(found)


def _scoped(ctx: click.Context, scope: str | None) -> dict[str, str]:
    """The settings of `scope` (global, local), or those in effect when None."""
    if scope == "global":
        return config.read(config.global_path())
    if scope == "local":
        return config.read(config.repo_path(_repo_dir(ctx, required=True)))
    return config.values(_repo_dir(ctx, required=False))
