"""Commands that move HEAD and refs: checkout, reset, branch, tag, revert."""

from __future__ import annotations

import click

from kedit.cli.common import command, json_option, open_repo, ref_decorations, say
from kedit.cli.jsonout import commit_json, emit_json
from kedit.core.refs import short_id


@command()
@click.argument("rev")
@click.option("-f", "--force", is_flag=True, help="Overwrite tensors changed by hand in the working model.")
@json_option
@click.pass_context
def checkout(ctx: click.Context, rev: str, force: bool, as_json: bool) -> None:
    """Switch to a branch, or detach HEAD at a commit, updating only the tensors that differ.

    \b
    Example:
        kedit checkout experiment
        kedit checkout HEAD~3
    """
    repo = open_repo(ctx)
    commit_id = repo.checkout(rev, force=force)
    branch = repo.head_branch()
    if as_json:
        emit_json(head=commit_id, branch=branch)
        return
    say(ctx, f"Switched to branch '{branch}'" if branch else f"HEAD is now at {short_id(commit_id)} (detached)")


@command()
@click.argument("rev")
@click.option("-f", "--force", is_flag=True, help="Overwrite tensors changed by hand in the working model.")
@json_option
@click.pass_context
def reset(ctx: click.Context, rev: str, force: bool, as_json: bool) -> None:
    """Move the current branch to REV. The old position stays in `kedit reflog`.

    \b
    Example:
        kedit reset HEAD~1      # drop the last edit from this branch
        kedit reset 'HEAD@{1}'  # undo that: where HEAD was before its last move
    """
    repo = open_repo(ctx)
    commit_id = repo.reset(rev, force=force)
    if as_json:
        emit_json(head=commit_id, branch=repo.head_branch())
        return
    say(ctx, f"HEAD is now at {short_id(commit_id)}")


@command()
@click.argument("name", required=False)
@click.argument("rev", default="HEAD")
@click.option("-d", "--delete", is_flag=True, help="Delete the branch NAME.")
@json_option
@click.pass_context
def branch(ctx: click.Context, name: str | None, rev: str, delete: bool, as_json: bool) -> None:
    """List branches, create NAME at REV, or delete NAME with -d.

    \b
    Example:
        kedit branch experiment HEAD~2
        kedit branch -d experiment
    """
    repo = open_repo(ctx)
    if name is None:
        branches, current = repo.refs.branches(), repo.head_branch()
        if as_json:
            emit_json(current=current, branches=branches)
            return
        for b, target in branches.items():
            click.echo(f"{'*' if b == current else ' '} {b:<24} {short_id(target)}")
        return
    if delete:
        target = repo.delete_branch(name)
        say(ctx, f"Deleted branch {name} (was {short_id(target)})")
    else:
        target = repo.create_branch(name, rev)
        say(ctx, f"Created branch {name} at {short_id(target)}")
    if as_json:
        emit_json(branch=name, commit=target, deleted=delete)


@command()
@click.argument("name", required=False)
@click.argument("rev", default="HEAD")
@click.option("-d", "--delete", is_flag=True, help="Delete the tag NAME.")
@json_option
@click.pass_context
def tag(ctx: click.Context, name: str | None, rev: str, delete: bool, as_json: bool) -> None:
    """List tags, tag REV as NAME, or delete NAME with -d.

    \b
    Example:
        kedit tag before-batch-2
    """
    repo = open_repo(ctx)
    if name is None:
        tags = repo.refs.tags()
        if as_json:
            emit_json(tags=tags)
            return
        for t, target in tags.items():
            click.echo(f"{t:<24} {short_id(target)}")
        return
    if delete:
        target = repo.delete_tag(name)
        say(ctx, f"Deleted tag {name} (was {short_id(target)})")
    else:
        target = repo.create_tag(name, rev)
        say(ctx, f"Tagged {short_id(target)} as {name}")
    if as_json:
        emit_json(tag=name, commit=target, deleted=delete)


@command()
@click.argument("rev")
@click.option("-m", "--message", help="Message of the revert commit.")
@json_option
@click.pass_context
def revert(ctx: click.Context, rev: str, message: str | None, as_json: bool) -> None:
    """Undo REV with a new commit whose tensors are recomputed from the history without it.

    Reverting never subtracts: later edits are replayed on the base without REV's delta, so
    reverting every edit gives the base bit for bit.

    \b
    Example:
        kedit revert HEAD~2
    """
    repo = open_repo(ctx)
    commit = repo.revert(rev, message=message)
    later = commit.info.get("later_commits", [])
    if as_json:
        emit_json(branch=repo.head_branch(), commit=commit_json(commit, ref_decorations(repo).get(commit.id)),
                  later_commits=later)
        return
    click.echo(f"[{repo.head_branch() or 'detached'} {commit.short}] {commit.message}")
    if later:
        say(ctx, f"note: {len(later)} later edit(s) were made on a model that contained the reverted one; "
                  "re-evaluate them (kedit check)")
