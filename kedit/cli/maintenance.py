"""Commands that check and clean the repository: fsck, gc."""

from __future__ import annotations

import sys

import click

from kedit.cli.common import command, human_bytes, json_option, open_repo, parse_age
from kedit.cli.jsonout import emit_json
from kedit.core.progress import progress_enabled


@command()
@click.option("--repair", is_flag=True,
              help="Rebuild the rows, refs, reflog and working model that hashes prove, then check again.")
@json_option
@click.pass_context
def fsck(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Prove every object, commit row, ref and working-model shard against the hashes.

    Rows no hash covers (metrics, probe outputs) are counted as unproved. Exit status 1 when
    anything is damaged (after --repair: when anything is left that it cannot repair).

    \b
    Example:
        kedit fsck
        kedit fsck --repair
    """
    from kedit.core.maintenance import fsck as run_fsck
    from kedit.core.maintenance import repair as run_repair

    repo = open_repo(ctx)
    report = (run_repair if repair else run_fsck)(repo, progress=progress_enabled())
    if as_json:
        emit_json(**report.summary())
    else:
        for line in report.repaired:
            click.echo(f"repaired: {line}")
        for w in report.warnings:
            click.echo(f"warning: {w}", err=True)
        for e in report.errors:
            click.echo(f"error: {e}")
        if report.unproved:
            click.echo("unproved (no hash covers them): "
                       + ", ".join(f"{n} {what}" for what, n in report.unproved.items()))
        click.echo(f"checked {report.objects} objects, {report.commits} commits, {report.tensors} tensor changes, "
                   f"{report.worktree_shards} working-model shards: "
                   + ("ok" if report.ok else f"{len(report.errors)} problem(s)"))
    if not report.ok:
        sys.exit(1)


@command()
@click.option("--prune", default="14d", show_default=True,
              help="Remove unreachable objects older than this (now, 12h, 14d).")
@click.option("--reflog-expire", default="90d", show_default=True, help="Forget reflog entries older than this.")
@json_option
@click.pass_context
def gc(ctx: click.Context, prune: str, reflog_expire: str, as_json: bool) -> None:
    """Remove commits and objects that no ref or recent reflog entry reaches."""
    from kedit.core.maintenance import gc as run_gc

    repo = open_repo(ctx)
    report = run_gc(repo, grace=parse_age(prune), reflog_expiry=parse_age(reflog_expire))
    if as_json:
        emit_json(**report.__dict__)
    else:
        click.echo(f"removed {report.commits_removed} commits, {report.objects_removed} objects, "
                   f"{report.keyframes_removed} keyframes; freed {human_bytes(report.bytes_freed)}")
