"""kedit remote / push / fetch / pull / clone: sharing a repository through the Hugging Face Hub.

The endpoint is $HF_ENDPOINT for hf:// URLs (else huggingface.co) or the URL's own; the token
goes only to its origin (kedit/hub/remotes.py) and is never printed, logged or stored.
"""

from __future__ import annotations

from pathlib import Path

import click

from kedit.cli.common import command, group, human_bytes, json_option, open_repo, say
from kedit.cli.jsonout import emit_json
from kedit.core.progress import progress_enabled
from kedit.core.refs import short_id


@group(invoke_without_command=True)
@json_option
@click.pass_context
def remote(ctx: click.Context, as_json: bool) -> None:
    """List, add or remove remotes (Hugging Face Hub repositories).

    \b
    Example:
        kedit remote add origin hf://me/my-edited-model
        kedit remote list
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(remote_list, as_json=as_json)


@remote.command("list")
@json_option
@click.pass_context
def remote_list(ctx: click.Context, as_json: bool) -> None:
    """List the remotes and where their branches were last seen."""
    from kedit.hub import remotes

    repo = open_repo(ctx)
    found = [{"name": r.name, "url": r.url, "endpoint": r.endpoint, "repo_id": r.repo_id, "token_env": r.token_env,
              "branches": {b: t.kedit_commit for b, t in remotes.tracked_branches(repo.db, r.name).items()}}
             for r in remotes.list_all(repo.db)]
    if as_json:
        emit_json(remotes=found)
        return
    for r in found:
        seen = " ".join(f"{b}={short_id(c)}" for b, c in sorted(r["branches"].items()))
        click.echo(f"{r['name']}\t{r['url']}" + (f"\t{seen}" if seen else ""))


_TOKEN_ENV_HELP = ("The environment variable that holds the token for this remote's host (only its name is "
                   "stored). HF_TOKEN and the login cache go only to HF_ENDPOINT's host (default huggingface.co).")


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--token-env", metavar="VAR", help=_TOKEN_ENV_HELP)
@json_option
@click.pass_context
def remote_add(ctx: click.Context, name: str, url: str, token_env: str | None, as_json: bool) -> None:
    """Add a remote: hf://OWNER/REPO, or https://HOST/OWNER/REPO for another endpoint.

    \b
    Example:
        kedit remote add mirror https://hub.example.org/me/model --token-env MIRROR_TOKEN
    """
    from kedit.hub import remotes

    r = remotes.add(open_repo(ctx).db, name, url, token_env)
    if as_json:
        emit_json(remote={"name": r.name, "url": r.url, "endpoint": r.endpoint, "repo_id": r.repo_id,
                          "token_env": r.token_env})
        return
    say(ctx, f"added remote {r.name}: {r.repo_id} at {r.endpoint}")


@remote.command("remove")
@click.argument("name")
@json_option
@click.pass_context
def remote_remove(ctx: click.Context, name: str, as_json: bool) -> None:
    """Remove a remote and its remote-tracking refs (nothing on the Hub changes)."""
    from kedit.hub import remotes

    remotes.remove(open_repo(ctx).db, name)
    if as_json:
        emit_json(removed=name)
        return
    say(ctx, f"removed remote {name}")


@command()
@click.argument("remote_name", metavar="[REMOTE]", required=False)
@click.argument("branch", required=False)
@click.option("--to", "remote_branch", help="The Hub branch to push to (default: the same name).")
@click.option("--history-only", is_flag=True, help="Push only the history (deltas and records), not the weights.")
@click.option("--create", is_flag=True, help="Create the Hub repository if it does not exist.")
@click.option("--base-model", help="The Hub id of the base model, for the model card (default: from init).")
@click.option("--as-adapter", is_flag=True, help="Push the edits as a PEFT LoRA adapter (kilobytes), not the model.")
@click.option("--base", help="--as-adapter: the revision the adapter applies to (default: the initial commit).")
@click.option("--rank", type=int, help="--as-adapter: truncate dense deltas (FT-L) to this rank by SVD.")
@json_option
@click.pass_context
def push(ctx: click.Context, remote_name: str | None, branch: str | None, remote_branch: str | None,
         history_only: bool, create: bool, base_model: str | None, as_adapter: bool, base: str | None,
         rank: int | None, as_json: bool) -> None:
    """Send a branch to the Hub: its weights, model card and whole edit history.

    Only what changed since the last push is uploaded. The push is refused if someone else
    pushed to the branch since you last pulled.

    \b
    Example:
        kedit push                      # the current branch to origin
        kedit push origin experiment --history-only
        kedit push lora main --as-adapter --base-model me/smollm2-base
    """
    if as_adapter:
        if history_only:
            raise click.UsageError("--as-adapter pushes no history: drop --history-only")
        _push_adapter(ctx, remote_name, branch, remote_branch=remote_branch, create=create, base_model=base_model,
                      base=base, rank=rank, as_json=as_json)
        return
    if base is not None or rank is not None:
        raise click.UsageError("--base and --rank apply to --as-adapter only")
    from kedit.hub import layout as hub

    repo = open_repo(ctx)
    result = hub.push(repo, remote_name, branch, remote_branch=remote_branch, history_only=history_only,
                      create=create, base_model=base_model, progress=progress_enabled() and not as_json)
    if as_json:
        emit_json(**result.__dict__)
    elif result.up_to_date:
        click.echo(f"{result.remote}/{result.remote_branch} is up to date ({short_id(result.commit)})")
    else:
        click.echo(f"{result.branch} -> {result.remote}/{result.remote_branch}: {short_id(result.commit)} "
                   f"(hub commit {short_id(result.hub_commit)}), {len(result.files)} files, "
                   f"{human_bytes(result.bytes)} sent")


def _push_adapter(ctx: click.Context, remote_name: str | None, branch: str | None, *, remote_branch: str | None,
                  create: bool, base_model: str | None, base: str | None, rank: int | None, as_json: bool) -> None:
    from kedit.hub.adapter import push_adapter

    result = push_adapter(open_repo(ctx), remote_name, branch, remote_branch=remote_branch, base=base, rank=rank,
                          base_model=base_model, create=create)
    if as_json:
        emit_json(**result)
        return
    click.echo(f"{result['branch']} -> {result['remote']}/{result['remote_branch']} as a LoRA adapter: edits "
               f"{short_id(result['base'])}..{short_id(result['commit'])}, rank {result['rank']}, "
               f"{human_bytes(result['bytes'])} (hub commit {short_id(result['hub_commit'])})")


@command()
@click.argument("remote_name", metavar="[REMOTE]", required=False)
@click.argument("branches", nargs=-1)
@json_option
@click.pass_context
def fetch(ctx: click.Context, remote_name: str | None, branches: tuple[str, ...], as_json: bool) -> None:
    """Bring the remote's commits here (refs/remotes/REMOTE/BRANCH) without changing your branches."""
    from kedit.hub import fetch as hubfetch

    found = hubfetch.fetch(open_repo(ctx), remote_name, branches or None, progress=progress_enabled() and not as_json)
    if as_json:
        emit_json(branches={b: f.__dict__ for b, f in found.items()})
        return
    for f in found.values():
        click.echo(f"{f.branch}: {short_id(f.tip)} ({f.new_commits} new commits, {f.objects} objects)")


@command()
@click.argument("remote_name", metavar="[REMOTE]", required=False)
@click.argument("branch", required=False)
@click.option("--rebase", is_flag=True, help="If both sides have new commits, replay yours on top of the remote's.")
@json_option
@click.pass_context
def pull(ctx: click.Context, remote_name: str | None, branch: str | None, rebase: bool, as_json: bool) -> None:
    """Fetch the remote branch and fast-forward the current branch to it.

    \b
    Example:
        kedit pull                      # origin, the branch of the same name
        kedit pull --rebase             # your unpushed edits go on top of the remote's
    """
    from kedit.hub import fetch as hubfetch

    result = hubfetch.pull(open_repo(ctx), remote_name, branch, rebase=rebase,
                           progress=progress_enabled() and not as_json)
    if as_json:
        emit_json(**result.__dict__)
    elif result.status == "fast-forward":
        click.echo(f"{result.branch}: fast-forward {short_id(result.old)} -> {short_id(result.new)} "
                   f"({result.fetched} new commits)")
    elif result.status == "rebased":
        click.echo(f"{result.branch}: your edits replayed on top of {result.remote}/{result.branch}, now "
                   f"{short_id(result.new)} (their metrics were measured before: re-evaluate with kedit eval)")
    elif result.status == "ahead":
        click.echo(f"{result.branch} is ahead of {result.remote}/{result.branch}: push to share it")
    else:
        click.echo(f"{result.branch} is up to date with {result.remote}")


@command()
@click.argument("url")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option("--token-env", metavar="VAR", help=_TOKEN_ENV_HELP)
@click.option("--bare", is_flag=True, help="No working model folder: the weights are written once, to the store.")
@json_option
@click.pass_context
def clone(ctx: click.Context, url: str, directory: Path | None, token_env: str | None, bare: bool,
          as_json: bool) -> None:
    """Make a repository from a Hub repository that kedit pushed: every branch, the whole log.

    Every commit record is checked against its id and every object against its hash.

    \b
    Example:
        kedit clone hf://me/my-edited-model work
        kedit clone hf://me/llama-7b-edits work --bare   # history and store only
    """
    from kedit.hub import fetch as hubfetch

    repo, found = hubfetch.clone(url, directory, token_env=token_env, worktree=not bare,
                                 progress=progress_enabled() and not as_json)
    if as_json:
        emit_json(path=str(repo.root), branches={b: f.tip for b, f in found.items()})
        return
    commits = repo.count_commits()
    click.echo(f"cloned {url} into {repo.root}: {len(found)} branches, {commits} commits, "
               f"HEAD {repo.head_branch()} at {short_id(repo.head())}")
